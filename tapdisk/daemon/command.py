"""``tapdisk daemon``: its flags, and ``run``, which serves a ``Daemon`` until shutdown.

``tapdisk service`` runs the same ``run`` with a boot step; tap-ctl spawn starts
``tapdisk daemon`` with ``--ready-fd``.  The package docstring says how the
pieces of the daemon fit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from tapdisk.ctl import protocol
from tapdisk.drivers.registry import OpenOptions

from .. import busypoll, logs, tls
from .. import config as configuration
from ..loop import run_loop
from ..scheduler import SchedulerLimits
from ..tls import ServerTLS
from .operations import Daemon

log = logging.getLogger("tapdisk.daemon")

DEFAULTS = SchedulerLimits()

DAEMON_EXAMPLES = """\
examples:
  tapdisk daemon --control-dir /tmp/td &
  tap-ctl open --control-dir /tmp/td -p $! -a raw:/var/lib/images/disk.img
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``tapdisk daemon`` subcommand (tap-ctl spawn runs it)."""
    parser = sub.add_parser(
        "daemon",
        help="run a tapdisk steered through its control socket (what tap-ctl spawn starts)",
        description="Run in the foreground, listening on <dir>/ctl<pid>; tap-ctl attaches minors "
        "to it and opens, pauses and closes images on them.  It exits once its last minor is "
        "detached.  Logs go to stderr.",
        epilog=DAEMON_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    protocol.add_control_dir_argument(parser)
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default {configuration.DEFAULT_PATH}, if it exists); "
        "its retry_deadline, queue_depth, merge_size, busy_poll, allowed_dirs and log_level apply "
        "unless a flag is given",
    )
    configuration.add_allowed_dirs_argument(parser)
    parser.add_argument(
        "--timeout",
        "-t",
        type=float,
        metavar="SECS",
        help="default per-request retry deadline of opened images "
        f"(default: the configuration's, else {DEFAULTS.timeout:g})",
    )
    parser.add_argument(
        "--queue-depth",
        type=int,
        metavar="N",
        help="requests queued or in flight per device "
        f"(default: the configuration's, else {DEFAULTS.queue_depth})",
    )
    parser.add_argument(
        "--max-merge",
        type=int,
        metavar="BYTES",
        help="largest merged I/O; 0 disables merging "
        f"(default: the configuration's merge_size, else {DEFAULTS.max_merge})",
    )
    parser.add_argument(
        "--watchdog",
        type=float,
        default=DEFAULTS.watchdog,
        metavar="SECS",
        help="log requests without progress for this long (default %(default)s)",
    )
    configuration.add_busy_poll_argument(parser, None)
    tls.add_arguments(parser)
    parser.add_argument(
        "--ready-fd",
        type=int,
        metavar="FD",
        help="write the control socket path to FD and close it once listening",
    )


def _given(flag: Any, setting: Any) -> Any:
    """A command-line value if one was given, else the configuration's."""
    return setting if flag is None else flag


def main(args: argparse.Namespace) -> int:
    """Entry point of ``tapdisk daemon``."""
    try:
        settings = configuration.load(args.config)
    except configuration.ConfigError as exc:
        print(f"tapdisk daemon: {exc}", file=sys.stderr)
        return 2
    logs.setup(args.log_level or settings.log_level)
    try:
        limits = SchedulerLimits(
            queue_depth=_given(args.queue_depth, settings.queue_depth),
            max_merge=_given(args.max_merge, settings.merge_size),
            timeout=_given(args.timeout, settings.retry_deadline),
            watchdog=args.watchdog,
        )
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    allowed_dirs = tuple(_given(args.allowed_dirs, settings.allowed_dirs))
    try:
        server_tls = tls.server_tls(tls.from_arguments(args, tls.configured(settings)))
    except tls.TLSConfigError as exc:
        log.error("%s", exc)
        return 2
    return run_loop(
        run(
            args.control_dir,
            limits,
            args.ready_fd,
            allowed_dirs=allowed_dirs,
            busy_poll=_given(args.busy_poll, settings.busy_poll),
            exit_when_idle=True,
            server_tls=server_tls,
            open_defaults=configuration.open_defaults(settings),
            remote_images=settings.remote_images,
            config=args.config and os.path.abspath(args.config),
        )
    )


async def run(
    directory: str,
    limits: SchedulerLimits,
    ready: int | None = None,
    boot: Callable[[Daemon], Awaitable[None]] | None = None,
    allowed_dirs: tuple[str, ...] = (),
    busy_poll: int = busypoll.DEFAULT_MAX_US,
    exit_when_idle: bool = False,
    server_tls: ServerTLS | None = None,
    open_defaults: OpenOptions | None = None,
    remote_images: bool = False,
    config: str | None = None,
) -> int:
    """Run a daemon until shutdown or SIGTERM/SIGINT (or, with ``exit_when_idle``, until
    its last minor is detached).

    Once listening, awaits ``boot(daemon)`` if given (``tapdisk service`` attaches
    its configured devices there and notifies systemd; if it raises, the daemon
    shuts down and returns 1), then writes ``<control socket path>\\n`` to file
    descriptor ``ready`` (if given) and closes it, so a spawner knows it can connect.
    """
    daemon = Daemon(
        directory,
        limits,
        allowed_dirs,
        busy_poll,
        exit_when_idle,
        server_tls,
        open_defaults,
        remote_images=remote_images,
        config=config,
    )
    try:
        await daemon.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", daemon.control_path, exc)
        return 1
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(daemon.shutdown()))
    if boot is not None:
        try:
            await boot(daemon)
        except Exception as exc:
            log.error("%s", exc)
            await daemon.shutdown()
            return 1
    if ready is not None:
        os.write(ready, f"{daemon.control_path}\n".encode())
        os.close(ready)
    await daemon.stopped.wait()
    log.info("exiting")
    return 0
