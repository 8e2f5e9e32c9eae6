"""What an NBD server serves: an image under a name, with the flags its capabilities allow.

``Export`` turns an image's capabilities into the transmission flags and the
``ExportInfo`` a client learns in the handshake; ``DirectAttach`` names the
export a socket without handshake (the kernel's nbd driver) is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from tapdisk.drivers.base import Image

from .nbd.constants import TransmissionFlag
from .nbd.handshake import ExportInfo

#: Largest READ/WRITE payload we accept and advertise (the kernel's maximum).
MAX_PAYLOAD: Final = 32 * 1024 * 1024


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
    ) -> None:
        self.name = name
        #: How log messages name the export: ``label``, else its name, else the image spec.
        self.label = label or name or image.spec
        self.image = image
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
        self.info = ExportInfo(
            name=name,
            size=image.size,
            flags=flags,
            description=description,
            min_block=image.block_size,
            preferred_block=max(4096, image.block_size),
            max_payload=MAX_PAYLOAD,
            block_status=caps.extents,
        )


@dataclass(frozen=True, slots=True)
class DirectAttach:
    """Settings for a socket that skips the handshake (the kernel's nbd driver)."""

    export: str
    flags: TransmissionFlag | None = None  # None: the export's own flags
