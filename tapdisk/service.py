"""``tapdisk service``: the daemon that ``tapdisk.service`` runs at boot.

It is an ordinary tapdisk daemon (control socket, tap-ctl works on it) that first
opens and attaches every device listed under ``devices`` in the configuration, in
order, through the same control operations tap-ctl uses.  Only when all of them
are attached does it tell systemd ``READY=1``, so units ordered after
tapdisk.service find their ``/dev/nbdN``.  If one fails, the devices already
attached are detached and the process exits 1 with a message naming the failing
device: a boot never leaves half of the configuration attached.  SIGTERM (systemctl
stop) detaches and closes every device before exiting.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from tapdisk.ctl import protocol

from . import config as configuration
from . import logs, sdnotify, tls
from .daemon import recovery
from .daemon.command import run
from .daemon.operations import Daemon
from .loop import run_loop
from .scheduler import SchedulerLimits

log = logging.getLogger("tapdisk.service")

#: Settings of the configuration file the service uses (and the flags that override them).
CONFIG_KEYS = (
    "retry_deadline",
    "queue_depth",
    "merge_size",
    "busy_poll",
    "control_dir",
    "allowed_dirs",
)

EXAMPLES = """\
examples:
  tapdisk service                                   as tapdisk.service runs it
  tapdisk service --config /etc/tapdisk/tapdisk.yaml --control-dir /run/blktap-control
  tap-ctl list                                      the attached devices, afterwards
"""


class ServiceError(Exception):
    """A configured device could not be opened or attached."""


async def _call(daemon: Daemon, op: str, **args: Any) -> Any:
    response = await daemon.handle_message(protocol.Request(0, op, args).to_message())
    recovery.sync(daemon)
    if not response.ok:
        raise ServiceError(response.message)
    return response.result


async def attach_configured(daemon: Daemon, devices: Sequence[configuration.DeviceEntry]) -> None:
    """Open and attach each configured device, then report readiness to systemd."""
    for number, device in enumerate(devices, 1):
        sdnotify.status(f"attaching {device.spec} ({number} of {len(devices)})")
        try:
            info = await _call(daemon, "open", spec=device.spec, read_only=device.read_only)
            wanted = {} if device.device is None else {"index": device.device}
            info = await _call(daemon, "connect", minor=info["minor"], **wanted)
        except ServiceError as exc:
            raise ServiceError(f"device {number} ({device.spec}): {exc}") from None
        log.info("%s: %s attached (minor %d)", info["device"], device.spec, info["minor"])
    sdnotify.ready(f"{len(devices)} devices attached")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    configuration.add_arguments(parser, keys=CONFIG_KEYS)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``tapdisk service`` subcommand."""
    parser = sub.add_parser(
        "service",
        help="run the boot-time daemon: attach the configured devices, detach on SIGTERM",
        description=__doc__.partition("\n\n")[2].replace("``", ""),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)


def main(args: argparse.Namespace, log_level: str | None) -> int:
    """Entry point of ``tapdisk service``; ``log_level`` from the command line wins."""
    try:
        config = configuration.from_arguments(args, CONFIG_KEYS)
    except configuration.ConfigError as exc:
        print(f"tapdisk service: {exc}", file=sys.stderr)
        return 1
    logs.setup(log_level or config.log_level)
    try:
        server_tls = tls.server_tls(tls.configured(config))
    except tls.TLSConfigError as exc:
        log.error("%s", exc)
        return 1
    limits = SchedulerLimits(
        queue_depth=config.queue_depth, max_merge=config.merge_size, timeout=config.retry_deadline
    )

    async def boot(daemon: Daemon) -> None:
        await attach_configured(daemon, config.devices)

    return run_loop(
        run(
            config.control_dir,
            limits,
            boot=boot,
            allowed_dirs=config.allowed_dirs,
            busy_poll=config.busy_poll,
            server_tls=server_tls,
            open_defaults=configuration.open_defaults(config),
            remote_images=config.remote_images,
        )
    )
