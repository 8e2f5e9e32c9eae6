"""tap-ctl restart's fallback: the old tapdisk was killed (kill -9) or is wedged (SIGSTOP).

A new tapdisk brings its VBDs back from their records (tapdisk/ctl/records.py): the
same minor, NBD socket path and options.  Clients lost their connections with the old
process; they reconnect on the same path and find every write acknowledged before a
flush.  A tapdisk that answers and refuses serves on (test_handover.py); the kernel
path, under a mounted file system, is in tests/kernel/test_tapctl_recovery.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal

import nbd
import pytest
from helpers import require, run
from tapctl_helpers import alive, wait_gone

MiB = 1 << 20


def connect(path: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={path}")
    return h


def write_flushed(path: str, offset: int, size: int, seed: int = 1) -> bytes:
    """Write ``size`` random bytes at ``offset`` and flush; the bytes."""
    data = random.Random(seed).randbytes(size)
    h = connect(path)
    h.pwrite(data, offset)
    h.flush()
    h.shutdown()
    return data


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)


def listing(tapctl) -> dict:
    return json.loads(tapctl.out("list", "--json"))


def restarted(tapctl, pid: int, why: str) -> int:
    proc = tapctl("restart", "-p", str(pid))
    assert proc.stderr == f"tap-ctl: tapdisk {pid} {why}; restarting its VBDs by RECONFIGURE\n"
    return int(proc.stdout)


def test_a_killed_tapdisks_vbd_comes_back_on_the_same_socket_with_its_flushed_data(
    tapctl, raw_image
):
    pid, _, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    data = write_flushed(path, 3 * 4096, 2 * MiB)
    client = connect(path)
    [before] = tapctl.listing()
    kill(pid)
    new = restarted(tapctl, pid, "is not running")
    assert new != pid and tapctl.pids() == [new]
    [after] = tapctl.listing()
    assert after == {**before, "pid": new}
    with pytest.raises(nbd.Error):
        client.pread(4096, 0)  # its connection died with the old process
    h = connect(path)  # and it reconnects on the same path
    assert h.pread(len(data), 3 * 4096) == data
    h.pwrite(b"n" * 4096, 0)
    h.flush()
    assert h.pread(4096, 0) == b"n" * 4096
    h.shutdown()


def test_a_stopped_tapdisk_is_killed_and_its_vbd_comes_back(tapctl, raw_image):
    pid, minor, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    data = write_flushed(path, 0, MiB)
    os.kill(pid, signal.SIGSTOP)
    try:
        new = restarted(tapctl, pid, "did not answer within 5 s; killed it")
        assert not alive(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert tapctl.pids() == [new]
    [info] = tapctl.listing()
    assert (info["pid"], info["minor"], info["nbd_socket"]) == (new, minor, path)
    h = connect(path)
    assert h.pread(len(data), 0) == data
    h.shutdown()


def test_every_vbd_comes_back_with_its_options_and_its_pause(tapctl, raw_image):
    pid = int(tapctl.out("spawn"))
    first = tapctl.out("open", "-p", str(pid), "-R", "-t", "30", "-a", f"raw:{raw_image('8M')}")
    second = tapctl.out("open", "-p", str(pid), "-a", f"raw:{raw_image('8M', name='b.raw')}")
    minor = int(second.rsplit(".", 1)[1])
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    before = tapctl.listing()  # the latest first
    assert [(info["read_only"], info["timeout"]) for info in before] == [(False, 120), (True, 30)]
    kill(pid)
    new = restarted(tapctl, pid, "is not running")
    assert tapctl.listing() == [{**info, "pid": new} for info in before]
    assert [info["state"] for info in before] == [0x2A, 0]
    tapctl("unpause", "-p", str(new), "-m", str(minor))
    for path in (first, second):
        connect(path).shutdown()


def test_a_dead_tapdisks_vbd_is_listed_as_dead_until_it_is_restarted(tapctl, raw_image):
    pid, minor, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    kill(pid)
    [dead] = listing(tapctl)["dead"]
    assert (dead["pid"], dead["minor"], dead["nbd_socket"]) == (pid, minor, path)
    assert tapctl.out("list") == f"minor={minor}"  # blktap's row: the storage manager skips it
    new = restarted(tapctl, pid, "is not running")
    assert listing(tapctl)["dead"] == []
    assert tapctl.out("list").startswith(f"pid={new} minor={minor} ")


def test_a_vbd_handed_over_then_killed_comes_back_from_the_new_tapdisks_record(tapctl, raw_image):
    pid, _, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    live = int(tapctl.out("restart", "-p", str(pid)))
    assert wait_gone(pid)
    data = write_flushed(path, 0, MiB)
    kill(live)
    new = restarted(tapctl, live, "is not running")
    h = connect(path)
    assert h.pread(len(data), 0) == data
    h.shutdown()
    assert [info["pid"] for info in tapctl.listing()] == [new]


@pytest.mark.parametrize("end", ["close", "shutdown"])
def test_a_vbd_closed_or_shut_down_leaves_nothing_to_restart(tapctl, raw_image, end):
    """SM's order: the minor is allocated first, and stays allocated after the tapdisk."""
    minor = tapctl.out("allocate").rsplit("-", 1)[1]
    pid = tapctl.out("spawn")
    tapctl("attach", "-p", pid, "-m", minor)
    tapctl("open", "-p", pid, "-m", minor, "-a", f"raw:{raw_image('16M')}")
    if end == "close":
        tapctl("close", "-p", pid, "-m", minor)
        tapctl("detach", "-p", pid, "-m", minor)
    else:
        tapctl("shutdown", "-p", pid)
    assert wait_gone(int(pid))
    assert listing(tapctl)["unattached"] == [int(minor)]
    assert listing(tapctl)["dead"] == []
    proc = tapctl("restart", "-p", pid, check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"tap-ctl: no tapdisk with pid {pid}, and none of its VBDs on record\n"


def test_restart_of_a_pid_that_never_ran_is_an_error_and_starts_nothing(tapctl):
    pid = next(p for p in range(4_000_000, 4_100_000) if not os.path.exists(f"/proc/{p}"))
    proc = tapctl("restart", "-p", str(pid), check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"tap-ctl: no tapdisk with pid {pid}, and none of its VBDs on record\n"
    assert tapctl.pids() == []


def test_restart_of_a_dead_tapdisk_with_a_minor_it_had_not_is_an_error(tapctl, raw_image):
    pid, minor, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    kill(pid)
    proc = tapctl("restart", "-p", str(pid), "-m", str(minor + 5), check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"tap-ctl: tapdisk {pid} has no minor {minor + 5} on record\n"
    assert [dead["minor"] for dead in listing(tapctl)["dead"]] == [minor]
    new = int(tapctl.out("restart", "-p", str(pid), "-m", str(minor)))
    assert [info["pid"] for info in tapctl.listing()] == [new]


def test_a_killed_tapdisk_whose_standby_took_over_comes_back_on_the_standby(
    tapctl, tmp_path, tiny_fs
):
    """The record follows a takeover at once: recovering the full primary would lose
    every write made since."""
    qemu_img = require("qemu-img")
    primary = tiny_fs / "p.img"
    run(qemu_img, "create", "-q", "-f", "raw", primary, str(16 * MiB))
    standby = tmp_path / "standby.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", primary, "-F", "raw", standby)
    pid, _, path = tapctl.spawn_open(f"raw:{primary}", "-2", f"qcow2:{standby}", "-s")
    data = write_flushed(path, 0, 8 * MiB)  # the primary fills up at about 4 MiB
    kill(pid)
    new = restarted(tapctl, pid, "is not running")
    [row] = tapctl.listing()
    assert (row["pid"], row["spec"]) == (new, f"qcow2:{standby}")
    h = connect(path)
    assert h.pread(8 * MiB, 0) == data
    h.shutdown()


def test_list_leaves_a_wedged_tapdisk_out_instead_of_waiting_for_it(tapctl, raw_image):
    """A stopped tapdisk does not hold every listing up for the 600 s a call may take."""
    wedged, _, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    healthy, _, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    os.kill(wedged, signal.SIGSTOP)
    try:
        proc = tapctl("list")
    finally:
        os.kill(wedged, signal.SIGCONT)
    assert f"pid={healthy} " in proc.stdout
    assert f"pid={wedged} " not in proc.stdout
    assert proc.stderr == (
        f"tap-ctl: tapdisk {wedged} did not answer within 10 s; not listed "
        "(tap-ctl restart replaces a wedged tapdisk)\n"
    )
    assert f"pid={wedged} " in tapctl.out("list")  # answering again
