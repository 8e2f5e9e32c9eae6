"""``Device``: one opened VBD of a daemon, with its minor, its NBD server and its kernel index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tapdisk.ctl import protocol

from ..migration import Migration
from ..server import NBDServer
from ..vbd import VBD

#: blktap counts in sectors of this size.
SECTOR = 512


@dataclass
class Device:
    """One opened VBD of this daemon."""

    minor: int
    #: The image as it was given (``aio:`` stays ``aio:``), or the overlay of a snapshot.
    spec: str
    vbd: VBD
    server: NBDServer
    nbd_socket: str
    kernel_index: int | None = None
    closing: bool = False
    #: The last unpause failed: the device is still paused.
    resume_failed: bool = False
    #: The live migration (``tap-ctl mirror``) started last, running or finished.
    migration: Migration | None = None

    @property
    def state(self) -> int:
        """blktap's state bits (``protocol.STATE_*``)."""
        state = 0
        if self.vbd.pausing:
            state |= protocol.STATE_PAUSE_REQUESTED | protocol.STATE_QUIESCE_REQUESTED
        if self.vbd.paused:
            state |= protocol.STATE_PAUSED | protocol.STATE_QUIESCED | protocol.STATE_CLOSED
        if self.resume_failed:
            state |= protocol.STATE_RESUME_FAILED
        if self.closing:
            state |= protocol.STATE_SHUTDOWN_REQUESTED
        return state

    @property
    def device(self) -> str | None:
        return None if self.kernel_index is None else f"/dev/nbd{self.kernel_index}"

    def stats(self, pid: int) -> dict[str, Any]:
        """STATS (``tapdisk/ctl/protocol.py``): blktap's keys, this project's under ``vbd``."""
        vbd = self.vbd
        counters = vbd.stats
        # As blktap counts: every sector read or written, failed or not, and the failed ones.
        failed = [counters.bytes_read_failed // SECTOR, counters.bytes_written_failed // SECTOR]
        read = counters.bytes_read // SECTOR + failed[0]
        written = counters.bytes_written // SECTOR + failed[1]
        images = []
        for depth, path in enumerate(vbd.chain()):
            leaf = depth == 0
            images.append(
                {
                    "name": path,
                    "hits": [read, written] if leaf else [0, 0],
                    "fail": failed if leaf else [0, 0],
                }
            )
        return {
            "name": self.spec,
            "secs": [read, written],
            "images": images,
            "FIXME_enospc_redirect_count": 0,
            "nbd_mirror_failed": int(vbd.mirror_failed),
            "reqs_outstanding": vbd.scheduler.in_flight,
            "read_caching": "false" if vbd.options.direct else "true",
            "vbd": {
                "pid": pid,
                "minor": self.minor,
                "device": self.device,
                "connections": len(self.server.connections),
                **vbd.stats_dict(),
            },
        }
