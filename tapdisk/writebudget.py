"""The per-process budget for WRITE payloads still arriving from clients.

A WRITE's payload buffer is allocated when its header arrives and filled as the
client sends; a client that sends the header of a 32 MiB write and then one
byte a second pins 32 MiB for as long as it likes.  Every connection of a
process reserves its payload in one ``PayloadBudget`` (budget.py) first:

1. the header of a WRITE whose payload has not all arrived is decoded;
2. the connection's ``Reservation`` asks the budget for the payload's length;
   granted at once when it fits (and nobody waits before it), else the
   connection stops reading and waits in line;
3. the payload arrived, or the connection closed: the bytes go back and
   waiters are granted in arrival order.

A payload larger than the whole budget is granted when nothing else is
reserved, so memory held for partial payloads stays within
``max(limit, largest payload)``; reads and writes that arrive whole need no
reservation, so other clients are served while writers wait.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .budget import MiB, PayloadBudget

#: Payload bytes still arriving that one process holds at most unless told otherwise.
DEFAULT_WRITE_BUDGET: Final = 256 * MiB


class Reservation:
    """What one connection holds of a budget: the payload it receives, or waits for."""

    __slots__ = ("_budget", "_then", "held", "waiting")

    def __init__(self, budget: PayloadBudget) -> None:
        self._budget = budget
        self.held = 0
        #: Bytes waited for (0: not waiting).
        self.waiting = 0
        self._then: Callable[[], None] | None = None

    def hold(self, nbytes: int, granted: Callable[[], None]) -> bool:
        """Give back what is held and hold ``nbytes`` instead: False while waiting for
        them (``granted`` is called once they are held)."""
        if self.held:
            self._budget.release(self.held)
            self.held = 0
        if not nbytes or self._budget.reserve(self, nbytes, self._granted):
            self.held = nbytes
            return True
        self.waiting, self._then = nbytes, granted
        return False

    def _granted(self, nbytes: int) -> None:
        self.held, self.waiting = nbytes, 0
        assert self._then is not None
        self._then()

    def close(self) -> None:
        """The connection closed: stop waiting, give everything back."""
        self._budget.cancel(self)
        self.waiting = 0
        if self.held:
            self._budget.release(self.held)
            self.held = 0


#: The budget shared by every server of a process that is not given one.
PROCESS_BUDGET: Final = PayloadBudget(DEFAULT_WRITE_BUDGET)
