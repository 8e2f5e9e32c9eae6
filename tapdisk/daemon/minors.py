"""``Minor``: a minor attached to this daemon (blktap's VBD), and the device opened on it.

A minor is attached (its marker locked, ``tapdisk.ctl.minors.bind``) from ``attach`` to
``detach``; an image is opened on it and closed again any number of times in between.
An ``open`` without a minor allocates and attaches one itself (``owned``); the daemon
frees those when it shuts down, the others are freed by whoever allocated them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tapdisk.ctl import protocol

from .device import Device


@dataclass
class Minor:
    """A minor attached to this daemon."""

    number: int
    #: The marker file, locked while the minor is attached here.
    lock_fd: int
    #: Allocated by this daemon (an open without a minor): freed at its shutdown.
    owned: bool = False
    #: The image opened on it, if any.
    device: Device | None = None
    #: An image was opened and closed on it (blktap's CLOSED).
    closed: bool = False

    @property
    def state(self) -> int:
        """blktap's state bits (``protocol.STATE_*``)."""
        if self.device is not None:
            return self.device.state
        return protocol.STATE_CLOSED if self.closed else 0
