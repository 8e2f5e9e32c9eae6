"""Socket options for NBD client connections: what every accepted socket is tuned with."""

from __future__ import annotations

import contextlib
import socket
from typing import Final

#: Socket send buffer requested per connection (the kernel may cap it).
SEND_BUFFER: Final = 4 * 1024 * 1024


def tune_socket(sock: socket.socket) -> None:
    """Low latency on TCP; a send buffer that holds whole large replies.

    With the default ~200 KiB buffer a 1 MiB read reply needs several trips
    through the event loop; with a larger one it leaves in one system call.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SEND_BUFFER)
