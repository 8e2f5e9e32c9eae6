"""tap-ctl restart and the takeover/release control ops, on a host without nbd.ko.

Here the refusals of restart and of the RECONFIGURE ops: each must leave the old
tapdisk serving its image, running, and no new tapdisk behind.  The hand-over
itself is tested in test_handover.py, under the kernel in
tests/kernel/test_tapctl_restart.py.
"""

from __future__ import annotations

import errno

from tapctl_helpers import connect, receive

from tapdisk.ctl.protocol import Request, encode


def call(tapctl, pid: int, op: str, **args):
    with connect(tapctl, pid) as sock:
        sock.sendall(encode(Request(1, op, args)))
        [response] = receive(sock, 1)
    return response


def test_restart_of_a_device_not_connected_hands_it_over_too(tapctl, raw_image):
    pid, minor, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    proc = tapctl("restart", "-p", str(pid), "-m", str(minor))
    new = int(proc.stdout)
    assert new != pid and tapctl.pids() == [new]
    [info] = tapctl.listing()
    assert (info["minor"], info["state"], info["nbd_socket"]) == (minor, 0, path)


def test_restart_of_a_device_nobody_serves_is_an_error(tapctl):
    proc = tapctl("restart", "-d", "/dev/nbd7", check=False)
    assert proc.returncode == 1
    assert "no tapdisk serves /dev/nbd7" in proc.stderr


def test_restart_without_a_target_is_an_error(tapctl):
    proc = tapctl("restart", check=False)
    assert proc.returncode == errno.EINVAL
    assert "missing -p PID" in proc.stderr


def test_restart_of_an_unknown_minor_is_an_error_and_starts_nothing(tapctl, raw_image):
    pid, _, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    proc = tapctl("restart", "-p", str(pid), "-m", "5", check=False)
    assert proc.returncode == 1
    assert f"tapdisk {pid} has no minor 5" in proc.stderr
    assert tapctl.pids() == [pid]


def test_release_of_a_device_not_connected_is_a_state_error(tapctl, raw_image):
    pid, minor, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    response = call(tapctl, pid, "release", minor=minor)
    assert (response.ok, response.kind) == (False, "state")
    assert "not connected" in response.message
    assert [info["minor"] for info in tapctl.listing()] == [minor]


def test_release_of_an_unknown_minor_is_not_found(tapctl):
    pid = int(tapctl.out("spawn"))
    response = call(tapctl, pid, "release", minor=3)
    assert (response.ok, response.kind) == (False, "not-found")


def test_takeover_without_an_index_is_invalid(tapctl, raw_image):
    pid, minor, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    response = call(tapctl, pid, "takeover", minor=minor)
    assert (response.ok, response.kind) == (False, "invalid")
    assert "index" in response.message


def test_takeover_with_zero_connections_is_invalid(tapctl, raw_image):
    pid, minor, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    response = call(tapctl, pid, "takeover", minor=minor, index=0, connections=0)
    assert (response.ok, response.kind) == (False, "invalid")
    assert "connections must be 1..64" in response.message


def test_takeover_of_an_unknown_minor_is_not_found(tapctl):
    pid = int(tapctl.out("spawn"))
    response = call(tapctl, pid, "takeover", minor=2, index=0)
    assert (response.ok, response.kind) == (False, "not-found")


def test_list_reports_the_retry_deadline_a_restart_carries_over(tapctl, raw_image):
    tapctl.spawn_open(f"raw:{raw_image('16M')}", "-t", "7.5")
    [info] = tapctl.listing()
    assert info["timeout"] == 7.5
