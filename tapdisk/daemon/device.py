"""``Device``: one opened VBD of a daemon, with its minor, its NBD server and its kernel index."""

from __future__ import annotations

from dataclasses import dataclass

from tapdisk.ctl import protocol

from ..server import NBDServer
from ..vbd import VBD


@dataclass
class Device:
    """One opened VBD of this daemon."""

    minor: int
    vbd: VBD
    server: NBDServer
    nbd_socket: str
    lock_fd: int
    kernel_index: int | None = None
    closing: bool = False

    @property
    def state(self) -> int:
        state = 0
        if self.kernel_index is not None:
            state |= protocol.STATE_ATTACHED
        if self.vbd.paused:
            state |= protocol.STATE_PAUSED
        if self.vbd.pausing:
            state |= protocol.STATE_PAUSING
        if self.closing:
            state |= protocol.STATE_CLOSING
        return state

    @property
    def device(self) -> str | None:
        return None if self.kernel_index is None else f"/dev/nbd{self.kernel_index}"
