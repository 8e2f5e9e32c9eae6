"""Calling tapdisk daemons over their control sockets: the blocking I/O shell of ``protocol``.

``daemon_pids`` finds the daemons of a control directory by their sockets
``ctl<pid>``; ``Client.connect`` opens one daemon's socket and ``Client.call`` sends
one request and waits for its answer, each within the client's ``timeout``.  Every
failure (nobody listening, no answer in time, a malformed answer, a refusal) raises
``CallError`` with a message naming the tapdisk; ``DaemonGone`` says its socket no
longer exists.  ``tap-ctl`` and ``tapdisk-exporter`` use this module; the daemon
itself speaks ``protocol`` through asyncio.
"""

from __future__ import annotations

import glob
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

from . import protocol

#: Seconds a daemon may take to answer by default (pause and snapshot can take a while).
REQUEST_TIMEOUT = 600.0

_CONTROL_SOCKET = re.compile(r"ctl([0-9]+)")


class CallError(Exception):
    """A request to a tapdisk failed; the message names the tapdisk and says why.

    ``errno`` is the error of the system call that failed in the daemon, if one did;
    ``kind`` the daemon's error kind (``protocol.ERROR_KINDS``), if it answered.
    """

    def __init__(self, message: str, errno: int | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.kind = kind


class DaemonGone(CallError):
    """The tapdisk's control socket does not exist: it has exited (or never ran)."""


class CallTimeout(CallError):
    """The tapdisk accepted the request but did not answer it in time."""


def daemon_pids(directory: str) -> list[int]:
    """Pids of the tapdisks with a control socket in ``directory``, in increasing order."""
    pids = []
    for path in glob.glob(os.path.join(glob.escape(directory), "ctl*")):
        match = _CONTROL_SOCKET.fullmatch(os.path.basename(path))
        if match:
            pids.append(int(match[1]))
    return sorted(pids)


@dataclass
class Client:
    """A blocking connection to one daemon's control socket.

    ``timeout`` bounds the connection and then each call, from sending the request to
    the last byte of its answer.
    """

    pid: int
    path: str
    sock: socket.socket
    timeout: float
    _next_id: int = 1

    @classmethod
    def connect(cls, directory: str, pid: int, timeout: float = REQUEST_TIMEOUT) -> Client:
        path = protocol.control_socket(directory, pid)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError:
            sock.close()
            raise CallError(f"tapdisk {pid} did not accept a connection in time") from None
        except OSError as exc:
            sock.close()
            gone = isinstance(exc, FileNotFoundError)
            error = DaemonGone if gone else CallError
            raise error(f"no tapdisk with pid {pid} ({path}: {exc.strerror})") from None
        return cls(pid, path, sock, timeout)

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; arguments that are None are left out."""
        request = protocol.Request(
            self._next_id, op, {k: v for k, v in args.items() if v is not None}
        )
        self._next_id += 1
        deadline = time.monotonic() + self.timeout
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(protocol.encode(request))
            decoder = protocol.Decoder()
            messages: list[dict[str, Any]] = []
            while not messages:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = self.sock.recv(1 << 16)
                if not data:
                    raise CallError(f"tapdisk {self.pid} closed the control connection")
                messages = decoder.feed(data)
            response = protocol.parse_response(messages[0])
        except TimeoutError:
            raise CallTimeout(f"tapdisk {self.pid} did not answer {op} in time") from None
        except OSError as exc:
            raise CallError(f"tapdisk {self.pid}: {op}: {exc}") from None
        except protocol.ControlProtocolError as exc:
            raise CallError(f"tapdisk {self.pid} sent a bad response: {exc}") from None
        if not response.ok:
            raise CallError(response.message, response.errno, response.kind)
        return response.result

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
