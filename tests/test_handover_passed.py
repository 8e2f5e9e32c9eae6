"""tap-ctl restart of a tapdisk serving ``nbd:NAME`` from a socket passed over ``nbdclient<pid>``.

xapi connects to the upstream NBD server itself and passes the socket (tapdisk/daemon/
fdreceiver.py).  Once negotiated, that connection cannot move: libnbd only connects a
socket by running the handshake on it, and the server takes one handshake per
connection.  So the restart is refused before the hold, in one line, and the old
tapdisk serves on as if nothing happened, whether the passed socket is the image or a
mirror's secondary (``-2``).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import nbd
import pytest
from helpers import require, run
from nbd_servers import nbdkit
from tapctl_helpers import nbd_uri

MiB = 1 << 20


def pass_socket(tapctl, pid: int, upstream: Path, name: str) -> None:
    """Connect to ``upstream`` and pass the socket to tapdisk ``pid`` under ``name``."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(upstream))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sender:
        sender.connect(str(tapctl.dir / f"nbdclient{pid}"))
        socket.send_fds(sender, [name.encode() + b"\0"], [conn.fileno()])
    conn.close()
    time.sleep(0.2)  # the receiver stores it


@pytest.mark.parametrize("role", ["image", "secondary"])
def test_restart_of_a_passed_nbd_socket_is_refused_and_the_old_tapdisk_serves_on(
    tapctl, tmp_path: Path, role: str
) -> None:
    up = nbdkit(tmp_path / "up.sock", "memory", "8M")
    try:
        pid = int(tapctl.out("spawn"))
        pass_socket(tapctl, pid, up.socket, "xapi-vdi-1")
        if role == "image":
            args = ["-a", "nbd:xapi-vdi-1"]
        else:
            primary = tmp_path / "primary.raw"
            run(require("qemu-img"), "create", "-q", "-f", "raw", primary, "8M")
            args = ["-a", f"raw:{primary}", "-2", "nbd:xapi-vdi-1"]
        path = tapctl.out("open", "-p", str(pid), *args)
        [before] = tapctl.listing()
        h = nbd.NBD()
        h.connect_uri(nbd_uri(path))
        h.pwrite(b"p" * MiB, 0)
        proc = tapctl("restart", "-p", str(pid), check=False)
        assert proc.returncode != 0 and proc.stdout == ""
        [line] = proc.stderr.splitlines()
        assert f"tapdisk {pid} serves on" in line and "nbd:xapi-vdi-1" in line
        assert "passed" in line
        assert tapctl.pids() == [pid]
        assert tapctl.listing() == [before]
        h.pwrite(b"q" * MiB, MiB)
        h.flush()
        assert h.pread(2 * MiB, 0) == b"p" * MiB + b"q" * MiB
        h.shutdown()
        stats = tapctl.out("stats", "-p", str(pid), "-m", str(before["minor"]))
        assert '"nbd_mirror_failed": 0' in stats
        # Both writes reached the passed connection's server.
        check = run(require("qemu-io"), "-f", "raw", "-r", "-c", "read -P 0x70 0 1M",
                    "-c", "read -P 0x71 1M 1M", up.uri())  # fmt: skip
        assert "Pattern verification failed" not in check
    finally:
        up.stop()
