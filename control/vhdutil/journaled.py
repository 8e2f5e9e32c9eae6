"""``vhd-util resize`` and ``revert``: growing a VHD, in place or through an undo journal.

SM grows a VHD offline with ``resize -j JOURNAL`` and, when that fails, undoes it
with ``revert -n -j JOURNAL``; online (within the BAT room ``create -S`` reserved)
with ``resize -f``.  The journal is blktap's format, so a journal either tool left
behind is reverted by the other.
"""

from __future__ import annotations

from tapdisk.drivers.vhd.journal import revert
from tapdisk.drivers.vhd.resize import resize_fast, resize_journaled

from .args import UsageError, no_operands, number, parse_options, require

MiB = 1 << 20


def cmd_resize(argv: list[str]) -> int:
    usage = (
        "options: <-n name> <-s size (in MB)> (<-j journal>|<-f fast>) [-h help]\n\n"
        "The resize operation can only be performed offline and must be journaled because "
        "resizing the metadata might require moving data blocks. However, if a VHD was "
        "created with -S <msize> option (during vhd-util create/snapshot), which "
        "preallocates the metadata for growing the VHD up to size <msize>, then resizing "
        "such a VHD up to <msize> can be performed online without journaling (-f option)."
    )
    o, rest = parse_options(argv, "n:s:j:fh", usage)
    require(o, usage, "n", "s")
    no_operands(rest, usage)
    if ("f" in o) == ("j" in o):
        raise UsageError(usage)
    size = number(o["s"], "size") * MiB
    if "f" in o:
        resize_fast(o["n"], size)
    else:
        resize_journaled(o["n"], size, o["j"])
    return 0


def cmd_revert(argv: list[str]) -> int:
    usage = "options: <-n name> <-j journal> [-h help]"
    o, rest = parse_options(argv, "n:j:h", usage)
    require(o, usage, "n", "j")
    no_operands(rest, usage)
    revert(o["n"], o["j"])
    return 0
