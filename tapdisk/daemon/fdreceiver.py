"""The ``nbdclient<pid>`` socket: connected NBD sockets handed to this tapdisk by name.

blktap's contract, which xapi uses to give tapdisk an NBD connection it made
itself: a Unix stream socket ``CONTROL_DIR/nbdclient<pid>``; a client connects,
sends one message whose bytes are the name (up to a NUL) with the socket as
SCM_RIGHTS ancillary data, and the connection is done.  The descriptor waits in
``drivers.nbdfds`` until an image ``nbd:NAME`` is opened.  One client at a time,
as in blktap; the socket is only ours to use (0600 in the 0700 control directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from tapdisk.drivers import nbdfds

log = logging.getLogger("tapdisk.daemon.fdreceiver")

#: Largest message read: the name and whatever follows it (blktap reads 16 KiB).
MAX_MESSAGE = 16384


def receiver_path(directory: str, pid: int) -> str:
    """Path of the descriptor-passing socket of tapdisk ``pid`` (blktap's name)."""
    return f"{directory}/nbdclient{pid}"


class FdReceiver:
    """Accepts one client at a time and stores the descriptor it sends under its name."""

    def __init__(self, directory: str, pid: int) -> None:
        self.path = receiver_path(directory, pid)
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a previous process with our pid is gone
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self._listener.bind(self.path)
        finally:
            os.umask(old_umask)
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._client: socket.socket | None = None
        self._loop.add_reader(self._listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._client is not None:
            log.warning("%s: one client at a time; closing another", self.path)
            client.close()
            return
        client.setblocking(False)
        self._client = client
        self._loop.add_reader(client.fileno(), self._receive)

    def _receive(self) -> None:
        client = self._client
        assert client is not None
        try:
            message, fds, _, _ = socket.recv_fds(client, MAX_MESSAGE, 1)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("%s: receiving a descriptor failed: %s", self.path, exc)
            message, fds = b"", []
        self._drop_client()
        name = message.partition(b"\0")[0].decode(errors="replace")
        if not fds:
            log.warning("%s: message %r came without a descriptor", self.path, name)
            return
        try:
            nbdfds.stash(name, fds[0])
        except nbdfds.TooManyPassed as exc:
            log.warning("%s: descriptor %r refused: %s", self.path, name, exc)
            return
        log.info("received an NBD socket named %r", name)

    def _drop_client(self) -> None:
        if self._client is not None:
            self._loop.remove_reader(self._client.fileno())
            self._client.close()
            self._client = None

    def close(self) -> None:
        """Stop listening, remove the socket, close descriptors nobody took."""
        self._drop_client()
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        nbdfds.close_all()
