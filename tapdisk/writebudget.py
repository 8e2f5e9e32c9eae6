"""The per-process budget for WRITE payloads still arriving from clients.

A WRITE's payload buffer is allocated when its header arrives and filled as the
client sends; a client that sends the header of a 32 MiB write and then one
byte a second pins 32 MiB for as long as it likes.  Every connection of a
process reserves its payload here first:

1. the header of a WRITE whose payload has not all arrived is decoded;
2. the connection asks ``reserve`` for the payload's length; granted at once
   when it fits (and nobody waits before it), else the connection stops reading
   and waits in line;
3. ``release`` (the payload arrived, or the connection closed) gives the bytes
   back and grants waiters in arrival order, calling back each one granted.

A connection keeps its side in a ``Reservation``.

A payload larger than the whole budget is granted when nothing else is
reserved, so memory held for partial payloads stays within
``max(limit, largest payload)``; reads and writes that arrive whole need no
reservation, so other clients are served while writers wait.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

MiB: Final = 1024 * 1024
#: Payload bytes still arriving that one process holds at most unless told otherwise.
DEFAULT_WRITE_BUDGET: Final = 256 * MiB


class WriteBudget:
    """Bytes of partly received WRITE payloads a process may hold, granted first come first."""

    def __init__(self, limit: int = DEFAULT_WRITE_BUDGET) -> None:
        self.limit = limit
        #: Bytes reserved now.
        self.used = 0
        # Insertion ordered: the first waiter is the oldest.
        self._waiting: dict[Reservation, tuple[int, Callable[[], None]]] = {}

    @property
    def waiting(self) -> int:
        """Connections waiting for a reservation."""
        return len(self._waiting)

    def reserve(self, waiter: Reservation, nbytes: int, granted: Callable[[], None]) -> bool:
        """Reserve ``nbytes`` now (True), or queue ``waiter``: ``granted`` is called once
        they are reserved for it."""
        if not self._waiting and self._fits(nbytes):
            self.used += nbytes
            return True
        self._waiting[waiter] = (nbytes, granted)
        return False

    def release(self, nbytes: int) -> None:
        """Give back a reservation and grant whoever now fits."""
        self.used -= nbytes
        self._grant()

    def cancel(self, waiter: Reservation) -> None:
        """Forget a waiter that went away (its connection closed)."""
        if self._waiting.pop(waiter, None) is not None:
            self._grant()

    def _fits(self, nbytes: int) -> bool:
        return not self.used or self.used + nbytes <= self.limit

    def _grant(self) -> None:
        while self._waiting:
            waiter, (nbytes, granted) = next(iter(self._waiting.items()))
            if not self._fits(nbytes):
                return
            del self._waiting[waiter]
            self.used += nbytes
            waiter.held, waiter.waiting = nbytes, 0
            granted()


class Reservation:
    """What one connection holds of a budget: the payload it receives, or waits for."""

    __slots__ = ("_budget", "held", "waiting")

    def __init__(self, budget: WriteBudget) -> None:
        self._budget = budget
        self.held = 0
        #: Bytes waited for (0: not waiting).
        self.waiting = 0

    def hold(self, nbytes: int, granted: Callable[[], None]) -> bool:
        """Give back what is held and hold ``nbytes`` instead: False while waiting for
        them (``granted`` is called once they are held)."""
        if self.held:
            self._budget.release(self.held)
            self.held = 0
        if not nbytes or self._budget.reserve(self, nbytes, granted):
            self.held = nbytes
            return True
        self.waiting = nbytes
        return False

    def close(self) -> None:
        """The connection closed: stop waiting, give everything back."""
        self._budget.cancel(self)
        self.waiting = 0
        if self.held:
            self._budget.release(self.held)
            self.held = 0


#: The budget shared by every server of a process that is not given one.
PROCESS_BUDGET: Final = WriteBudget()
