"""A budget of payload bytes shared by a process's connections, granted first come first served.

Memory a client makes a tapdisk hold for it (WRITE payloads still arriving,
writebudget.py; read replies it has not taken yet, replybudget.py) is reserved
in a ``PayloadBudget`` first:

1. a connection asks ``reserve`` for some bytes: granted at once when they fit
   (and nobody waits before it), else it waits in line and stops reading;
2. ``release`` gives bytes back and grants waiters in arrival order, calling
   back each one granted with the bytes now reserved for it;
3. ``cancel`` forgets a waiter whose connection closed.

A reservation larger than the whole budget is granted when nothing else is
reserved, so the bytes held stay within ``max(limit, largest reservation)``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Final

MiB: Final = 1024 * 1024


class PayloadBudget:
    """Bytes a process may hold for its clients, granted first come first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Bytes reserved now.
        self.used = 0
        # Insertion ordered: the first waiter is the oldest.
        self._waiting: dict[Hashable, tuple[int, Callable[[int], None]]] = {}

    @property
    def waiting(self) -> int:
        """Connections waiting for a reservation."""
        return len(self._waiting)

    def reserve(self, waiter: Hashable, nbytes: int, granted: Callable[[int], None]) -> bool:
        """Reserve ``nbytes`` now (True), or queue ``waiter``: ``granted(nbytes)`` is called
        once they are reserved for it."""
        if not self._waiting and self._fits(nbytes):
            self.used += nbytes
            return True
        self._waiting[waiter] = (nbytes, granted)
        return False

    def release(self, nbytes: int) -> None:
        """Give back a reservation and grant whoever now fits."""
        self.used -= nbytes
        self._grant()

    def cancel(self, waiter: Hashable) -> None:
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
            granted(nbytes)
