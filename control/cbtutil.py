"""``cbt-util``: blktap's tool for changed-block tracking logs, with its flags and output.

SM (``libs/sm/cbtutil.py``) runs it exactly as it runs blktap's: ``get``
prints a UUID as 36 lowercase characters, the flag and the size in decimal,
each with a newline, and ``-b`` the raw bitmap bytes.  Exit codes are positive
errnos, as blktap's are (EINVAL bad options, ENOENT missing file, EIO a file
shorter than its header or bitmap).  Unlike blktap's tool, every bad input
(a missing or short file, a size that is 0 or not a number, a malformed UUID
or flag, an unknown command) fails with one line on stderr and leaves every
file untouched.  The log layout and the edits live in ``tapdisk.drivers.cbt``.
"""

from __future__ import annotations

import errno
import getopt
import re
import sys
import uuid
from collections.abc import Callable

from tapdisk.drivers import cbt
from tapdisk.drivers.base import ImageError

USAGE = {
    "create": "cbt-util create -n LOG -s BYTES",
    "get": "cbt-util get -n LOG {-p | -c | -f | -s | -b}",
    "set": "cbt-util set -n LOG [-p UUID] [-c UUID] [-f 0|1] [-s BYTES]",
    "coalesce": "cbt-util coalesce -p PARENT_LOG -c CHILD_LOG",
}

OPTIONS = {
    "create": """\
  -n LOG     log file (or logical volume) to write
  -s BYTES   size of the disk in bytes""",
    "get": """\
  -n LOG     log file to read
  -p         print the parent log's UUID
  -c         print the child log's UUID
  -f         print the consistency flag
  -s         print the disk size in bytes
  -b         write the raw bitmap to stdout""",
    "set": """\
  -n LOG     log file to change in place
  -p UUID    parent log's UUID
  -c UUID    child log's UUID
  -f 0|1     consistency flag
  -s BYTES   disk size in bytes; may only grow (the new blocks are unmarked)""",
    "coalesce": """\
  -p PARENT  log whose bitmap is ORed into CHILD's
  -c CHILD   log changed in place; its bitmap must be at least as long as PARENT's""",
}

HELP = f"""\
usage: cbt-util COMMAND [OPTIONS]
COMMAND := {{ {" | ".join(USAGE)} }}

Changed-block tracking logs in blktap's format: a 48-byte header (parent and
child UUIDs, consistency flag, disk size) and one bit per 64 KiB block.

examples:
  cbt-util create -n disk.cbtlog -s 10737418240     log for a 10 GiB disk, nothing marked
  cbt-util get -n disk.cbtlog -s                    10737418240
  cbt-util set -n disk.cbtlog -f 1                  mark the log consistent
  cbt-util set -n disk.cbtlog -p 0d5cbfa6-0f53-4d0c-8f4b-16eef6e3b1a4
  cbt-util get -n disk.cbtlog -b | xxd | head       the changed blocks, one bit each
  cbt-util coalesce -p snap.cbtlog -c disk.cbtlog   add snap's changed blocks to disk's
  cbt-util COMMAND -h                               the options of one command
"""

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_DECIMAL = re.compile(r"[0-9]+")


class UsageError(Exception):
    """Bad, missing or extra options; the message says which."""


def _options(cmd: str, argv: list[str], spec: str) -> dict[str, str]:
    """Options as {letter: value}, the last of a repeated one winning (as with getopt(3)).

    ``-h`` prints the command's help and exits 0.
    """
    try:
        pairs, rest = getopt.gnu_getopt(argv, spec + "h")
    except getopt.GetoptError as exc:
        raise UsageError(str(exc)) from None
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    opts = {key[1]: value for key, value in pairs}
    if "h" in opts:
        print(f"usage: {USAGE[cmd]}\n\n{OPTIONS[cmd]}")
        raise SystemExit(0)
    return opts


def _size(value: str) -> int:
    if not _DECIMAL.fullmatch(value) or not 0 < int(value) <= cbt.MAX_SIZE:
        raise UsageError(f"-s takes a disk size of 1 to {cbt.MAX_SIZE} bytes, not {value!r}")
    return int(value)


def _uuid(option: str, value: str) -> uuid.UUID:
    if not _UUID.fullmatch(value):
        raise UsageError(
            f"{option} takes a UUID like 0d5cbfa6-0f53-4d0c-8f4b-16eef6e3b1a4, not {value!r}"
        )
    return uuid.UUID(value)


def _flag(value: str) -> int:
    if value not in ("0", "1"):
        raise UsageError(f"-f takes 0 or 1, not {value!r}")
    return int(value)


def cmd_create(argv: list[str]) -> int:
    opts = _options("create", argv, "n:s:")
    if "n" not in opts or "s" not in opts:
        raise UsageError("-n and -s are required")
    cbt.create(opts["n"], _size(opts["s"]))
    return 0


def cmd_get(argv: list[str]) -> int:
    opts = _options("get", argv, "n:pcfsb")
    fields = [key for key in "pcfsb" if key in opts]
    if "n" not in opts or len(fields) != 1:
        raise UsageError("-n and exactly one of -p -c -f -s -b are required")
    header, bitmap = cbt.load(opts["n"])
    field = fields[0]
    if field == "b":
        sys.stdout.buffer.write(bitmap)
    else:
        value = {"p": header.parent, "c": header.child, "f": header.consistent, "s": header.size}
        sys.stdout.write(f"{value[field]}\n")
    sys.stdout.flush()
    return 0


def cmd_set(argv: list[str]) -> int:
    opts = _options("set", argv, "n:p:c:f:s:")
    if "n" not in opts or not opts.keys() & set("pcfs"):
        raise UsageError("-n and at least one of -p -c -f -s are required")
    # Every value is checked before the file is opened.
    parent = _uuid("-p", opts["p"]) if "p" in opts else None
    child = _uuid("-c", opts["c"]) if "c" in opts else None
    consistent = _flag(opts["f"]) if "f" in opts else None
    size = _size(opts["s"]) if "s" in opts else None
    cbt.update(opts["n"], parent=parent, child=child, consistent=consistent, size=size)
    return 0


def cmd_coalesce(argv: list[str]) -> int:
    opts = _options("coalesce", argv, "p:c:")
    if "p" not in opts or "c" not in opts:
        raise UsageError("-p and -c are required")
    cbt.coalesce(opts["p"], opts["c"])
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "create": cmd_create,
    "set": cmd_set,
    "get": cmd_get,
    "coalesce": cmd_coalesce,
}


def _fail(where: str, message: str, code: int) -> int:
    """One line on stderr, whatever the message holds."""
    print(f"{where}: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0
    commands = f"usage: cbt-util {{{' | '.join(USAGE)}}} [OPTIONS], or cbt-util --help"
    if not args:
        return _fail("cbt-util", f"no COMMAND given; {commands}", errno.EINVAL)
    cmd = args[0]
    if cmd not in COMMANDS:
        return _fail("cbt-util", f"unknown COMMAND {cmd!r}; {commands}", errno.EINVAL)
    where = f"cbt-util {cmd}"
    try:
        return COMMANDS[cmd](args[1:])
    except UsageError as exc:
        return _fail(where, f"{exc}; usage: {USAGE[cmd]}", errno.EINVAL)
    except cbt.LogFormatError as exc:
        return _fail(where, str(exc), errno.EIO)
    except ImageError as exc:
        return _fail(where, str(exc), errno.EINVAL)
    except OSError as exc:
        name = f"{exc.filename}: " if exc.filename else ""
        return _fail(where, f"{name}{exc.strerror or exc}", exc.errno or errno.EIO)


if __name__ == "__main__":
    raise SystemExit(main())
