"""``Device``: one opened VBD of a daemon, with its minor, its NBD server and its kernel index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tapdisk.ctl import protocol

from ..commitjob import CommitJob
from ..migration import Migration
from ..server import NBDServer
from ..vbd import VBD

#: blktap counts in sectors of this size.
SECTOR = 512
#: blktap's disk type numbers (``DISK_TYPE_*``) of the image types it shares with this
#: project; others have none (null).
BLKTAP_DISK_TYPES = {"aio": 0, "vhd": 4, "qcow": 6}
#: Requests blktap's aio driver takes at once (``MAX_AIO_REQS``): its stats report it.
BLKTAP_AIO_REQUESTS = 32 * 11


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
    #: The online commit (``tap-ctl commit``) running, or ended and not yet queried.
    commit: CommitJob | None = None

    @property
    def running_migration(self) -> Migration | None:
        """The live migration, while it copies or is about to switch."""
        return self.migration if self.migration is not None and self.migration.running else None

    @property
    def running_commit(self) -> CommitJob | None:
        """The online commit, while it runs on the device's chain."""
        return self.commit if self.commit is not None and self.commit.running else None

    @property
    def served(self) -> str:
        """Spec of the image served: ``spec``, or the standby's once it took over (``-s``)."""
        return self.vbd.spec if self.vbd.taken_over else self.spec

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
        return {
            "name": self.served,
            "secs": [read, written],
            "images": self._image_stats(read, written, failed),
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

    def _image_stats(self, read: int, written: int, failed: list[int]) -> list[dict[str, Any]]:
        """blktap's ``images``: per image of the chain, leaf first, the sectors it served
        itself (``hits``: read, written; failed or not) and those that failed (``fail``), and
        its ``driver``.  Writes all go to the leaf; a read goes to the image that holds the
        data, so each image's count is what the image above read from it (the VBD's, for the
        leaf) less what it read from its own backing in turn.  A read that failed in a backing
        counts as failed there; the part of it the image above held counts as failed in that
        image too (blktap, which splits a request per image, would count it as a success)."""
        images = self.vbd.chain_images()
        result = []
        for depth, image in enumerate(images):
            leaf = depth == 0
            if leaf:
                reads, read_failures = read, failed[0]
            else:
                reads = image.child_read_bytes // SECTOR
                read_failures = image.child_failed_bytes // SECTOR
            below = image.backing
            if below is not None:
                reads -= below.child_read_bytes // SECTOR
                read_failures -= below.child_failed_bytes // SECTOR
            path = image.spec.partition(":")[2]
            kind = image.format_name
            if leaf and kind == "raw" and self.spec.endswith(f"aio:{path}"):
                kind = "aio"  # the raw driver, given as blktap's aio
            result.append(
                {
                    "name": path,
                    "hits": [max(0, reads), written if leaf else 0],
                    "fail": [max(0, read_failures), failed[1] if leaf else 0],
                    "driver": {
                        "type": BLKTAP_DISK_TYPES.get(kind),
                        "name": kind,
                        "status": self._driver_status(kind, leaf),
                    },
                }
            )
        return result

    def _driver_status(self, kind: str, leaf: bool) -> dict[str, Any] | None:
        """The driver's own stats: blktap's aio reports its requests, its vhd nothing."""
        if kind != "aio":
            return None
        pending = self.vbd.scheduler.in_flight if leaf else 0
        return {"reqs": {"max": BLKTAP_AIO_REQUESTS, "pending": pending}}
