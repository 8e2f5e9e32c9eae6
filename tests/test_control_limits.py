"""Hostile control requests over a real daemon's socket: each gets a clear error, no traceback.

Bodies are written by hand: ``Infinity`` and ``1e400`` cannot be produced by a
correct JSON encoder, which is the point.
"""

from __future__ import annotations

import json
import struct

import pytest
from tapctl_helpers import connect, receive

from tapdisk.ctl.protocol import Request, encode


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def ask(tapctl, pid: int, body: bytes):
    """Send one raw request body; the daemon's one response."""
    with connect(tapctl, pid) as sock:
        sock.sendall(frame(body))
        [response] = receive(sock, 1)
    return response


def still_serves(tapctl, pid: int) -> bool:
    with connect(tapctl, pid) as sock:
        sock.sendall(encode(Request(1, "pid")))
        [response] = receive(sock, 1)
    return response.ok and response.result == {"pid": pid, "config": None}


def no_traceback_logged(tapctl) -> bool:
    log = tapctl.dir / "tapdisk.log"
    return "Traceback" not in log.read_text() and "internal" not in log.read_text()


@pytest.mark.parametrize("number", [b"Infinity", b"-Infinity", b"NaN", b"1e400"])
def test_a_timeout_that_is_not_a_json_number_is_refused(tapctl, raw_image, number):
    pid = int(tapctl.out("spawn"))
    spec = f"raw:{raw_image('16M')}".encode()
    body = b'{"id":1,"op":"open","args":{"spec":"%s","timeout":%s}}' % (spec, number)
    response = ask(tapctl, pid, body)
    assert (response.ok, response.kind) == (False, "invalid")
    assert "JSON" in response.message or "out of range" in response.message
    assert still_serves(tapctl, pid)
    assert ask(tapctl, pid, encode(Request(2, "list"))[4:]).result == []


@pytest.mark.parametrize("op", ["open", "connect"])
def test_a_timeout_above_the_configured_cap_is_refused(tapctl, raw_image, op):
    pid = int(tapctl.out("spawn"))
    args = {"spec": f"raw:{raw_image('16M')}"} if op == "open" else {"minor": 0}
    response = ask(
        tapctl, pid, json.dumps({"id": 1, "op": op, "args": {**args, "timeout": 1e308}}).encode()
    )
    assert (response.ok, response.kind) == (False, "invalid")
    assert "at most 86400 seconds" in response.message
    assert still_serves(tapctl, pid)


def test_no_reply_carries_a_bare_infinity(tapctl, raw_image):
    pid = int(tapctl.out("spawn"))
    spec = f"raw:{raw_image('16M')}"
    ask(
        tapctl, pid, b'{"id":1,"op":"open","args":{"spec":"%s","timeout":Infinity}}' % spec.encode()
    )
    with connect(tapctl, pid) as sock:
        sock.sendall(encode(Request(2, "open", {"spec": spec, "timeout": 86400})))
        sock.sendall(encode(Request(3, "list")))
        opened, listed = receive(sock, 2)
    assert opened.ok and opened.result["timeout"] == 86400
    assert [row["timeout"] for row in listed.result] == [86400]


def test_a_nul_byte_in_a_spec_is_refused_without_a_traceback(tapctl, raw_image):
    pid = int(tapctl.out("spawn"))
    spec = f"raw:{raw_image('16M')}\0.raw"
    response = ask(
        tapctl, pid, json.dumps({"id": 1, "op": "open", "args": {"spec": spec}}).encode()
    )
    assert (response.ok, response.kind) == (False, "invalid")
    assert "NUL" in response.message
    assert still_serves(tapctl, pid)
    assert no_traceback_logged(tapctl)


def test_500_nested_fault_layers_are_refused_without_a_traceback(tapctl, raw_image):
    pid = int(tapctl.out("spawn"))
    spec = "fault:count=1:" * 500 + f"raw:{raw_image('16M')}"
    response = ask(
        tapctl, pid, json.dumps({"id": 1, "op": "open", "args": {"spec": spec}}).encode()
    )
    assert (response.ok, response.kind) == (False, "image")
    assert "more than 8 layers" in response.message
    assert still_serves(tapctl, pid)
    assert no_traceback_logged(tapctl)


def test_eight_stacked_layers_still_open(tapctl, raw_image):
    pid = int(tapctl.out("spawn"))
    spec = "fault:count=1:" * 8 + f"raw:{raw_image('16M')}"
    response = ask(
        tapctl, pid, json.dumps({"id": 1, "op": "open", "args": {"spec": spec}}).encode()
    )
    assert response.ok, response.message


def test_a_device_index_above_the_limit_is_refused(tapctl, raw_image):
    pid = int(tapctl.out("spawn"))
    tapctl.out("open", "-p", str(pid), "-a", f"raw:{raw_image('16M')}")
    body = json.dumps({"id": 1, "op": "connect", "args": {"minor": 0, "index": 1 << 40}})
    response = ask(tapctl, pid, body.encode())
    assert (response.ok, response.kind) == (False, "invalid")
    assert "'index' must be from 0 to 65535" in response.message
