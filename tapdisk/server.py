"""The NBD server: listeners, exports and handed-in sockets.

An ``NBDServer`` serves a set of ``Export``s (export.py) on unix and TCP
listeners, and on connected sockets handed to it (the kernel's skip the
handshake: ``DirectAttach``).  Every client socket gets one ``NBDConnection``
(connection.py), which runs the protocol and the requests.
All connections to an export share one ``Image``, so a FLUSH on any connection
covers writes completed on every one (multi-conn).  Clients are let in by the
limits of admission.py, idle ones give their buffers back (idlesweep.py), and
WRITE payloads still arriving share one per-process budget (writebudget.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Iterable
from typing import Final

from .admission import DEFAULT_MAX_HANDSHAKES, Admission
from .busypoll import BusyPoller
from .connection import NBDConnection
from .export import DirectAttach, Export
from .idlesweep import IdleSweeper
from .nbd.handshake import ExportInfo, Handshake, TLSMode
from .tls import ServerTLS
from .writebudget import PROCESS_BUDGET, WriteBudget

log = logging.getLogger("tapdisk.server")

#: Seconds a client may take to finish the handshake (qemu-nbd's --handshake-limit default).
HANDSHAKE_TIMEOUT: Final = 10.0


class NBDServer:
    """Serves a set of exports on any number of listeners and handed-in sockets."""

    def __init__(
        self,
        exports: Iterable[Export],
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        poller: BusyPoller | None = None,
        max_connections: int | None = None,
        max_handshakes: int | None = DEFAULT_MAX_HANDSHAKES,
        write_budget: WriteBudget = PROCESS_BUDGET,
        tls: ServerTLS | None = None,
    ) -> None:
        """``poller`` is shared by every server on one event loop (see busypoll.py);
        without one, connections are not busy-polled.  ``max_connections`` caps the
        clients past the handshake, ``max_handshakes`` those still negotiating (None: no
        cap; see admission.py); ``write_budget`` is shared by the process's servers.
        ``tls`` (tls.py) is offered or required on every listener; handed-in sockets that
        skip the handshake (the kernel's) stay plain."""
        self.exports = {export.name: export for export in exports}
        self.default_export = next(iter(self.exports)) if len(self.exports) == 1 else None
        if "" in self.exports:
            self.default_export = ""
        self.handshake_timeout = handshake_timeout
        self.admission = Admission(max_connections, max_handshakes)
        self.write_budget = write_budget
        self.connections: set[NBDConnection] = set()
        self.sweeper = IdleSweeper(self.connections)
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self.closing = False
        self.poller = poller if poller is not None else BusyPoller(0)
        self.tls = tls

    @property
    def export_infos(self) -> dict[str, ExportInfo]:
        return {name: export.info for name, export in self.exports.items()}

    def handshake(self) -> Handshake:
        """A new client's handshake, offering TLS as the listeners do."""
        mode = self.tls.mode if self.tls is not None else TLSMode.OFF
        return Handshake(self.export_infos, self.default_export, mode)

    async def listen_unix(self, path: str) -> None:
        """Listen on a unix socket; refuse to steal a path another server uses."""
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
            if _unix_socket_alive(path):
                raise OSError(errno.EADDRINUSE, f"unix socket {path} is in use by another server")
            os.unlink(path)  # stale socket file left by a crashed server
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: NBDConnection(self), path, backlog=128)
        os.chmod(path, 0o600)
        self._servers.append(server)
        self._unix_paths.append(path)

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen on TCP; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: NBDConnection(self), host, port, backlog=128, reuse_address=True
        )
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def listen_socket(self, sock: socket.socket, path: str | None = None) -> None:
        """Accept on a socket already listening (handed over by a predecessor, or given
        back after a hand-over failed); ``path``: its unix path, removed at shutdown."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(lambda: NBDConnection(self), sock=sock)
        else:
            server = await loop.create_server(lambda: NBDConnection(self), sock=sock)
        self._servers.append(server)
        if path is not None and path not in self._unix_paths:
            self._unix_paths.append(path)

    def take_listeners(self) -> list[tuple[socket.socket, str | None]]:
        """Stop accepting and hand the listening sockets out, open: clients that connect
        meanwhile wait in their backlog.  (socket, unix path or None) each."""
        taken: list[tuple[socket.socket, str | None]] = []
        paths = iter(self._unix_paths)
        for server in self._servers:
            for listener in server.sockets:
                sock = socket.socket(fileno=os.dup(listener.fileno()))
                taken.append((sock, next(paths, None) if sock.family == socket.AF_UNIX else None))
            server.close()
        self._servers = []
        return taken

    async def serve_socket(
        self, sock: socket.socket, direct: DirectAttach | Handshake | None = None
    ) -> None:
        """Serve an already-connected socket, with or without a handshake (or continuing
        one a predecessor began)."""
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: NBDConnection(self, direct), sock)

    async def shutdown(self) -> None:
        """Stop listening, let in-flight requests finish, close connections and images."""
        self.closing = True
        self.sweeper.stop()
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        await asyncio.gather(*(conn.drain_and_close() for conn in list(self.connections)))
        for server in self._servers:
            await server.wait_closed()
        for export in self.exports.values():
            try:
                if not export.read_only:
                    await export.image.flush()
            except OSError as exc:
                log.error("%s: flush at shutdown failed: %s", export.label, exc)
            await export.image.close()


def _unix_socket_alive(path: str) -> bool:
    """True when something accepts connections on the unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
