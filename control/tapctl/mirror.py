"""``tap-ctl mirror``: migrate a running device to another image, showing progress.

The tapdisk does the work (``mirror``, tapdisk/migration.py); this command starts
it and asks for ``mirror_status`` until it ends.  On a terminal the progress is
a bar on stderr; otherwise one JSON line a second on stdout, then a final line
with the totals (``"final": true``).  Interrupted, it cancels the migration: the
device stays on its source.  A failed migration exits 1 with the tapdisk's reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from tapdisk.ctl.client import CallError, Client

from .commands import TapCtlError, client, target

#: Seconds between status lines when the output is not a terminal.
LINE_PERIOD: Final = 1.0
#: Seconds between redraws of the bar.
BAR_PERIOD: Final = 0.2
_BAR_WIDTH: Final = 40
_RUNNING: Final = ("starting", "copying", "switching")


def cmd_mirror(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    tty = sys.stderr.isatty()
    with client(args, pid) as daemon:
        try:
            status = daemon.call("mirror", minor=minor, spec=args.args, switch=args.switch)
        except CallError as exc:
            raise TapCtlError(f"mirror to {args.args} refused: {exc}") from None
        try:
            status = follow(daemon, minor, status, tty, lambda: client(args, pid))
        except KeyboardInterrupt:
            # A new connection: the interrupted call's answer may still be on its way.
            with client(args, pid) as again:
                status = again.call("mirror_cancel", minor=minor)
            report(status, tty, final=True)
            if status["state"] == "failed":
                raise TapCtlError(
                    f"mirror to {args.args} cancelled; the device stays on its source"
                ) from None
    if status["state"] == "failed":
        raise TapCtlError(
            f"mirror to {args.args} failed, the device stays on its source: {status['error']}"
        )


def follow(
    daemon: Client,
    minor: int | None,
    status: dict[str, Any],
    tty: bool,
    reconnect: Callable[[], Client],
) -> dict[str, Any]:
    """Report ``status`` periodically until the migration ends; its last status.

    A control connection that breaks is opened again once per poll (the job runs in the
    tapdisk whatever happens to this connection); a tapdisk that cannot be reached fails.
    """
    period = BAR_PERIOD if tty else LINE_PERIOD
    next_report = time.monotonic()
    while status["state"] in _RUNNING:
        now = time.monotonic()
        if now >= next_report:
            report(status, tty)
            next_report = now + period
        time.sleep(min(BAR_PERIOD, max(0.0, next_report - now)))
        try:
            status = daemon.call("mirror_status", minor=minor)
        except CallError as exc:
            if exc.kind is not None:  # the tapdisk answered: an error of the job, not the wire
                raise
            daemon.close()
            daemon = reconnect()
            status = daemon.call("mirror_status", minor=minor)
    report(status, tty, final=True)
    return status


def report(status: dict[str, Any], tty: bool, final: bool = False) -> None:
    """One progress report: the bar redrawn, or a JSON line."""
    if not tty:
        print(json.dumps({**status, "final": final}), flush=True)
        return
    total = status["total"] or 1
    filled = _BAR_WIDTH * status["done"] // total
    seconds = status["seconds"] or 0.001
    rate = status["done"] / seconds / (1 << 20)
    bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
    line = (
        f"\r[{bar}] {100 * status['done'] // total:3d}% {status['done'] >> 20}/"
        f"{status['total'] >> 20} MiB {rate:.0f} MiB/s {status['state']}"
    )
    sys.stderr.write(line + ("\n" if final else ""))
    sys.stderr.flush()
