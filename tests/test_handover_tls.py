"""tap-ctl restart under a client connected over TLS: a clean close after its replies.

A TLS session cannot leave its process (Python's ssl exports no session state), so a
TLS connection is not handed over.  The old tapdisk answers every request it read,
then closes the connection the TLS way (close_notify) before it exits; the client
tells that from a connection that just broke, and connects again to the new tapdisk
on the same socket path.  A Python ssl client that reports a ragged EOF as an error
(not as an end, Python's default) plays the client.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
from helpers import recv_exactly
from nbd_servers import make_certificates
from tapctl_helpers import wait_gone

from tapdisk.nbd.constants import IHAVEOPT, Option, Reply

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
WRITE, BLOCK = 1, 64 * 1024


def option(sock: socket.socket, code: int, payload: bytes = b"") -> None:
    """Send an option and read its replies up to the final one, which must be an ACK."""
    sock.sendall(struct.pack(">QII", IHAVEOPT, code, len(payload)) + payload)
    while True:
        _, _, kind, length = struct.unpack(">QIII", recv_exactly(sock, 20))
        recv_exactly(sock, length)
        if kind != Reply.INFO:
            assert kind == Reply.ACK
            return


def connect_tls(path: str, certificates: Path) -> ssl.SSLSocket:
    """A client past STARTTLS and GO, in transmission."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 3))
    option(sock, Option.STARTTLS)
    context = ssl.create_default_context(cafile=str(certificates / "ca-cert.pem"))
    context.load_cert_chain(certificates / "client-cert.pem", certificates / "client-key.pem")
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF  # a ragged EOF must not pass for a clean one
    tls = context.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)
    option(tls, Option.GO, struct.pack(">IH", 0, 0))
    return tls


@pytest.fixture
def tls_config(tmp_path: Path) -> tuple[Path, Path]:
    certificates = make_certificates(tmp_path / "pki")
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"tls: require\ntls_certificates: {certificates}\n")
    return config, certificates


def test_restart_closes_a_tls_client_cleanly_after_its_replies(tapctl, raw_image, tls_config):
    config, certificates = tls_config
    image = raw_image("4M")
    pid = int(tapctl.out("spawn", "--config", str(config)))
    path = tapctl.out("open", "-p", str(pid), "-a", f"raw:{image}")
    tls = connect_tls(path, certificates)
    for cookie in range(8):  # pipelined: the replies are read after the restart
        block = bytes([cookie + 1]) * BLOCK
        tls.sendall(REQUEST.pack(0x25609513, 0, WRITE, cookie, cookie * BLOCK, BLOCK) + block)
    time.sleep(0.3)  # the old tapdisk reads them all before the restart holds it
    new = int(tapctl.out("restart", "--config", str(config), "-p", str(pid)))
    assert wait_gone(pid)
    for cookie in range(8):
        assert SIMPLE_REPLY.unpack(recv_exactly(tls, SIMPLE_REPLY.size)) == (0x67446698, 0, cookie)
    assert tls.recv(1) == b""  # close_notify: a ragged EOF would raise SSLEOFError here
    tls.close()
    assert image.read_bytes()[: 8 * BLOCK] == b"".join(bytes([i + 1]) * BLOCK for i in range(8))
    again = connect_tls(path, certificates)  # the same socket path, now the new tapdisk's
    again.sendall(REQUEST.pack(0x25609513, 0, WRITE, 9, 0, 4096) + b"n" * 4096)
    assert SIMPLE_REPLY.unpack(recv_exactly(again, SIMPLE_REPLY.size)) == (0x67446698, 0, 9)
    assert tapctl.pids() == [new]
    again.close()


@pytest.mark.parametrize("killed", [False, True], ids=["live", "killed"])
def test_a_restart_without_config_keeps_the_old_tapdisks_configuration(
    tapctl, raw_image, tls_config, killed
):
    """The successor reads the file its predecessor was started with: TLS stays required."""
    config, certificates = tls_config
    pid = int(tapctl.out("spawn", "--config", str(config)))
    path = tapctl.out("open", "-p", str(pid), "-a", f"raw:{raw_image('4M')}")
    if killed:
        os.kill(pid, signal.SIGKILL)  # restarted from its records (test_tapctl_recovery.py)
    new = int(tapctl.out("restart", "-p", str(pid)))
    assert wait_gone(pid)
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    plain.settimeout(30)
    plain.connect(path)
    recv_exactly(plain, 18)
    plain.sendall(struct.pack(">I", 3))
    plain.sendall(struct.pack(">QII", IHAVEOPT, Option.GO, 6) + struct.pack(">IH", 0, 0))
    _, _, kind, _ = struct.unpack(">QIII", recv_exactly(plain, 20))
    assert kind == Reply.ERR_TLS_REQD
    plain.close()
    connect_tls(path, certificates).close()
    assert tapctl.pids() == [new]
