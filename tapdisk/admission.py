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
from typing import Final, Protocol

log = logging.getLogger("tapdisk.server")

#: Clients past the handshake served at once unless told otherwise.  An idle one costs
#: about 10 KiB; memory for requests in flight is bounded per connection (connection.py)
#: and, for writes still arriving, per process (writebudget.py).
DEFAULT_MAX_CONNECTIONS: Final = 1024
#: Clients negotiating at once before the oldest is closed for a new one.
DEFAULT_MAX_HANDSHAKES: Final = 128


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
