"""Option parsing the way blktap's ``vhd-util`` does it: getopt letters, usage on error.

Each subcommand states its getopt letters and usage line; ``-h`` prints the usage and
exits 0, and a bad or missing option raises ``UsageError`` carrying the usage line.
"""

from __future__ import annotations

import getopt


class UsageError(Exception):
    """Bad or missing options; the message is the subcommand's usage line."""


def parse_options(argv: list[str], spec: str, usage: str) -> tuple[dict[str, str], list[str]]:
    """({letter: value}, operands) of ``argv`` per getopt ``spec``; ``-h`` prints ``usage``."""
    try:
        pairs, rest = getopt.getopt(argv, spec)
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
    """A decimal option value; ``what`` names it in the error."""
    try:
        return int(value, 10)
    except ValueError:
        raise UsageError(f"{what} must be a number, not {value!r}") from None
