"""Adaptive busy-polling: catch a client's next request before the event loop sleeps.

At queue depth 1 a request's round trip is mostly wake-ups: the event loop goes to sleep
in ``epoll_wait`` after each reply and the scheduler has to wake it for the next request.
Reading the sockets in a short spin instead, while the client is quick to answer, more
than doubles QD1 IOPS here (17k -> 40k on 4 KiB page-cache reads).

The spin window adapts the way qemu's event-loop polling (``poll-max-ns``) does: it
grows, from ``GROW_START_NS`` up to the maximum, while the gaps between a reply and the
next request are short, and drops to zero when a gap is long. A gap the loop slept
through includes the sleep and wake-up (20-40 us here), so "short" is the maximum plus
``WAKEUP_ALLOWANCE_NS``; without it a client answering in 15 us looks 50 us slow while
nothing spins, and polling would never start (or stop for good after one sleep). An idle
or slow client costs at most one window of spinning, and a server whose clients think
for longer than the maximum plus the allowance never spins.  Each spin round yields the CPU
(``sched_yield``), so a client waiting for this CPU still runs.

All connections of one event loop share one poller, which reads their sockets in turn:
a spin started by one connection answers the others as well.  Spinning stops while any
of them has work that needs the event loop (requests running as tasks, replies waiting
in the transport, reading paused), and after ``BUDGET_NS`` so timers and other callbacks
still run.
"""

from __future__ import annotations

import os
import time
from typing import Final, Protocol

#: Default longest spin after a reply, in microseconds (``--busy-poll``, ``busy_poll``).
DEFAULT_MAX_US: Final = 50
#: Largest window accepted: beyond a few milliseconds spinning only wastes CPU.
MAX_US: Final = 10_000
#: What a gap the event loop slept through may exceed the maximum by and still count as
#: short: the sleep and wake-up themselves.
WAKEUP_ALLOWANCE_NS: Final = 30_000
#: The first window once polling starts; it doubles from here.
GROW_START_NS: Final = 4_000
#: Longest one spin may keep the event loop from its other work.
BUDGET_NS: Final = 1_000_000

_now = time.perf_counter_ns
_yield = os.sched_yield


class Pollable(Protocol):
    """A connection the poller can read for."""

    def poll_ready(self) -> bool:
        """True when nothing but socket input is pending: spinning cannot delay its work."""
        ...

    def poll_receive(self) -> bool | None:
        """Read and handle what the socket has: True if data came, False if none, None
        when this connection must be left to the event loop (end of file, error, closing)."""
        ...


class BusyPoller:
    """Spins on the registered connections' sockets for an adaptive window."""

    def __init__(self, max_us: int = DEFAULT_MAX_US) -> None:
        if not 0 <= max_us <= MAX_US:
            raise ValueError(f"busy-poll window must be from 0 to {MAX_US} us, got {max_us}")
        self.max_ns = max_us * 1000
        #: The current spin window; 0 until a short gap between requests is seen.
        self.window_ns = 0
        self._members: list[Pollable] = []
        self._waiting_since = 0
        self._spinning = False
        #: Receives the spin caught, and those the event loop delivered.
        self.caught = 0
        self.woken = 0

    def summary(self) -> str:
        """One line for the log at shutdown: how often the spin caught what came."""
        if not self.max_ns:
            return "busy-poll: off"
        return (
            f"busy-poll (up to {self.max_ns // 1000} us): {self.caught} receives caught "
            f"spinning, {self.woken} came through the event loop"
        )

    def register(self, member: Pollable) -> None:
        if self.max_ns and member not in self._members:
            self._members.append(member)

    def unregister(self, member: Pollable) -> None:
        if member in self._members:
            self._members.remove(member)

    def woke(self) -> None:
        """The event loop delivered data: fit the window to how long we waited for it."""
        self.woken += 1
        since = self._waiting_since
        if not since:
            return
        self._waiting_since = 0
        gap = _now() - since
        if gap > self.max_ns + WAKEUP_ALLOWANCE_NS:
            self.window_ns = 0
        elif gap > self.window_ns:
            self.window_ns = min(self.max_ns, max(2 * self.window_ns, GROW_START_NS))

    def spin(self) -> None:
        """Read the connections until none has sent anything for a window (or the budget
        is spent), then note when the wait for the event loop began."""
        if self._spinning or not self._members:
            return
        window = self.window_ns
        members = self._members
        started = waiting = _now()
        if window and all(member.poll_ready() for member in members):
            self._spinning = True
            try:
                waiting = self._spin(window, started + BUDGET_NS)
            finally:
                self._spinning = False
        self._waiting_since = waiting

    def _spin(self, window: int, budget_end: int) -> int:
        """The spin itself; returns when the last data came (or the spin began)."""
        members = self._members
        waiting = now = _now()
        while now - waiting < window and now < budget_end:
            for member in tuple(members):
                got = member.poll_receive()
                if got is None:
                    return waiting
                if got:
                    self.caught += 1
                    waiting = _now()
                    if not member.poll_ready():
                        return waiting
            _yield()
            now = _now()
        return waiting
