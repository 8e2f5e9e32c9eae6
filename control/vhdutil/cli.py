"""``vhd-util``: blktap's VHD tool, with its subcommands, flags and output formats.

Scripts written for blktap's ``vhd-util`` run unchanged.  Every subcommand
exits 0 on success, or with a positive errno after a message on stderr: this
module picks the subcommand and maps its failure to that errno.  The subcommands
are in ``queries`` (reading images) and ``changes`` (changing
them); they parse blktap-style options and print blktap-style output, and leave
the work itself to ``tapdisk.drivers.vhd`` (shared with ``tap-img``).
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from tapdisk.drivers.base import ImageError

from .args import UsageError
from .changes import (
    cmd_coalesce,
    cmd_create,
    cmd_fill,
    cmd_modify,
    cmd_repair,
    cmd_resize,
    cmd_set,
    cmd_snapshot,
)
from .queries import cmd_check, cmd_query, cmd_read, cmd_scan

COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "create": cmd_create,
    "snapshot": cmd_snapshot,
    "query": cmd_query,
    "check": cmd_check,
    "set": cmd_set,
    "repair": cmd_repair,
    "coalesce": cmd_coalesce,
    "resize": cmd_resize,
    "scan": cmd_scan,
    "modify": cmd_modify,
    "read": cmd_read,
    "fill": cmd_fill,
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
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        print(f"usage: vhd-util COMMAND [OPTIONS]\nCOMMAND := {{ {' | '.join(COMMANDS)} }}")
        if args and args[0] in ("-h", "--help"):
            print(EXAMPLES, end="")
            return 0
        return errno.EINVAL
    cmd = args[0]
    try:
        return COMMANDS[cmd](args[1:])
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return errno.EINVAL
    except FileExistsError as exc:
        print(f"vhd-util {cmd}: {exc.filename}: already exists", file=sys.stderr)
        return errno.EEXIST
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vhd-util {cmd}: {where}{exc.strerror or exc}", file=sys.stderr)
        return exc.errno or errno.EIO
    except ImageError as exc:
        print(f"vhd-util {cmd}: {exc}", file=sys.stderr)
        return errno.EINVAL


if __name__ == "__main__":
    raise SystemExit(main())
