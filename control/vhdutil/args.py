"""Option parsing the way blktap's ``vhd-util`` does it: getopt letters, usage on error.

blktap parses with GNU getopt, so options and operands may come in any order and
``--debug`` (which SM passes to every call) is dropped wherever it stands before
the subcommand sees its arguments.  Each subcommand states its getopt letters and
usage line; ``-h`` prints the usage and exits 0, and a bad or missing option
raises ``UsageError`` carrying the usage line.
"""

from __future__ import annotations

import getopt

#: blktap's ``vhd-util`` removes this word from every argument list (it only turns
#: libvhd's syslog messages on).
DEBUG_FLAG = "--debug"


class UsageError(Exception):
    """Bad or missing options; the message is the subcommand's usage line."""


def without_debug(argv: list[str]) -> list[str]:
    """``argv`` less every ``--debug``, as blktap's ``main`` does."""
    return [a for a in argv if a != DEBUG_FLAG]


def parse_options(argv: list[str], spec: str, usage: str) -> tuple[dict[str, str], list[str]]:
    """({letter: value}, operands) of ``argv`` per getopt ``spec``; ``-h`` prints ``usage``."""
    try:
        pairs, rest = getopt.gnu_getopt(argv, spec)
    except getopt.GetoptError as exc:
        raise UsageError(f"{exc}\n{usage}") from None
    opts: dict[str, str] = {}
    for k, v in pairs:
        opts[k[1]] = v
    if "h" in opts:
        print(usage)
        raise SystemExit(0)
    return opts, rest


def require(opts: dict[str, str], usage: str, *keys: str) -> None:
    """Raise UsageError unless every option letter in ``keys`` was given."""
    if any(k not in opts for k in keys):
        raise UsageError(usage)


def number(value: str, what: str) -> int:
    """A decimal option value, never negative (blktap reads them unsigned); ``what`` names it
    in the error."""
    try:
        n = int(value, 10)
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"{what} must be a whole number, not {value!r}")
    return n


def no_operands(rest: list[str], usage: str) -> None:
    """blktap refuses words that are not options (``optind != argc``)."""
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}\n{usage}")
