"""tap-ctl against real tapdisk daemons: spawn, open, list, pause, unpause, stats, destroy."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from helpers import require, run
from tapctl_helpers import TAP_CTL, alive, nbd_uri, wait_gone


def kernel_nbd_available() -> bool:
    if Path("/sys/module/nbd").exists():
        return True
    modprobe = shutil.which("modprobe")
    return (
        bool(modprobe)
        and subprocess.run([modprobe, "-n", "nbd"], capture_output=True).returncode == 0
    )


# -- spawn and open ------------------------------------------------------------------


def test_spawn_prints_the_pid_of_a_tapdisk_listening_on_a_0600_socket(tapctl):
    pid = int(tapctl.out("spawn"))
    assert alive(pid)
    ctl = tapctl.dir / f"ctl{pid}"
    assert stat.S_ISSOCK(ctl.stat().st_mode)
    assert stat.S_IMODE(ctl.stat().st_mode) == 0o600


def test_open_serves_the_image_on_an_nbd_unix_socket(tapctl, raw_image):
    path = raw_image("16M", "write -P 0x6b 1M 64k")
    pid, minor, sock = tapctl.spawn_open(f"raw:{path}")
    assert sock == f"{tapctl.dir}/nbd{pid}.{minor}"
    out = run(require("qemu-io"), "-f", "raw", "-c", "read -P 0x6b 1M 64k", nbd_uri(sock))
    assert "Pattern verification failed" not in out


def test_open_read_only_serves_a_read_only_export(tapctl, raw_image):
    _, _, sock = tapctl.spawn_open(f"raw:{raw_image('16M')}", "-R")
    info = json.loads(run(require("nbdinfo"), "--json", nbd_uri(sock)))
    assert info["exports"][0]["is_read_only"] is True


def test_minors_are_unique_across_tapdisks(tapctl, raw_image):
    first = tapctl.spawn_open(f"raw:{raw_image('16M', name='a.raw')}")
    second = tapctl.spawn_open(f"raw:{raw_image('16M', name='b.raw')}")
    assert first[1] != second[1]
    assert first[0] != second[0]


def test_open_of_a_missing_file_fails_and_keeps_no_minor(tapctl, tmp_path):
    pid = tapctl.out("spawn")
    proc = tapctl("open", "-p", pid, "-a", f"raw:{tmp_path}/nope.raw", check=False)
    assert proc.returncode == 1
    assert "no such file" in proc.stderr
    assert tapctl.listing() == []
    assert not list(tapctl.dir.glob("minor*.lock"))


def test_open_of_an_unknown_type_names_the_known_ones(tapctl, raw_image):
    pid = tapctl.out("spawn")
    proc = tapctl("open", "-p", pid, "-a", f"floppy:{raw_image('16M')}", check=False)
    assert proc.returncode == 1
    assert "unknown image type 'floppy'" in proc.stderr


def test_unknown_pid_is_a_clear_error(tapctl):
    proc = tapctl("pause", "-p", "999999", "-m", "0", check=False)
    assert proc.returncode == 1
    assert "no tapdisk with pid 999999" in proc.stderr


def test_unknown_minor_is_a_clear_error(tapctl):
    pid = tapctl.out("spawn")
    proc = tapctl("stats", "-p", pid, "-m", "7", check=False)
    assert proc.returncode == 1
    assert f"tapdisk {pid} has no minor 7" in proc.stderr


# -- list ----------------------------------------------------------------------------


def test_list_prints_blktap_lines_when_not_on_a_terminal(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor, _ = tapctl.spawn_open(f"raw:{path}")
    assert tapctl.out("list") == f"pid={pid} minor={minor} state=0x0 args=raw:{path}"


def test_list_shows_an_idle_tapdisk_without_a_device(tapctl):
    pid = tapctl.out("spawn")
    assert tapctl.out("list") == f"pid={pid} minor=- state=- args=-"


def test_list_json_describes_every_device(tapctl, raw_image):
    path = raw_image("8M")
    pid, minor, sock = tapctl.spawn_open(f"raw:{path}")
    [info] = tapctl.listing()
    assert info == {
        "pid": pid,
        "minor": minor,
        "state": 0,
        "spec": f"raw:{path}",
        "size": 8 << 20,
        "read_only": False,
        "cbt_log": None,
        "timeout": 120.0,
        "nbd_socket": sock,
        "device": None,
    }


def test_list_filters_by_type_and_file(tapctl, raw_image):
    a, b = raw_image("16M", name="a.raw"), raw_image("16M", name="b.raw")
    tapctl.spawn_open(f"raw:{a}")
    tapctl.spawn_open(f"raw:{b}")
    assert tapctl.out("list", "-f", str(b)).endswith(f"args=raw:{b}")
    assert tapctl.out("list", "-t", "vhd") == ""


def test_list_prints_a_table_on_a_terminal(tapctl, raw_image):
    path = raw_image("16M")
    pid, _, _ = tapctl.spawn_open(f"raw:{path}")
    leader, follower = pty.openpty()
    proc = subprocess.run([TAP_CTL, "list"], env=tapctl.env, stdout=follower, timeout=60)
    os.close(follower)
    output = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(leader, 4096):
            output += chunk
    os.close(leader)
    text = output.decode()
    assert proc.returncode == 0
    assert text.splitlines()[0].split() == [
        "PID",
        "MINOR",
        "STATE",
        "DEVICE",
        "SIZE",
        "IMAGE",
        "NBD",
        "SOCKET",
    ]
    assert re.search(rf"^{pid}\s+0\s+running\s+-\s+16\.0 MiB\s+raw:{path}", text, re.M)


# -- pause, unpause, stats -------------------------------------------------------------


def test_pause_sets_the_paused_state_and_unpause_clears_it(tapctl, raw_image):
    pid, minor, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    tapctl.out("pause", "-p", str(pid), "-m", str(minor))
    assert tapctl.listing()[0]["state"] == 0x2
    tapctl.out("pause", "-p", str(pid), "-m", str(minor))  # idempotent
    tapctl.out("unpause", "-p", str(pid), "-m", str(minor))
    assert tapctl.listing()[0]["state"] == 0


def test_unpause_of_a_running_device_is_an_error(tapctl, raw_image):
    pid, minor, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    proc = tapctl("unpause", "-p", str(pid), "-m", str(minor), check=False)
    assert proc.returncode == 1
    assert "is not paused" in proc.stderr


def test_unpause_onto_an_image_of_another_size_is_refused_and_stays_paused(tapctl, raw_image):
    pid, minor, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    other = raw_image("32M", name="other.raw")
    tapctl.out("pause", "-p", str(pid), "-m", str(minor))
    proc = tapctl("unpause", "-p", str(pid), "-m", str(minor), "-a", f"raw:{other}", check=False)
    assert proc.returncode == 1
    assert "refusing to change the size" in proc.stderr
    assert tapctl.listing()[0]["state"] == 0x2


def test_unpause_onto_a_new_image_serves_it(tapctl, raw_image):
    old = raw_image("16M", name="old.raw")
    new = raw_image("16M", "write -P 0x4e 0 64k", name="new.raw")
    pid, minor, sock = tapctl.spawn_open(f"raw:{old}")
    tapctl.out("pause", "-p", str(pid), "-m", str(minor))
    tapctl.out("unpause", "-p", str(pid), "-m", str(minor), "-a", f"raw:{new}")
    out = run(require("qemu-io"), "-f", "raw", "-c", "read -P 0x4e 0 64k", nbd_uri(sock))
    assert "Pattern verification failed" not in out
    assert tapctl.listing()[0]["spec"] == f"raw:{new}"


def test_stats_prints_json_counters(tapctl, raw_image):
    pid, minor, sock = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    run(
        require("qemu-io"),
        "-f",
        "raw",
        "-c",
        "write -P 1 0 64k",
        "-c",
        "read 0 64k",
        "-c",
        "flush",
        nbd_uri(sock),
    )
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))
    assert stats["pid"] == pid and stats["minor"] == minor
    assert stats["writes"] >= 1 and stats["bytes_written"] == 65536
    assert stats["reads"] >= 1 and stats["bytes_read"] >= 65536
    assert stats["flushes"] >= 1
    assert stats["errors"] == [] and stats["in_flight"] == 0
    assert stats["latency_us"]["buckets"][-1][0] == "+Inf"


def test_stats_without_minor_lists_every_device(tapctl, raw_image):
    pid, _, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    tapctl.out("open", "-p", str(pid), "-a", f"raw:{raw_image('16M', name='b.raw')}")
    stats = json.loads(tapctl.out("stats", "-p", str(pid)))
    assert [s["minor"] for s in stats] == [0, 1]


# -- close, destroy, create ------------------------------------------------------------


def test_close_removes_the_nbd_socket_and_frees_the_minor(tapctl, raw_image):
    pid, minor, sock = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    tapctl.out("close", "-p", str(pid), "-m", str(minor))
    assert not os.path.exists(sock)
    assert tapctl.out("list") == f"pid={pid} minor=- state=- args=-"
    assert tapctl.out(
        "open", "-p", str(pid), "-a", f"raw:{raw_image('16M', name='c.raw')}"
    ).endswith(".0")


def test_close_of_a_paused_device_keeps_what_was_written(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor, sock = tapctl.spawn_open(f"raw:{path}")
    run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x77 0 64k", nbd_uri(sock))
    tapctl.out("pause", "-p", str(pid), "-m", str(minor))
    tapctl.out("close", "-p", str(pid), "-m", str(minor))
    assert path.read_bytes()[:65536] == b"\x77" * 65536


def test_destroy_closes_the_device_and_stops_the_idle_tapdisk(tapctl, raw_image):
    pid, minor, sock = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    tapctl.out("destroy", "-p", str(pid), "-m", str(minor))
    assert wait_gone(pid)
    assert not os.path.exists(sock)
    assert not (tapctl.dir / f"ctl{pid}").exists()


def test_destroy_keeps_a_tapdisk_that_still_has_devices(tapctl, raw_image):
    pid, minor, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    tapctl.out("open", "-p", str(pid), "-a", f"raw:{raw_image('16M', name='b.raw')}")
    tapctl.out("destroy", "-p", str(pid), "-m", str(minor))
    assert alive(pid)
    assert [info["minor"] for info in tapctl.listing()] == [1]


def test_create_no_attach_prints_a_served_socket_and_destroy_undoes_it(tapctl, raw_image):
    path = raw_image("16M", "write -P 0x21 0 4k")
    sock = tapctl.out("create", "--no-attach", "-a", f"raw:{path}")
    out = run(require("qemu-io"), "-f", "raw", "-c", "read -P 0x21 0 4k", nbd_uri(sock))
    assert "Pattern verification failed" not in out
    [info] = tapctl.listing()
    tapctl.out("destroy", "-p", str(info["pid"]), "-m", str(info["minor"]))
    assert wait_gone(info["pid"])
    assert tapctl.pids() == []


def test_create_of_a_bad_image_fails_and_leaves_no_tapdisk(tapctl, tmp_path):
    proc = tapctl("create", "--no-attach", "-a", f"raw:{tmp_path}/missing.raw", check=False)
    assert proc.returncode == 1
    assert "no such file" in proc.stderr
    time.sleep(0.2)
    assert tapctl.pids() == []


def test_create_without_kernel_nbd_fails_cleanly_and_leaves_nothing(tapctl, raw_image):
    if kernel_nbd_available():
        pytest.skip("this kernel has nbd; the kernel harness covers create")
    proc = tapctl("create", "-a", f"raw:{raw_image('16M')}", check=False)
    assert proc.returncode == 1
    assert "nbd" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    time.sleep(0.2)
    assert tapctl.pids() == []
    assert not list(tapctl.dir.glob("nbd*"))
    assert not list(tapctl.dir.glob("minor*.lock"))


def test_destroy_by_an_unknown_device_is_an_error(tapctl):
    proc = tapctl("destroy", "-d", "/dev/nbd9", check=False)
    assert proc.returncode == 1
    assert "no tapdisk serves /dev/nbd9" in proc.stderr


def test_sigterm_closes_devices_and_removes_sockets(tapctl, raw_image):
    pid, _, sock = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
    assert not os.path.exists(sock)
    assert tapctl.pids() == []


def test_a_crashed_tapdisk_is_skipped_by_list_and_its_minor_reused(tapctl, raw_image):
    pid, minor, _ = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    assert tapctl.out("list") == ""
    _, new_minor, _ = tapctl.spawn_open(f"raw:{raw_image('16M', name='b.raw')}")
    assert new_minor == minor


def test_help_has_examples():
    out = subprocess.run([TAP_CTL, "--help"], capture_output=True, text=True).stdout
    assert "examples:" in out and "tap-ctl create -a" in out
