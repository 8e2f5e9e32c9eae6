"""sd_notify(3) without libsystemd: readiness and status messages to ``$NOTIFY_SOCKET``.

A ``Type=notify`` unit is started only when the daemon sends ``READY=1``; tapdisk sends
it once every configured device is attached, so units ordered after tapdisk.service
find their ``/dev/nbdX`` in place.  Outside systemd (no ``$NOTIFY_SOCKET``) every call
is a no-op that returns False.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` fields as one datagram; True if a notify socket took it.

    An address starting with ``@`` is in the abstract namespace.  Failures to send are
    reported as False, never raised: readiness reporting must not stop the daemon.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not fields:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    """``READY=1`` (with a human-readable ``STATUS=``, shown by ``systemctl status``)."""
    return notify("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []))


def stopping(status: str = "") -> bool:
    """``STOPPING=1``: the daemon has begun detaching its devices."""
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    """``STATUS=text`` alone, e.g. progress while devices attach."""
    return notify(f"STATUS={text}")
