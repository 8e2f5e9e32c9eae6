"""Which clients a server lets in: limits counted apart before and after the handshake.

Clients still negotiating and clients past the handshake are counted separately,
so neither kind can lock the other out:

1. a client connects: refused at once only when ``max_connections`` clients are
   already past the handshake (an idle negotiated client is cheap, so that limit
   can be generous);
2. while it negotiates it counts against ``max_handshakes``; when that many are
   negotiating, the oldest of them is closed to let the new one in, so sockets
   that connect and send nothing (reconnecting as fast as they are dropped) delay
   a real client by at most its own handshake, never lock it out;
3. once negotiated it counts against ``max_connections`` (and is closed if the
   others filled it meanwhile); handed-in sockets count but are never refused;
4. when it goes, it stops counting.
"""

from __future__ import annotations

import logging
import resource
from typing import Final, Protocol

log = logging.getLogger("tapdisk.server")

#: Clients past the handshake served at once unless told otherwise.  An idle one costs a
#: few KiB (bench/idle.py); memory for requests in flight is bounded per connection
#: (connection.py) and, for writes still arriving, per process (writebudget.py).
DEFAULT_MAX_CONNECTIONS: Final = 1024
#: Clients negotiating at once before the oldest is closed for a new one (about 2 KiB each).
#: The larger, the more connections a flood must open within one client's handshake.
DEFAULT_MAX_HANDSHAKES: Final = 1024
#: File descriptors kept for images, listeners and logs beside the clients'.
SPARE_FILES: Final = 64


class Client(Protocol):
    #: Who the client is, in log messages.
    subject: str

    def evict(self) -> None:
        """Close this client, still negotiating, to make room for a newer one."""


class Admission:
    """Counts one server's clients before and after the handshake and applies its limits."""

    def __init__(
        self,
        max_connections: int | None = None,
        max_handshakes: int | None = DEFAULT_MAX_HANDSHAKES,
    ) -> None:
        """None: no limit."""
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        # Insertion ordered: the first is the oldest.
        self._negotiating: dict[Client, None] = {}
        self._transmitting: set[Client] = set()

    @property
    def full(self) -> bool:
        """As many clients are past the handshake as are allowed."""
        limit = self.max_connections
        return limit is not None and len(self._transmitting) >= limit

    def admit(self, client: Client) -> bool:
        """A client connected and will negotiate: False if it must be refused."""
        if self.full:
            self._refused(client)
            return False
        limit = self.max_handshakes
        if limit is not None and len(self._negotiating) >= limit:
            oldest = next(iter(self._negotiating))
            del self._negotiating[oldest]
            log.warning(
                "%s: closing the oldest of %d clients still negotiating to let a new one in",
                oldest.subject,
                limit,
            )
            oldest.evict()
        self._negotiating[client] = None
        return True

    def negotiated(self, client: Client) -> bool:
        """The client finished its handshake: False if the limit filled meanwhile."""
        self._negotiating.pop(client, None)
        if self.full:
            self._refused(client)
            return False
        self._transmitting.add(client)
        return True

    def handed_in(self, client: Client) -> None:
        """A connected socket served without handshake (never refused)."""
        self._transmitting.add(client)

    def gone(self, client: Client) -> None:
        self._negotiating.pop(client, None)
        self._transmitting.discard(client)

    def _refused(self, client: Client) -> None:
        log.warning(
            "%s: refusing a connection: %d clients are connected, the most allowed",
            client.subject,
            self.max_connections,
        )


def raise_file_limit(admission: Admission) -> None:
    """Raise the soft limit on open files (often 1024) so that every client the limits let in
    gets a socket: past it, accepting fails and nobody gets in.  Warns when the hard limit
    is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients, negotiating = admission.max_connections, admission.max_handshakes
    unlimited = clients is None or negotiating is None
    wanted = hard if unlimited else (clients or 0) + (negotiating or 0) + SPARE_FILES
    if wanted > hard:
        log.warning(
            "%d clients may be connected but only %d files may be open (ulimit -Hn); "
            "lower --max-connections or --max-handshakes",
            wanted - SPARE_FILES,
            hard,
        )
        wanted = hard
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
