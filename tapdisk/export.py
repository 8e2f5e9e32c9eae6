"""What an NBD server serves: an image under a name, its flags and its metadata contexts.

``Export`` turns an image's capabilities into the transmission flags and the
``ExportInfo`` a client learns in the handshake, and answers block status for
the metadata contexts it offers: ``base:allocation`` from the image's extents
and, while the device tracks changed blocks in a CBT log, ``qemu:dirty-bitmap:cbt``
(flag 1 for each block the log marks, as qemu answers for a dirty bitmap).
``DirectAttach`` names the export a socket without handshake (the kernel's nbd
driver) is served.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace
from typing import Final, Protocol

from tapdisk.drivers.base import Image

from .nbd.constants import (
    BASE_ALLOCATION,
    FAST_ZERO_BIT,
    FUA_BIT,
    NO_HOLE_BIT,
    Command,
    CommandFlag,
    TransmissionFlag,
)
from .nbd.handshake import ExportInfo
from .nbd.transmission import MAX_EXTENTS, Request, block_status_chunk

#: Largest READ/WRITE payload we accept and advertise (the kernel's maximum).
MAX_PAYLOAD: Final = 32 * 1024 * 1024
#: The metadata context of the blocks a CBT log marks.
CBT_CONTEXT: Final = "qemu:dirty-bitmap:cbt"
#: Its flag for a marked (changed) block; unchanged blocks have none.
DIRTY: Final = 1


class ChangedBlocks(Protocol):
    """A device that may track changed blocks: a VBD, with or without a CBT log."""

    @property
    def cbt_log(self) -> str | None:
        """The log the device marks; None while it tracks nothing."""

    async def changed_extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Runs of changed (True) and unchanged bytes from ``offset``."""


class Export:
    """An image served under a name, with the NBD flags its capabilities allow."""

    def __init__(
        self,
        name: str,
        image: Image,
        *,
        read_only: bool = False,
        description: str = "",
        label: str = "",
        changes: ChangedBlocks | None = None,
    ) -> None:
        """``changes``: where the CBT context's answers come from (the VBD ``image`` is)."""
        self.name = name
        #: How log messages name the export: ``label``, else its name, else the image spec.
        self.label = label or name or image.spec
        self.image = image
        self.changes = changes
        self.read_only = read_only or image.read_only
        caps = image.capabilities
        flags = TransmissionFlag.HAS_FLAGS
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        if caps.flush:
            flags |= TransmissionFlag.SEND_FLUSH
            if caps.fua:
                flags |= TransmissionFlag.SEND_FUA
        if not self.read_only:
            if caps.trim:
                flags |= TransmissionFlag.SEND_TRIM
            if caps.zero:
                flags |= TransmissionFlag.SEND_WRITE_ZEROES
                if caps.fast_zero:
                    flags |= TransmissionFlag.SEND_FAST_ZERO
        if caps.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if caps.cache:
            flags |= TransmissionFlag.SEND_CACHE
        self._info = ExportInfo(
            name=name,
            size=image.size,
            flags=flags,
            description=description,
            min_block=image.block_size,
            preferred_block=max(4096, image.block_size),
            max_payload=MAX_PAYLOAD,
            contexts=(BASE_ALLOCATION,) if caps.extents else (),
        )

    @property
    def info(self) -> ExportInfo:
        """What a client learns in the handshake: the CBT context only while the device tracks."""
        if self.changes is None or self.changes.cbt_log is None:
            return self._info
        return replace(self._info, contexts=(*self._info.contexts, CBT_CONTEXT))

    async def perform(
        self, request: Request, contexts: tuple[tuple[int, str], ...]
    ) -> list[bytes] | None:
        """Carry out a request other than READ and DISC on the image (checked already):
        the reply chunks of a BLOCK_STATUS, else None for a plain success.  Failures
        raise as the image does."""
        image, command, flags, offset, length = (
            self.image,
            request.command,
            request.flags,
            request.offset,
            request.length,
        )
        fua = bool(flags & FUA_BIT)
        if command == Command.BLOCK_STATUS:
            return await self.block_status(contexts, request)
        if not length and command != Command.FLUSH:
            return None  # a zero-length request does nothing
        if command == Command.WRITE:
            await image.write(offset, memoryview(request.payload), fua)  # type: ignore[arg-type]
        elif command == Command.FLUSH:
            await image.flush()
        elif command == Command.TRIM:
            await image.discard(offset, length, fua)
        elif command == Command.WRITE_ZEROES:
            await image.write_zeroes(
                offset,
                length,
                may_unmap=not flags & NO_HOLE_BIT,
                fast_only=bool(flags & FAST_ZERO_BIT),
                fua=fua,
            )
        elif command == Command.CACHE:
            await image.cache(offset, length)
        return None

    async def block_status(
        self, contexts: tuple[tuple[int, str], ...], request: Request
    ) -> list[bytes]:
        """The reply to a BLOCK_STATUS: one chunk per selected context, the last one DONE.

        The extents of a context run on from the request's offset, equal neighbours
        merged, until they cover its length or number MAX_EXTENTS; REQ_ONE keeps the
        first only.  A zero-length request raises OSError (EINVAL).
        """
        offset, length = request.offset, request.length
        if not length:
            raise OSError(errno.EINVAL, "zero-length block status")
        one = bool(request.flags & CommandFlag.REQ_ONE)
        chunks = []
        last = len(contexts) - 1
        for context_id, name in contexts:
            if name == CBT_CONTEXT:
                assert self.changes is not None  # offered only with a source
                changed = await self.changes.changed_extents(offset, length)
                runs = [(run, DIRTY if dirty else 0) for run, dirty in changed]
            else:
                extents = await self.image.extents(offset, length)
                runs = [(extent.length, int(extent.flags)) for extent in extents]
            pairs, done = _clip(runs, length, one), len(chunks) == last
            chunks.append(block_status_chunk(request.cookie, context_id, pairs, done=done))
        return chunks


def _clip(runs: list[tuple[int, int]], length: int, one: bool) -> list[tuple[int, int]]:
    """``runs`` merged where their flags are equal, cut at ``length`` bytes and MAX_EXTENTS."""
    pairs: list[tuple[int, int]] = []
    remaining = length
    for run, flags in runs:
        run = min(run, remaining)
        if run <= 0:
            break
        if pairs and pairs[-1][1] == flags:
            pairs[-1] = (pairs[-1][0] + run, flags)
        else:
            pairs.append((run, flags))
        remaining -= run
        if len(pairs) >= MAX_EXTENTS:
            break
    return pairs[:1] if one else pairs


@dataclass(frozen=True, slots=True)
class DirectAttach:
    """Settings for a socket that skips the handshake: the kernel's nbd driver, or a
    connection handed over by a predecessor process with what it had negotiated."""

    export: str
    flags: TransmissionFlag | None = None  # None: the export's own flags
    structured: bool = False
    #: The (id, name) of each metadata context the client selected.
    contexts: tuple[tuple[int, str], ...] = ()
    #: Bytes the predecessor read from the socket and did not decode: decoded first.
    unread: bytes = b""
