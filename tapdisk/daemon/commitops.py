"""The control operations of online commit: ``commit``, ``commit_status``, ``commit_cancel``.

The job itself is tapdisk/commitjob.py; here it is started on a device, reported the way
blktap's ``query`` reports it (an ended job once, then ``undefined``), cancelled, and
stopped before anything closes the device's chain under it (pause, snapshot, close).
"""

from __future__ import annotations

from typing import Any

from ..commitjob import CommitJob
from .device import Device
from .errors import ControlError

#: COMMIT-STATUS when no job runs or waits to be reported.
UNDEFINED: dict[str, Any] = {
    "state": "undefined",
    "path": None,
    "done": 0,
    "total": 0,
    "error": None,
}


async def start(device: Device, path: str) -> dict[str, Any]:
    """Start committing ``path`` on ``device``; its COMMIT-STATUS once the copy runs."""
    if (running := device.running_commit) is not None:
        raise ControlError("state", f"minor {device.minor} is already committing {running.path}")
    if device.running_migration is not None:
        raise ControlError(
            "state", f"minor {device.minor} is being migrated; commit once tap-ctl mirror ends"
        )
    job = CommitJob(device.vbd, path, device.vbd.options)
    await job.start()
    device.commit = job
    return job.status()


def status(device: Device) -> dict[str, Any]:
    """The job's COMMIT-STATUS; an ended job is forgotten once reported."""
    job = device.commit
    if job is None:
        return dict(UNDEFINED)
    if not job.running:
        device.commit = None
    return job.status()


async def cancel(device: Device) -> dict[str, Any]:
    """Stop the job (the chain stays as it was); its COMMIT-STATUS once it has stopped."""
    job = device.commit
    if job is None:
        return dict(UNDEFINED)
    await job.cancel()
    return job.status()


def refuse_during(device: Device, what: str) -> None:
    """Refuse to start ``what`` (a migration) while a job runs on ``device``'s chain."""
    job = device.running_commit
    if job is not None:
        raise ControlError(
            "state",
            f"minor {device.minor} is committing {job.path}; {what} once it ends "
            "(tap-ctl query), or stop it (tap-ctl cancel)",
        )


async def stop(device: Device) -> None:
    """Cancel a running job before the device's chain closes (pause, snapshot, close)."""
    job = device.running_commit
    if job is not None:
        await job.cancel()
