"""``vhd-util``: blktap's VHD tool, with its subcommands, flags and output formats.

Scripts written for blktap's ``vhd-util`` (SM's ``vhdutil.py`` above all) run
unchanged.  Every subcommand exits 0 on success, or with blktap's positive errno
after a message on stderr: this module picks the subcommand, drops ``--debug``
as blktap does, and maps a failure to its errno.  The subcommands are in
``queries`` (query, check, scan), ``read``, ``changes`` (the commands that change
images), ``journaled`` (resize and revert) and ``key``; they parse blktap-style
options and print blktap-style output, and leave the work itself to
``tapdisk.drivers.vhd`` (shared with ``tap-img``).
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from tapdisk.drivers.base import ImageError

from .args import UsageError, without_debug
from .changes import (
    cmd_coalesce,
    cmd_copy,
    cmd_create,
    cmd_fill,
    cmd_modify,
    cmd_repair,
    cmd_set,
    cmd_snapshot,
)
from .journaled import cmd_resize, cmd_revert
from .key import cmd_key
from .queries import cmd_check, cmd_query, cmd_scan
from .read import cmd_read

#: blktap's table, in its order (the usage line lists them so).
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "create": cmd_create,
    "snapshot": cmd_snapshot,
    "query": cmd_query,
    "read": cmd_read,
    "set": cmd_set,
    "repair": cmd_repair,
    "resize": cmd_resize,
    "fill": cmd_fill,
    "coalesce": cmd_coalesce,
    "modify": cmd_modify,
    "scan": cmd_scan,
    "check": cmd_check,
    "revert": cmd_revert,
    "key": cmd_key,
    "copy": cmd_copy,
}


EXAMPLES = """
examples:
  vhd-util create -n disk.vhd -s 10240            10 GiB dynamic VHD
  vhd-util snapshot -n leaf.vhd -p disk.vhd       differencing child of disk.vhd
  vhd-util query -n leaf.vhd -v -s -p             virtual size, physical size, parent
  vhd-util check -n leaf.vhd                      "leaf.vhd is valid" or what is wrong
  vhd-util coalesce -n leaf.vhd                   copy leaf's data into its parent
  vhd-util scan -f -m '/images/*.vhd' -p          the chains as a tree
  vhd-util COMMAND -h                             the options of one command
"""


def main(argv: list[str] | None = None) -> int:
    args = without_debug(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        if args and args[0] not in ("-h", "--help"):
            print(f"invalid COMMAND {args[0]}", file=sys.stderr)
        print(f"usage: vhd-util COMMAND [OPTIONS]\nCOMMAND := {{ {' | '.join(COMMANDS)} }}")
        if args and args[0] in ("-h", "--help"):
            print(EXAMPLES, end="")
            return 0
        return errno.EINVAL
    cmd = args[0]
    try:
        return COMMANDS[cmd](args[1:])
    except (OSError, ImageError) as exc:
        code = _report(cmd, exc)
        for note in getattr(exc, "__notes__", ()):
            print(f"vhd-util {cmd}: {note}", file=sys.stderr)
        return code
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return errno.EINVAL


def _report(cmd: str, exc: OSError | ImageError) -> int:
    """Print what failed on stderr; the errno ``vhd-util`` exits with."""
    if isinstance(exc, FileExistsError):
        print(f"vhd-util {cmd}: {exc.filename}: already exists", file=sys.stderr)
        return errno.EEXIST
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vhd-util {cmd}: {where}{exc.strerror or exc}", file=sys.stderr)
        return exc.errno or errno.EIO
    print(f"vhd-util {cmd}: {exc}", file=sys.stderr)
    return getattr(exc, "errno", None) or errno.EINVAL


if __name__ == "__main__":
    raise SystemExit(main())
