"""VBDs in a real tapdisk daemon under real NBD clients: retries, back-pressure, and
pause / unpause / snapshot while libnbd writes, with the contents verified afterwards."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import nbd
from helpers import require, run
from tapctl_helpers import nbd_uri

BLOCK = 64 * 1024
SIZE = 16 << 20


class Writers:
    """Threads writing random blocks through their own libnbd connections until stopped.

    Each thread owns every Nth block, so the expected contents are known exactly.
    """

    def __init__(self, sock: str, threads: int = 3) -> None:
        self.sock = sock
        self.expected = bytearray(SIZE)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.writes = 0
        self.threads = [
            threading.Thread(target=self._run, args=(k, threads), daemon=True)
            for k in range(threads)
        ]

    def _run(self, k: int, n: int) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(nbd_uri(self.sock))
            rng = random.Random(k)
            blocks = list(range(k, SIZE // BLOCK, n))
            while not self.stop.is_set():
                block = rng.choice(blocks)
                data = rng.randbytes(BLOCK)
                h.pwrite(data, block * BLOCK)
                self.expected[block * BLOCK : (block + 1) * BLOCK] = data
                self.writes += 1
            h.flush()
            h.shutdown()
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def wait_for_writes(self, count: int, timeout: float = 30) -> None:
        target = self.writes + count
        deadline = time.monotonic() + timeout
        while self.writes < target and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.writes >= target, "writers made no progress"


def read_all(sock: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(nbd_uri(sock))
    data = h.pread(SIZE, 0)
    h.shutdown()
    return data


def test_pause_and_unpause_under_concurrent_writes_lose_nothing(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor, sock = tapctl.spawn_open(f"raw:{path}")
    target = ("-p", str(pid), "-m", str(minor))
    with Writers(sock) as writers:
        for _ in range(5):
            writers.wait_for_writes(20)
            tapctl.out("pause", *target)
            count = writers.writes
            time.sleep(0.2)
            assert writers.writes <= count + 3  # at most the requests already answered
            tapctl.out("unpause", *target)
        writers.wait_for_writes(20)
    assert writers.errors == []
    assert read_all(sock) == bytes(writers.expected)
    tapctl.out("close", *target)
    assert path.read_bytes() == bytes(writers.expected)


def test_snapshots_under_concurrent_writes_keep_every_write(tapctl, raw_image, tmp_path):
    base = raw_image("16M")
    pid, minor, sock = tapctl.spawn_open(f"raw:{base}")
    target = ("-p", str(pid), "-m", str(minor))
    overlays = [tmp_path / "snap1.qcow2", tmp_path / "snap2.qcow2"]
    with Writers(sock) as writers:
        for overlay in overlays:
            writers.wait_for_writes(30)
            assert tapctl.out("snapshot", *target, "-a", f"qcow2:{overlay}") == f"qcow2:{overlay}"
        writers.wait_for_writes(30)
    assert writers.errors == []
    assert read_all(sock) == bytes(writers.expected)
    assert tapctl.listing()[0]["spec"] == f"qcow2:{overlays[-1]}"
    tapctl.out("close", *target)
    run(require("qemu-img"), "check", "-q", overlays[-1])
    flat = tmp_path / "flat.raw"
    run(require("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", overlays[-1], flat)
    assert flat.read_bytes() == bytes(writers.expected)
    info = json.loads(run(require("qemu-img"), "info", "--output=json", overlays[-1]))
    assert info["backing-filename"] == str(overlays[0])


def test_snapshot_into_an_existing_file_is_refused_and_the_device_keeps_running(
    tapctl, raw_image, tmp_path
):
    pid, minor, sock = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    existing = tmp_path / "there.qcow2"
    existing.write_bytes(b"keep me")
    proc = tapctl(
        "snapshot", "-p", str(pid), "-m", str(minor), "-a", f"qcow2:{existing}", check=False
    )
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert existing.read_bytes() == b"keep me"
    assert tapctl.listing()[0]["state"] == 0
    run(require("qemu-io"), "-f", "raw", "-c", "write 0 4k", nbd_uri(sock))


def test_faults_shorter_than_the_deadline_never_reach_the_nbd_client(tapctl, raw_image):
    path = raw_image("16M", "write -P 0x5f 0 64k")
    pid, minor, sock = tapctl.spawn_open(f"fault:duration=1,count=1:raw:{path}", "-t", "10")
    out = run(
        require("qemu-io"),
        "-f",
        "raw",
        "-c",
        "read -P 0x5f 0 64k",
        "-c",
        "write -P 3 1M 64k",
        nbd_uri(sock),
    )
    assert "Pattern verification failed" not in out
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))["vbd"]
    assert stats["retries"] > 0
    assert stats["errors"] == []


def test_faults_longer_than_the_deadline_reach_the_nbd_client_as_eio(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor, sock = tapctl.spawn_open(f"fault:ops=read,duration=60:raw:{path}", "-t", "1")
    t0 = time.monotonic()
    proc = run(require("qemu-io"), "-f", "raw", "-c", "read 0 4k", nbd_uri(sock), check=False)
    assert "Input/output error" in proc
    assert time.monotonic() - t0 >= 1
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))["vbd"]
    assert {"op": "read", "errno": "EIO", "count": 1} in stats["errors"]


def test_requests_to_a_paused_device_are_bounded_by_the_queue_depth(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor, sock = tapctl.spawn_open(f"raw:{path}")
    target = ("-p", str(pid), "-m", str(minor))
    tapctl.out("pause", *target)
    handles = []
    for k in range(2):
        h = nbd.NBD()
        h.connect_uri(nbd_uri(sock))
        for i in range(200):
            h.aio_pwrite(bytes([k + 1]) * 4096, (k * 200 + i) * 4096)
        handles.append(h)
    deadline = time.monotonic() + 10
    stats = {}
    while time.monotonic() < deadline:
        for h in handles:
            h.poll(0)
        stats = json.loads(tapctl.out("stats", *target))["vbd"]
        if stats["in_flight"] >= 256:
            break
    assert stats["in_flight"] == 256  # the default queue depth; the rest wait in the server
    assert stats["queued"] == 256
    tapctl.out("unpause", *target)
    for h in handles:
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
        h.shutdown()
    data = path.read_bytes()
    assert data[: 200 * 4096] == b"\x01" * (200 * 4096)
    assert data[200 * 4096 : 400 * 4096] == b"\x02" * (200 * 4096)


def test_a_deep_nbdcopy_stream_through_the_daemon_matches_the_file(tapctl, raw_image, tmp_path):
    source = tmp_path / "src.raw"
    source.write_bytes(os.urandom(SIZE))
    path = raw_image("16M")
    _, _, sock = tapctl.spawn_open(f"raw:{path}")
    run(require("nbdcopy"), "--requests=64", source, nbd_uri(sock))
    run(require("nbdcopy"), nbd_uri(sock), tmp_path / "back.raw")
    assert (tmp_path / "back.raw").read_bytes() == source.read_bytes()
    assert Path(path).read_bytes() == source.read_bytes()


def test_vhd_snapshot_under_concurrent_writes_keeps_every_write(tapctl, tmp_path, serve):
    from tapdisk.drivers.vhd.create import create_vhd

    base = tmp_path / "base.vhd"
    create_vhd(str(base), SIZE)
    pid, minor, sock = tapctl.spawn_open(f"vhd:{base}")
    target = ("-p", str(pid), "-m", str(minor))
    overlay = tmp_path / "leaf.vhd"
    with Writers(sock) as writers:
        writers.wait_for_writes(30)
        assert tapctl.out("snapshot", *target, "-a", f"vhd:{overlay}") == f"vhd:{overlay}"
        writers.wait_for_writes(30)
    assert writers.errors == []
    assert read_all(sock) == bytes(writers.expected)
    tapctl.out("close", *target)
    # qemu cannot read differencing VHDs; a fresh tapdisk opens the chain from disk.
    reopened = serve(f"vhd:{overlay}", "--read-only")
    assert read_all(str(reopened.socket)) == bytes(writers.expected)


def test_a_failed_snapshot_leaves_the_device_running_on_its_image(tapctl, raw_image, tmp_path):
    path = raw_image("16M")
    pid, minor, sock = tapctl.spawn_open(f"raw:{path}")
    target = ("-p", str(pid), "-m", str(minor))
    missing_dir = tmp_path / "no" / "such" / "dir" / "snap.qcow2"
    proc = tapctl("snapshot", *target, "-a", f"qcow2:{missing_dir}", check=False)
    assert proc.returncode == 1 and "cannot create overlay" in proc.stderr
    [info] = tapctl.listing()
    assert info["state"] == 0 and info["spec"] == f"raw:{path}"
    out = run(
        require("qemu-io"),
        "-f",
        "raw",
        "-c",
        "write -P 9 0 4k",
        "-c",
        "read -P 9 0 4k",
        nbd_uri(sock),
    )
    assert "Pattern verification failed" not in out


def test_adjacent_requests_from_a_real_client_are_merged(tapctl, raw_image):
    path = raw_image("16M")
    # rate=0 injects nothing but keeps every request off the page-cache shortcut.
    pid, minor, sock = tapctl.spawn_open(f"fault:rate=0:raw:{path}")
    commands = []
    for i in range(32):
        commands += ["-c", f"aio_write -P {i + 1} {i * 4096} 4k"]
    run(require("qemu-io"), "-f", "raw", *commands, "-c", "aio_flush", nbd_uri(sock))
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))["vbd"]
    assert stats["merges"] > 0
    assert stats["writes"] == 32
    data = path.read_bytes()
    assert data[: 32 * 4096] == b"".join(bytes([i + 1]) * 4096 for i in range(32))
