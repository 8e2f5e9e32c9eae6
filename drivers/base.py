"""The one interface every image format and stackable layer implements.

Shaped after nbdkit's plugin/filter table: a small set of async callbacks over
byte offsets.  Nothing here knows about NBD or sockets; the server maps these
calls onto protocol commands and maps raised ``OSError`` errnos onto NBD error
codes.  A layer (fault injector, changed-block tracking, mirror) is an ``Image``
that holds another ``Image`` and forwards to it (``layer.Layer``), so stacks
compose without change.

Buffers are caller-owned ``memoryview`` objects: a driver reads into them or
writes from them and never keeps a reference after the call returns.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass


class ImageError(Exception):
    """An image cannot be opened or used; the message names the file and field."""


class ImageFormatError(ImageError):
    """On-disk metadata is malformed, inconsistent or hostile."""


class ExtentFlags(enum.IntFlag):
    """Allocation state of a byte range, with the same bits as NBD base:allocation."""

    DATA = 0
    HOLE = 1  # not allocated in this image or anything below it
    ZERO = 2  # reads as zeros


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with one allocation state."""

    length: int
    flags: ExtentFlags


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an image can do natively; the server advertises NBD flags from this.

    ``flush``/``fua``: durability requests are honoured.  ``trim``: discard
    frees space.  ``zero``: write_zeroes is supported (perhaps emulated).
    ``fast_zero``: write_zeroes is cheaper than writing zeros, so a FAST_ZERO
    request can be honoured.  ``extents``: block status is meaningful.
    ``multi_conn``: all connections see one consistent cache, so a flush on one
    covers writes on every other.  ``cache``: prefetch is meaningful.
    """

    flush: bool = True
    fua: bool = True
    trim: bool = False
    zero: bool = True
    fast_zero: bool = False
    extents: bool = False
    multi_conn: bool = True
    cache: bool = False


#: What ``Image.start_read``/``start_write`` call when the request ends: None, or the
#: exception it raised.
IoDone = Callable[[BaseException | None], None]


class Image(abc.ABC):
    """An opened disk image, a chain of images, or a layer over another image.

    Offsets and lengths are in bytes and already checked by the caller to lie
    inside ``[0, size)``.  Failures raise ``OSError`` with a meaningful errno
    (EIO, ENOSPC, EPERM...) or ``ImageError`` for metadata problems.
    """

    #: Human-readable ``type:path`` the image was opened from.
    spec: str
    #: Virtual disk size in bytes.
    size: int
    #: True when writes, discards and zeroing must be refused.
    read_only: bool
    #: The image below this one in a chain (a backing file), opened read-only; None if none.
    backing: Image | None = None
    #: Bytes the image above this one in a chain read from it, and those of such reads that
    #: failed (counted by VHD, blktap's chain format): ``tap-ctl stats`` reports, per image,
    #: what it served itself, as blktap does, by taking off what it read from its backing.
    child_read_bytes: int = 0
    child_failed_bytes: int = 0
    #: Smallest I/O granularity clients should use (power of two); 1 = any.
    block_size: int = 1

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this image supports natively."""

    @property
    def format_name(self) -> str:
        """Short format name (``raw``, ``vhd``, ``qcow2``...) for stats and metrics."""
        return self.spec.partition(":")[0]

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        """Fill ``buf`` without blocking if the data is at hand (page cache, memory).

        Returns False, having read nothing usable, when the read would block;
        the caller then awaits ``read``.  This is the hot-path shortcut that
        keeps cache hits off the thread pool.
        """
        return False

    @abc.abstractmethod
    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` with the bytes at ``offset``."""

    def start_read(self, offset: int, buf: memoryview, done: IoDone) -> bool:
        """Start filling ``buf`` without a task, for an image whose library completes
        requests itself (librbd): ``done(None)``, or ``done(exc)`` with what ``read`` would
        have raised, is called later on the event loop, never before this returns.

        Returns False, having started nothing, when the image cannot (most cannot: their
        reads block a thread); the caller then awaits ``read``.  ``buf`` must stay valid
        until ``done`` runs.
        """
        return False

    def start_write(self, offset: int, data: memoryview, fua: bool, done: IoDone) -> bool:
        """``write`` as ``start_read`` reads: started now, ``done`` called on the loop once
        the write is complete (durable too with ``fua``).  ``data`` must stay valid and
        unchanged until then.  False: nothing started, the caller awaits ``write``.
        """
        return False

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        """Write ``data`` without blocking on I/O if the image can (page cache).

        Returns False, having written nothing, when the caller must await
        ``write`` instead.  Never used for FUA writes.  ``data`` may be borrowed
        from the server's receive buffer: it is valid only during this call, so
        nothing may keep it (a layer that queues the write must copy it).
        """
        return False

    @abc.abstractmethod
    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write all of ``data`` at ``offset``; durable before returning if ``fua``."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        """Hint that the range is unused; contents afterwards are unspecified.

        The default does nothing, which is always correct for a hint.
        """

    @abc.abstractmethod
    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        """Make the range read as zeros.

        ``may_unmap`` allows deallocating the range (NBD without NO_HOLE).
        ``fast_only`` asks to fail with ``ENOTSUP`` rather than fall back to
        writing zero buffers (NBD FAST_ZERO).
        """

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation state from ``offset``: consecutive extents, at least one.

        The extents may cover less than ``length`` (the caller asks again) or run
        past it.  The default reports everything as allocated data, which is
        always safe.
        """
        return [Extent(length, ExtentFlags.DATA)]

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch hint; the default does nothing."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release files and memory; the image is unusable afterwards."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} size={self.size}>"
