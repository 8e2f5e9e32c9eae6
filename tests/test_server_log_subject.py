"""Connection-level log messages name the device or export, not just ``unix``.

A hand-driven client breaks the protocol on a real server (a ``tapdisk daemon``
VBD socket, or ``tapdisk serve`` over TCP); the server's stderr must say which
device the broken connection was for.
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from helpers import TAPDISK, recv_exactly, run, start_tapdisk

TAPCTL = str(Path(sys.executable).with_name("tap-ctl"))

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME = 1
GREETING = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
#: Export size (8 bytes) and transmission flags (2 bytes) answering NBD_OPT_EXPORT_NAME
#: with NO_ZEROES.
EXPORT_REPLY = 10
#: A request whose magic is wrong: 28 bytes, like a real request header.
BAD_REQUEST = b"\xde\xad\xbe\xef" + bytes(24)


def wait_closed(sock: socket.socket) -> None:
    """Wait until the server hangs up (it does after a protocol error)."""
    sock.settimeout(10)
    while sock.recv(4096):
        pass


def break_protocol(sock: socket.socket, export: bytes | None) -> None:
    """Greet; with ``export`` choose it and send a bad request, else a bad option."""
    magic, opt_magic, _ = GREETING.unpack(recv_exactly(sock, GREETING.size))
    assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    if export is None:
        sock.sendall(OPTION.pack(0x1234, OPT_EXPORT_NAME, 0))  # wrong option magic
    else:
        sock.sendall(OPTION.pack(IHAVEOPT, OPT_EXPORT_NAME, len(export)) + export)
        recv_exactly(sock, EXPORT_REPLY)
        sock.sendall(BAD_REQUEST)
    wait_closed(sock)


def daemon_log_after(tmp_path: Path, export: bytes | None) -> str:
    """stderr of a tapdisk daemon whose minor 0 got a protocol-breaking connection."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    directory = tmp_path / "run"
    proc = subprocess.Popen(
        [TAPDISK, "daemon", "--control-dir", str(directory)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (directory / f"ctl{proc.pid}").exists():
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        opened = run(
            TAPCTL, "open", "--control-dir", directory, "-p", str(proc.pid), "-a", f"raw:{image}"
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(opened.strip())
            break_protocol(sock, export)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    return err


def test_daemon_names_the_device_of_a_request_protocol_error(tmp_path):
    err = daemon_log_after(tmp_path, b"")
    assert "minor 0: protocol error, closing connection" in err
    assert "unix:" not in err


def test_daemon_names_the_device_of_a_handshake_protocol_error(tmp_path):
    err = daemon_log_after(tmp_path, None)
    assert "minor 0: protocol error, closing connection" in err
    assert "unix:" not in err


def test_serve_names_the_export_and_the_tcp_client(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    served = start_tapdisk(tmp_path / "nbd.sock", "--tcp", "127.0.0.1:0", f"vm1=raw:{image}")
    assert served.proc.stdout is not None
    tcp_uri = served.proc.stdout.readline().strip()  # nbd://127.0.0.1:PORT/
    port = int(tcp_uri.rstrip("/").rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        local_port = sock.getsockname()[1]
        break_protocol(sock, b"vm1")
    served.proc.send_signal(signal.SIGTERM)
    _, err = served.proc.communicate(timeout=60)
    assert f"vm1 (client 127.0.0.1:{local_port}): protocol error, closing connection" in err
