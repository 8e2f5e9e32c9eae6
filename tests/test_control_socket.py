"""The control protocol over a real daemon's socket: framing, pipelining, errors, shutdown."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

from tapctl_helpers import connect, receive, wait_gone

from tapdisk.ctl.protocol import Request, encode


def test_pipelined_requests_are_answered_in_order(tapctl, raw_image):
    pid = int(tapctl.out("spawn"))
    with connect(tapctl, pid) as sock:
        requests = [
            Request(1, "pid"),
            Request(2, "open", {"spec": f"raw:{raw_image('16M')}"}),
            Request(3, "pause", {"minor": 0}),
            Request(4, "list"),
        ]
        sock.sendall(b"".join(encode(r) for r in requests))
        responses = receive(sock, 4)
    assert [r.id for r in responses] == [1, 2, 3, 4]
    assert all(r.ok for r in responses)
    assert responses[0].result == {"pid": pid, "config": None}
    assert responses[3].result[0]["state"] == 0x2A  # blktap's PAUSED | QUIESCED | CLOSED


def test_a_request_sent_byte_by_byte_is_understood(tapctl):
    pid = int(tapctl.out("spawn"))
    with connect(tapctl, pid) as sock:
        for byte in encode(Request(9, "pid")):
            sock.send(bytes([byte]))
        [response] = receive(sock, 1)
    assert response.ok and response.result == {"pid": pid, "config": None}


def test_an_invalid_request_gets_an_error_and_the_connection_stays_usable(tapctl):
    pid = int(tapctl.out("spawn"))
    with connect(tapctl, pid) as sock:
        sock.sendall(encode({"id": 5, "op": "explode", "args": {}}))
        sock.sendall(encode(Request(6, "pid")))
        bad, good = receive(sock, 2)
    assert not bad.ok and bad.kind == "invalid" and "explode" in bad.message
    assert good.ok


def test_a_state_error_has_kind_state(tapctl, raw_image):
    pid = int(tapctl.out("spawn"))
    with connect(tapctl, pid) as sock:
        sock.sendall(encode(Request(1, "open", {"spec": f"raw:{raw_image('16M')}"})))
        sock.sendall(encode(Request(2, "unpause", {"minor": 0})))
        _, response = receive(sock, 2)
    assert (response.ok, response.kind) == (False, "state")


def test_an_oversized_frame_closes_that_connection_only(tapctl):
    pid = int(tapctl.out("spawn"))
    with connect(tapctl, pid) as sock:
        sock.sendall(struct.pack(">I", 1 << 30))
        [refusal] = receive(sock, 1)
        assert (refusal.ok, refusal.kind) == (False, "invalid")
        assert "length prefix" in refusal.message
        assert sock.recv(100) == b""
    with connect(tapctl, pid) as sock:
        sock.sendall(encode(Request(1, "pid")))
        [response] = receive(sock, 1)
    assert response.ok


def test_shutdown_answers_then_the_process_exits_and_removes_its_socket(tapctl, raw_image):
    pid = int(tapctl.out("spawn"))
    tapctl.out("open", "-p", str(pid), "-a", f"raw:{raw_image('16M')}")
    with connect(tapctl, pid) as sock:
        sock.sendall(encode(Request(1, "shutdown")))
        [response] = receive(sock, 1)
    assert response.ok
    assert wait_gone(pid)
    assert not (tapctl.dir / f"ctl{pid}").exists()
    assert not list(tapctl.dir.glob("nbd*"))


def test_daemon_creates_its_directory_private_and_honours_control_dir(tmp_path):
    directory = tmp_path / "ctl"
    read_fd, write_fd = os.pipe()
    tapdisk = str(Path(sys.executable).with_name("tapdisk"))
    proc = subprocess.Popen(
        [tapdisk, "daemon", "--control-dir", str(directory), "--ready-fd", str(write_fd)],
        pass_fds=(write_fd,),
        stderr=subprocess.PIPE,
    )
    os.close(write_fd)
    try:
        ready = os.read(read_fd, 4096).decode().strip()
        assert ready == f"{directory}/ctl{proc.pid}"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    finally:
        os.close(read_fd)
        proc.terminate()
        assert proc.wait(20) == 0
