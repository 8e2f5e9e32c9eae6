"""Read replies a client has not taken yet: bounded per connection and per process.

A READ's reply buffer is allocated when the request is dispatched and freed
once the transport has sent the reply; a client that sends READs and never
receives would keep every reply it asked for.  Each connection counts its
replies' bytes in a ``ReplyAccount``, from dispatch until the transport is empty:

1. before a READ is dispatched, ``admit`` counts its length: the first
   ``OWN_BYTES`` of a connection's replies are its own (small reads at any queue
   depth never wait), the rest are reserved in the process's ``--reply-budget``
   (a ``PayloadBudget``, budget.py).  A connection already holding
   ``CONNECTION_LIMIT`` (one larger request goes alone), or whose reservation
   waits in line, is not admitted: the READ waits at the head of its backlog,
   the connection is not read, and ``reply_room`` is called once it may try again;
2. ``replied`` is told once the reply is handed to the transport (or collected
   for it): its bytes come back once the transport holds no more than its
   high-water mark, at once or at ``drained`` (resume_writing), which a client
   that does not read never lets happen.  A plain socket's transport holds the
   reply buffers themselves, so its marks are 0: paused while it holds anything,
   resumed once empty; a TLS transport holds an encrypted copy, and keeps its own;
3. ``close`` gives everything back.

So a client that never reads holds ``max(CONNECTION_LIMIT, one request)`` at most,
and all of them together the budget plus ``OWN_BYTES`` each.  The replies are
counted, never copied.  Clients that take nothing could hold the whole budget
for ever and starve everyone else's large reads: while a READ waits for the
budget, a client that has taken none of its replies for ``STALL_SECONDS`` and
holds some of the budget is closed (as admission.py closes the oldest handshake
for a newer one).  A client that reads, however slowly, keeps its replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Final, Protocol

from .budget import MiB, PayloadBudget

log = logging.getLogger("tapdisk.server")

#: Reply bytes a connection holds without the process's budget (QD32 of 4 KiB reads).
OWN_BYTES: Final = 128 * 1024
#: Reply bytes a connection holds at most; one READ larger than this goes alone.
CONNECTION_LIMIT: Final = 8 * MiB
#: Reply bytes held beyond connections' own that one process allows unless told otherwise.
DEFAULT_REPLY_BUDGET: Final = 256 * MiB
#: A plain socket's write-buffer marks: pause once it holds anything, resume once it is
#: empty, so that ``resume_writing`` says every reply has left.
WRITE_BUFFER_LIMITS: Final = (0, 0)
#: Seconds a client may take none of its replies while others wait for the budget.
STALL_SECONDS: Final = 10.0


class ReplyBudget(PayloadBudget):
    """The process's budget for replies, and the accounts whose client is not taking theirs."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        #: Accounts with replies in a transport that is not empty, longest stalled first.
        self.stalled: dict[ReplyAccount, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def reserve(self, waiter: Hashable, nbytes: int, granted: Callable[[int], None]) -> bool:
        if super().reserve(waiter, nbytes, granted):
            return True
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(STALL_SECONDS / 2, self._sweep)
        return False

    def _sweep(self) -> None:
        """While some wait, close the clients stalled for ``STALL_SECONDS`` that hold some."""
        self._timer = None
        if not self.waiting:
            return
        loop = asyncio.get_running_loop()
        before = loop.time() - STALL_SECONDS
        for account in list(self.stalled):
            if account.stalled_since > before:
                break
            if account.charged and not account.progressed():
                account.evict()
        self._timer = loop.call_later(STALL_SECONDS / 2, self._sweep)


class Replier(Protocol):
    """The connection an account counts for."""

    transport: asyncio.Transport | None
    subject: str

    def reply_room(self) -> None:
        """A READ that was not admitted may be admitted now."""

    def evict(self) -> None:
        """Close the connection now."""


class ReplyAccount:
    """The reply bytes one connection holds: being read, collected, or in the transport."""

    __slots__ = (
        "_budget",
        "_credit",
        "_owner",
        "_stalled_unsent",
        "_wanted",
        "batched",
        "blocked",
        "charged",
        "parked",
        "pending",
        "stalled_since",
    )

    def __init__(self, budget: ReplyBudget, owner: Replier) -> None:
        self._budget = budget
        self._owner = owner
        #: Bytes of replies held, from dispatch until the transport is empty.
        self.pending = 0
        #: Of which, handed to a transport that was not empty then.
        self.parked = 0
        #: Of which, collected in the connection's batch, not handed over yet.
        self.batched = 0
        #: Bytes reserved in the budget: what ``pending`` holds beyond ``OWN_BYTES``.
        self.charged = 0
        #: A READ was not admitted and waits for room (the connection is not read).
        self.blocked = False
        # The length of that READ while it waits in the budget's line (0: not waiting),
        # and once granted (its bytes are reserved) until it is admitted.
        self._wanted = 0
        self._credit = 0
        #: When the transport last had none of the parked replies' bytes taken, and what
        #: it held then.
        self.stalled_since = 0.0
        self._stalled_unsent = 0

    def admit(self, nbytes: int) -> bool:
        """Count a READ's reply before it is dispatched; False: not now (see above)."""
        pending = self.pending + nbytes
        if pending <= OWN_BYTES and not self.charged:
            self.pending = pending
            return True
        return self._admit_beyond_own(nbytes, pending)

    def _admit_beyond_own(self, nbytes: int, pending: int) -> bool:
        if self._wanted:
            return False
        if self._credit:  # reserved while it waited
            self._credit = 0
            self.pending = pending
            self._settle()
            return True
        if self.pending and pending > CONNECTION_LIMIT:
            self.blocked = True
            return False
        need = pending - OWN_BYTES - self.charged
        if need > 0 and not self._budget.reserve(self, need, self._granted):
            self.blocked, self._wanted = True, nbytes
            return False
        self.pending = pending
        if need > 0:
            self.charged += need
        else:
            self._settle()
        return True

    def progressed(self) -> bool:
        """Whether the client took some of its replies since the last look."""
        unsent = self._unsent()
        if unsent >= self._stalled_unsent:
            return False
        self._stall(unsent)
        return True

    def evict(self) -> None:
        """Close the connection: its client is not taking its replies (see above)."""
        self._budget.stalled.pop(self, None)
        log.warning(
            "%s: closing: the client took none of its read replies (%d bytes) for %.0f s "
            "while others wait for the reply budget (--reply-budget)",
            self._owner.subject,
            self.pending,
            STALL_SECONDS,
        )
        self._owner.evict()

    def _stall(self, unsent: int) -> None:
        """(Re)start the clock of a transport that holds ``unsent`` bytes of replies."""
        stalled = self._budget.stalled
        stalled.pop(self, None)
        stalled[self] = None
        self.stalled_since = asyncio.get_running_loop().time()
        self._stalled_unsent = unsent

    def _granted(self, nbytes: int) -> None:
        self.charged += nbytes
        self._credit, self._wanted = self._wanted, 0
        self._unblock()

    def replied(self, nbytes: int) -> None:
        """A READ's reply was collected in the connection's batch (``flushed`` sends it)."""
        self.batched += nbytes

    def flushed(self) -> None:
        """The connection's batch was handed to the transport."""
        if self.batched:
            nbytes, self.batched = self.batched, 0
            self._sent(nbytes)

    def dropped(self, nbytes: int) -> None:
        """A READ failed: its reply carries no data."""
        self._give_back(nbytes)

    def drained(self) -> None:
        """The transport may be empty: give back what waited for it."""
        if self.parked and not self._unsent():
            nbytes, self.parked = self.parked, 0
            self._budget.stalled.pop(self, None)
            self._give_back(nbytes)

    def _sent(self, nbytes: int) -> None:
        unsent = self._unsent()
        if unsent:
            if not self.parked:
                self._stall(unsent)
            self.parked += nbytes
            return
        if self.parked:
            nbytes, self.parked = nbytes + self.parked, 0
            self._budget.stalled.pop(self, None)
        self._give_back(nbytes)

    def _unsent(self) -> int:
        """Reply bytes the transport holds beyond its high-water mark: 0 on a plain socket,
        whose transport holds the replies themselves; a TLS transport holds a copy."""
        transport = self._owner.transport
        if transport is None:
            return 0
        unsent = transport.get_write_buffer_size()
        return unsent and max(0, unsent - transport.get_write_buffer_limits()[1])

    def _give_back(self, nbytes: int) -> None:
        self.pending -= nbytes
        if self.charged:
            self._settle()
        if self.blocked and not self._wanted:
            self._unblock()

    def _settle(self) -> None:
        """Give back the budget's bytes that ``pending`` (and a credit) no longer need."""
        excess = self.charged - max(0, self.pending + self._credit - OWN_BYTES)
        if excess > 0:
            self.charged -= excess
            self._budget.release(excess)

    def _unblock(self) -> None:
        # Soon, not now: this runs inside another reply's send, maybe this connection's.
        self.blocked = False
        asyncio.get_running_loop().call_soon(self._owner.reply_room)

    def close(self) -> None:
        """The connection closed: stop waiting, give the budget's bytes back."""
        self._budget.cancel(self)
        self._budget.stalled.pop(self, None)
        self.blocked, self._wanted, self._credit = False, 0, 0
        if self.charged:
            self._budget.release(self.charged)
        self.pending = self.parked = self.batched = self.charged = 0


#: The budget shared by every server of a process that is not given one.
PROCESS_REPLY_BUDGET: Final = ReplyBudget(DEFAULT_REPLY_BUDGET)
