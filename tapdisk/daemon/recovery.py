"""Recovery: keeping the VBD records, and taking the VBDs of a tapdisk that died.

``sync`` writes the record of every VBD this daemon serves (``tapdisk.ctl.records``)
after each control operation, and ``forget`` removes them at shutdown.  ``adopt``
is the ``adopt`` operation: from a live predecessor by hand-over (``handover.py``),
or, with ``recover``, from the records of one that is gone (``tap-ctl restart``'s
fallback, once it has found the predecessor dead or killed it as wedged):

1. Bind each minor the dead tapdisk recorded; the lock fails if any process still
   holds it, so a live tapdisk's VBDs are never taken this way.
2. Open each image as recorded (spec, read-only, retry deadline, CBT log,
   secondary) and listen on the recorded NBD socket path, whose clients lost their
   connections with the dead process and reconnect there; pause it again if it was
   paused.
3. Take over each recorded ``/dev/nbdN`` with RECONFIGURE (``handoff.takeover``):
   the kernel kept the device and its requests for ``KERNEL_DEAD_CONN_TIMEOUT`` and
   resends those it lost when their request timeout fires.

Any failure closes what was opened and unbinds every minor, so a later try starts
from the same records.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tapdisk.ctl import minors, records
from tapdisk.ctl.records import Record

from . import handoff, handover
from .device import Device
from .errors import ControlError
from .minors import Minor

log = logging.getLogger("tapdisk.daemon")


def record_of(daemon: handover.Daemon, minor: Minor, device: Device) -> Record:
    vbd = device.vbd
    mirror = vbd.mirror
    return Record(
        pid=daemon.pid,
        minor=minor.number,
        owned=minor.owned,
        spec=device.served,  # the standby's, once it took over
        read_only=vbd.read_only,
        timeout=vbd.limits.timeout,
        cbt_log=vbd.cbt_log,
        secondary=vbd.secondary,
        standby=mirror is not None and mirror.standby,
        nbd_socket=device.nbd_socket,
        device=device.device,
        paused=vbd.paused,
    )


def sync(daemon: handover.Daemon, stopping: bool = False) -> None:
    """Bring the records of the daemon's minors up to date; not while they are handed
    over (the successor writes them then), nor once the daemon is ``stopping`` (its
    shutdown has removed them)."""
    if daemon.handing_over or stopping:
        return
    for minor in list(daemon.minors.values()):
        device = minor.device
        try:
            if device is None or device.closing:
                records.remove(daemon.directory, minor.number)
            else:
                records.write(daemon.directory, record_of(daemon, minor, device))
                _watch_mirror(daemon, device)
        except OSError as exc:
            log.warning("minor %d: record not updated: %s", minor.number, exc)


def _watch_mirror(daemon: handover.Daemon, device: Device) -> None:
    """Sync again when the device's secondary is dropped or takes over: these change the
    record outside any control operation, and a standby that took over must never be
    recovered as its full primary, which lacks every write since."""
    mirror = device.vbd.mirror
    if mirror is not None:
        mirror.on_change = lambda: sync(daemon)


def forget(daemon: handover.Daemon) -> None:
    """Remove the records of every minor: the daemon shuts down, nothing is to recover."""
    for number in daemon.minors:
        records.remove(daemon.directory, number)


async def adopt(daemon: handover.Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``adopt`` operation: every VBD of tapdisk ``pid``; VBD-INFO of each."""
    if not args.get("recover"):
        return await handover.adopt(daemon, args["pid"])
    return await recover(daemon, args["pid"])


async def recover(daemon: handover.Daemon, pid: int) -> list[dict[str, Any]]:
    """Serve every VBD recorded for the dead tapdisk ``pid`` (steps 1 to 3 above)."""
    if daemon.minors:
        raise ControlError("state", f"tapdisk {daemon.pid} already has minors: cannot recover")
    found = [record for record in records.read_all(daemon.directory) if record.pid == pid]
    if not found:
        raise ControlError("not-found", f"no VBD of tapdisk {pid} is on record")
    taken: list[tuple[Minor, Record]] = []
    try:
        for record in found:
            minor = Minor(record.minor, _bind(daemon.directory, record.minor), record.owned)
            taken.append((minor, record))
            if records.read(daemon.directory, record.minor) != record:
                raise ControlError("state", f"minor {record.minor} changed hands meanwhile")
            minor.device = await _open(daemon, record)
        for minor, record in taken:
            if record.kernel_index is not None:
                assert minor.device is not None
                await handoff.takeover(minor.device, record.kernel_index, None)
    except BaseException:
        for minor, _ in taken:
            if minor.device is not None:
                await minor.device.server.shutdown()
            minors.unbind(minor.lock_fd)
        raise
    for minor, _ in taken:
        daemon.minors[minor.number] = minor
        minors.record_device(minor.lock_fd, minor.device.device if minor.device else None)
    log.info("recovered %d minor(s) of tapdisk %d, which is gone", len(taken), pid)
    return [daemon.info(minor) for minor, _ in taken]


def _bind(directory: str, number: int) -> int:
    try:
        return minors.bind(directory, number)
    except minors.MinorError as exc:
        raise ControlError("state", f"cannot recover minor {number}: {exc}") from None


async def _open(daemon: handover.Daemon, record: Record) -> Device:
    """Open the recorded image and listen on its recorded NBD socket path."""
    path = record.nbd_socket
    if os.path.dirname(path) != daemon.directory:
        raise ControlError("invalid", f"minor {record.minor}: NBD socket {path} is not ours")
    args = {
        "spec": record.spec,
        "read_only": record.read_only,
        "cbt_log": record.cbt_log,
        "secondary": record.secondary,
        "standby": record.standby,
    }
    device = await daemon.open_adopted(record.minor, args, record.timeout, path)
    try:
        await device.server.listen_unix(path)
        if record.paused:
            await device.vbd.pause()
    except BaseException:
        await device.server.shutdown()
        raise
    return device
