"""Mirroring to a secondary image (tap-ctl ``-2``, ``-s``) through real tapdisk daemons.

Writes go through the NBD socket with libnbd; the images are read back from their
files and compared with ``qemu-img compare``.  Failing secondaries are real: the
fault layer's injected EIO, and a file system (a 4 MiB tmpfs) that fills up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbd
from helpers import require, run
from tapctl_helpers import nbd_uri

SIZE = 16 << 20
MiB = 1 << 20


def raw(path: Path, size: int = SIZE) -> Path:
    run(require("qemu-img"), "create", "-q", "-f", "raw", path, str(size))
    return path


def connect(sock: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(nbd_uri(sock))
    return h


def stats(tapctl, pid: int, minor: int) -> dict:
    return json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))


def same(a: Path, b: Path) -> bool:
    result = run(require("qemu-img"), "compare", "-f", "raw", "-F", "raw", a, b, check=False)
    return result.startswith("Images are identical")


def test_writes_zeroes_trims_and_flushes_reach_both_and_reads_come_from_the_primary(
    tapctl, tmp_path
):
    primary, secondary = raw(tmp_path / "p.img"), raw(tmp_path / "s.img")
    with open(secondary, "r+b") as f:  # old data a guest never wrote: it must never read it
        f.seek(8 * MiB)
        f.write(b"old" * 1000)
    pid, minor, sock = tapctl.spawn_open(f"raw:{primary}", "-2", f"raw:{secondary}")
    h = connect(sock)
    assert h.pread(3000, 8 * MiB) == bytes(3000)
    h.pwrite(b"\x11" * (3 * MiB), 0)
    h.zero(MiB, MiB)
    h.trim(64 << 10, 2 * MiB)
    h.pwrite(b"\x22" * 512, 8 * MiB)
    h.flush()
    with open(secondary, "r+b") as f:  # the untouched old data, gone from the secondary
        f.seek(8 * MiB + 512)
        f.write(bytes(3000 - 512))
    assert same(primary, secondary)
    assert stats(tapctl, pid, minor)["nbd_mirror_failed"] == 0
    h.shutdown()


def test_a_secondary_failing_mid_write_is_dropped_and_the_device_carries_on(tapctl, tmp_path):
    primary, secondary = raw(tmp_path / "p.img"), raw(tmp_path / "s.img")
    spec = f"fault:start=0.5,ops=write,errno=EIO:raw:{secondary}"
    pid, minor, sock = tapctl.spawn_open(f"raw:{primary}", "-2", spec)
    h = connect(sock)
    h.pwrite(b"\x01" * MiB, 0)
    assert stats(tapctl, pid, minor)["nbd_mirror_failed"] == 0
    time.sleep(0.6)
    for i in range(1, 8):  # the first of these fails on the secondary; none fails here
        h.pwrite(bytes([i + 1]) * MiB, i * MiB)
    h.flush()
    assert stats(tapctl, pid, minor)["nbd_mirror_failed"] == 1
    expected = b"".join(bytes([i + 1]) * MiB for i in range(8))
    assert h.pread(8 * MiB, 0) == expected
    assert primary.read_bytes()[: 8 * MiB] == expected
    assert secondary.read_bytes()[MiB : 8 * MiB] == bytes(7 * MiB)  # dropped at the first
    h.shutdown()


def test_a_secondary_that_runs_out_of_space_is_dropped(tapctl, tmp_path, tiny_fs):
    primary, secondary = raw(tmp_path / "p.img"), raw(tiny_fs / "s.img")
    pid, minor, sock = tapctl.spawn_open(f"raw:{primary}", "-2", f"raw:{secondary}")
    h = connect(sock)
    data = bytes(range(256)) * (MiB // 256)
    for i in range(8):
        h.pwrite(data, i * MiB)
    h.flush()
    assert stats(tapctl, pid, minor)["nbd_mirror_failed"] == 1
    assert primary.read_bytes()[: 8 * MiB] == data * 8
    h.shutdown()


def test_unpause_with_secondary_null_removes_it_and_clears_the_failure(tapctl, tmp_path):
    primary, secondary = raw(tmp_path / "p.img"), raw(tmp_path / "s.img")
    failing = f"fault:ops=write:raw:{secondary}"
    pid, minor, sock = tapctl.spawn_open(f"raw:{primary}", "-2", failing)
    target = ("-p", str(pid), "-m", str(minor))
    h = connect(sock)
    h.pwrite(b"\x01" * 4096, 0)
    assert stats(tapctl, pid, minor)["nbd_mirror_failed"] == 1
    tapctl("pause", *target)
    tapctl("unpause", *target, "-2", f"raw:{secondary}")
    h.pwrite(b"\x02" * 4096, 4096)  # mirrored again; the failure stays until -2 null
    assert secondary.read_bytes()[4096:8192] == b"\x02" * 4096
    assert stats(tapctl, pid, minor)["nbd_mirror_failed"] == 1
    tapctl("pause", *target)
    tapctl("unpause", *target, "-2", "null")
    h.pwrite(b"\x03" * 4096, 8192)
    h.flush()
    assert stats(tapctl, pid, minor)["nbd_mirror_failed"] == 0
    assert stats(tapctl, pid, minor)["vbd"]["secondary"] is None
    assert secondary.read_bytes()[8192:12288] == bytes(4096)
    assert primary.read_bytes()[:12288] == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096
    h.shutdown()


def test_standby_takes_over_when_the_primary_is_full(tapctl, tmp_path, tiny_fs):
    primary = raw(tiny_fs / "p.img")
    overlay = tmp_path / "overlay.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", "-b", primary, "-F", "raw", overlay)
    pid, minor, sock = tapctl.spawn_open(f"raw:{primary}", "-2", f"qcow2:{overlay}", "-s")
    assert stats(tapctl, pid, minor)["vbd"]["secondary"] == f"qcow2:{overlay}"
    h = connect(sock)
    data = [bytes([i + 1]) * MiB for i in range(8)]
    for i in range(2):
        h.pwrite(data[i], i * MiB)
    h.flush()
    assert overlay.stat().st_size < MiB  # standby: nothing written to it yet
    for i in range(2, 8):
        h.pwrite(data[i], i * MiB)  # the primary fills up at about 4 MiB
    h.flush()
    assert h.pread(8 * MiB, 0) == b"".join(data)
    assert stats(tapctl, pid, minor)["nbd_mirror_failed"] == 0
    h.shutdown()
    tapctl("pause", "-p", str(pid), "-m", str(minor))  # the overlay, flushed and closed
    expected = raw(tmp_path / "expected.img")
    expected.write_bytes(b"".join(data) + bytes(SIZE - 8 * MiB))
    result = run(require("qemu-img"), "compare", "-F", "raw", overlay, expected, check=False)
    assert result.startswith("Images are identical"), result


def test_a_secondary_of_another_size_is_refused_in_one_line(tapctl, tmp_path):
    primary, secondary = raw(tmp_path / "p.img"), raw(tmp_path / "s.img", SIZE // 2)
    pid = tapctl.out("spawn")
    result = tapctl(
        "open", "-p", pid, "-a", f"raw:{primary}", "-2", f"raw:{secondary}", check=False
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "secondary" in result.stderr
    assert str(SIZE // 2) in result.stderr


def test_standby_without_a_secondary_is_a_usage_error(tapctl, tmp_path):
    primary = raw(tmp_path / "p.img")
    result = tapctl("create", "--no-connect", "-a", f"raw:{primary}", "-s", check=False)
    assert result.returncode == 1
    assert result.stderr == "tap-ctl: create: -s needs a secondary image (-2 TYPE:PATH)\n"


def test_an_nbd_secondary_that_cannot_be_reached_leaves_the_device_running_alone(tapctl, tmp_path):
    primary = raw(tmp_path / "p.img")
    pid, minor, sock = tapctl.spawn_open(f"raw:{primary}", "-2", f"nbd:{tmp_path}/nobody.sock")
    h = connect(sock)
    h.pwrite(b"\x01" * 4096, 0)
    h.flush()
    assert stats(tapctl, pid, minor)["nbd_mirror_failed"] == 1
    assert primary.read_bytes()[:4096] == b"\x01" * 4096
    h.shutdown()
