"""Give the memory of idle and closed connections back to the system.

A connection's receive buffer grows with its traffic (nbd/transmission.py);
every ``INTERVAL`` seconds the sweep drops the buffers of connections that
received nothing since the previous sweep.  Freed memory stays in the C
library's heap (allocator.py keeps up to 128 MiB of it for reuse by large
reads), so a sweep trims the heap once it has dropped ``TRIM_BYTES`` of
buffers or ``TRIM_CONNECTIONS`` clients hung up since the last trim.  The
sweep runs only while the server has connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Set
from typing import Final, Protocol

from .allocator import release_free_memory

#: Seconds between sweeps: a connection idle this long gives its buffer back.
INTERVAL: Final = 2.0
#: Receive-buffer bytes dropped since the last trim that make a sweep trim.
TRIM_BYTES: Final = 8 * 1024 * 1024
#: Closed connections since the last trim that make a sweep trim (each freed its objects).
TRIM_CONNECTIONS: Final = 256


class Sweepable(Protocol):
    def release_idle_buffers(self) -> int:
        """Drop buffers unused since the last call; the bytes released."""
        ...


class IdleSweeper:
    """Periodically releases idle connections' buffers and trims the heap after big drops."""

    def __init__(self, connections: Set[Sweepable]) -> None:
        self._connections = connections
        self._timer: asyncio.TimerHandle | None = None
        # Buffer bytes dropped, and connections closed, since the last trim.
        self._released = 0
        self._closed = 0
        # Connections at the last sweep, and arrived since.
        self._count = 0
        self._arrived = 0

    def arrived(self) -> None:
        """A connection arrived: sweep from now on while there are connections."""
        self._arrived += 1
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(INTERVAL, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        self._timer = None
        for connection in self._connections:
            self._released += connection.release_idle_buffers()
        count = len(self._connections)
        self._closed += self._count + self._arrived - count
        self._count, self._arrived = count, 0
        if self._released >= TRIM_BYTES or self._closed >= TRIM_CONNECTIONS:
            release_free_memory()
            self._released = self._closed = 0
        if count:
            self._schedule()
