"""Online commit: merge an image below a running device's leaf into its parent, then drop it.

This is how XCP-ng's storage manager coalesces QCOW2 chains that a VM has open
(``tap-ctl commit``, ``query`` and ``cancel``, its ``coalesceOnline``): the tapdisk
holding the chain does the work, so no other process writes under its caches.  A
``CommitJob``'s life, in order:

1. **Start**: find the image in the device's chain (by real path), which must be a
   QCOW2 image below the leaf, with a parent at least its size; open that parent
   read-write (a second handle: the chain's own stays read-only).  A failure here is
   the caller's error and the device never noticed.
2. **Copy**: what the image holds itself goes into the parent (``copy_own_clusters``:
   data copied, zeroed ranges zeroed, the rest skipped), in the background, between
   guest requests; the guest's writes go to the leaf, which nothing here touches, and
   its reads of the image's ranges are still served by the image, unchanged.  The
   parent is flushed, then closed.
3. **Drop**: the parent is opened afresh read-only (the chain's old handle cached the
   parent's tables from before the copy), the image above is rewritten on disk to name
   the parent (``rewrite_backing``, as ``qemu-img rebase -u`` would), and behind a brief
   drain (``VBD.swap``) reads through it go to the fresh parent and the image and the
   old parent handle are closed: no file of it stays open.

The status ``query`` reports: ``running`` during the copy, ``concluded`` once the image
is out of the chain.  A job that failed or was cancelled (``cancel``, or a pause or
close of the device, which cancels it first) never reports ``concluded``: the storage
manager would then point the image's children at a parent that lacks its data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from typing import Any

from tapdisk.drivers.backing import open_backing
from tapdisk.drivers.base import Image, ImageError
from tapdisk.drivers.commit import copy_own_clusters
from tapdisk.drivers.qcow2.image import Qcow2Image
from tapdisk.drivers.qcow2.rebase import rewrite_backing
from tapdisk.drivers.registry import OpenOptions, open_image

from .config import image_path
from .vbd import VBD, VBDError

log = logging.getLogger("tapdisk.commit")

#: What ``query`` says of a job: copying, done (the image is out of the chain), or ended
#: without its data being usable.
RUNNING, CONCLUDED, FAILED, CANCELLED = "running", "concluded", "failed", "cancelled"


class CommitJob:
    """One online commit of one image of a VBD's chain; ``status()`` is what ``query`` asks."""

    def __init__(self, vbd: VBD, path: str, options: OpenOptions) -> None:
        self.vbd = vbd
        self.path = path
        self.options = options
        self.state = RUNNING
        self.error: str | None = None
        self.done = 0
        self.total = 0
        self.task: asyncio.Task[None] | None = None
        #: The image is being taken out of the chain: too late to cancel, too short to wait.
        self._dropping = False

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def status(self) -> dict[str, Any]:
        """COMMIT-STATUS (tapdisk/ctl/protocol.py)."""
        return {
            "state": self.state,
            "path": self.path,
            "done": self.done,
            "total": self.total,
            "error": self.error,
        }

    # -- 1. start ----------------------------------------------------------------

    async def start(self) -> None:
        """Check the image, open its parent read-write and copy in the background.

        Raises VBDError or ImageError naming the problem; the device is untouched then.
        """
        image, child = self._find()
        parent = image.backing
        assert parent is not None
        if parent.size < image.size:
            raise VBDError(
                f"{self.path} has {image.size} bytes but its parent {parent.spec} only "
                f"{parent.size}; grow the parent first"
            )
        options = dataclasses.replace(self.options, read_only=False, direct=False)
        target = await asyncio.to_thread(open_image, parent.spec, options)
        if target.read_only:
            await target.close()
            raise VBDError(f"cannot commit {self.path} into {parent.spec}: it is read-only")
        self.total = image.size
        log.info("%s: committing %s into %s", self.vbd.name, self.path, parent.spec)
        self.task = asyncio.ensure_future(self._run(image, child, target))

    def _find(self) -> tuple[Qcow2Image, Qcow2Image]:
        """The image to commit and the image above it, both QCOW2; VBDError otherwise."""
        chain = self.vbd.chain_images()
        if not chain:
            raise VBDError(f"{self.vbd.name} is paused: its chain is closed")
        wanted = os.path.realpath(self.path)
        for depth, image in enumerate(chain):
            where = image_path(image.spec)
            if where is None or os.path.realpath(where) != wanted:
                continue
            if depth == 0:
                raise VBDError(
                    f"{self.path} is {self.vbd.name}'s leaf, which the guest writes; only an "
                    "image below it can be committed while the device runs"
                )
            child = chain[depth - 1]
            if not isinstance(image, Qcow2Image) or not isinstance(child, Qcow2Image):
                raise VBDError(
                    f"cannot commit {image.spec} under {child.spec} online: "
                    "only a QCOW2 image below a QCOW2 image"
                )
            if image.backing is None:
                raise VBDError(f"{self.path} has no parent to commit into")
            return image, child
        names = ", ".join(image.spec for image in chain)
        raise VBDError(f"{self.path} is not in {self.vbd.name}'s chain ({names})")

    # -- 2. copy, 3. drop ----------------------------------------------------------

    async def _run(self, image: Qcow2Image, child: Qcow2Image, target: Image) -> None:
        try:
            try:
                await copy_own_clusters(image, target, image.own_status, self._progress)
            finally:
                await target.close()
            self._dropping = True
            await self._drop(image, child)
            self.state = CONCLUDED
            log.info("%s: committed %s; it is out of the chain", self.vbd.name, self.path)
        except asyncio.CancelledError:
            self._end(
                CANCELLED, "stopped by tap-ctl cancel, a pause or a close; the chain is as it was"
            )
            raise
        except (OSError, ImageError, VBDError) as exc:
            self._end(FAILED, str(exc))

    def _progress(self, done: int, _total: int) -> None:
        self.done = done

    def _end(self, state: str, reason: str) -> None:
        self.state = state
        self.error = reason
        log.error("%s: commit of %s %s: %s", self.vbd.name, self.path, state, reason)

    async def _drop(self, image: Qcow2Image, child: Qcow2Image) -> None:
        """Point ``child`` at ``image``'s parent, on disk and in memory, and close ``image``.

        The header is rewritten (and synced, which also writes back the guest's data in
        ``child``) before the drain: the parent already holds all of ``image``'s data, so
        either name is right on disk, and the drain only moves references."""
        name, fmt = _backing_name_for(child, image)
        fresh = await asyncio.to_thread(open_backing, child.path, name, fmt, self.options)

        async def unlink(top: Image) -> Image:
            if child.backing is not image:
                raise VBDError(f"{self.vbd.name}'s chain changed during the commit")
            stale, image.backing = image.backing, None
            child.backing = fresh
            await image.close()
            if stale is not None:
                await stale.close()
            return top

        try:
            await asyncio.to_thread(rewrite_backing, child, name, fmt)
            await self.vbd.swap(unlink)
        except BaseException:
            if child.backing is not fresh:
                await fresh.close()
            raise

    async def cancel(self) -> None:
        """Stop the copy if it runs: the chain is as it was when this returns, or, if the
        image was already being taken out of it, without the image."""
        task = self.task
        if task is None or task.done():
            return
        if not self._dropping:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _backing_name_for(child: Qcow2Image, image: Qcow2Image) -> tuple[str, str | None]:
    """The name (and format) ``child`` is to record for ``image``'s parent: the name
    ``image`` records, if it holds from ``child``'s directory too, else the absolute path."""
    name = image.backing_name
    assert name is not None
    fmt = image.ext.backing_format
    if os.path.isabs(name) or ":" in name.partition("/")[0]:
        return name, fmt  # absolute, or an NBD URI or cluster image
    if os.path.dirname(child.path) == os.path.dirname(image.path):
        return name, fmt
    return os.path.normpath(os.path.join(os.path.dirname(image.path), name)), fmt
