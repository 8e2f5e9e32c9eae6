"""Changed-block tracking through real tapdisk daemons: tap-ctl ``-C``/``-c`` and SM's flows.

Writes go through the NBD socket with libnbd; the log is read back from the
file with cbt-util (what SM reads) and compared with logs packed by hand.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path

import nbd
import pytest
from cbt_helpers import BLOCK, bitmap_of, header, marked, new_log, ok, write_blocks, write_log
from tapctl_helpers import nbd_uri, wait_gone

P = uuid.UUID("4c4a1c6e-5d0b-4f57-9a43-0b0f6f3d2a11")
C = uuid.UUID("a1f0d6c2-0e3b-4a8e-8f0c-2b7d9e4c5a66")
SIZE = 64 << 20


@pytest.fixture
def disk(raw_image) -> Path:
    return raw_image(str(SIZE))


def connect(sock: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(nbd_uri(sock))
    return h


def maps(pid: int, path: Path) -> bool:
    """Whether tapdisk ``pid`` has ``path`` mapped."""
    return str(path) in Path(f"/proc/{pid}/maps").read_text()


def test_open_marks_exactly_the_blocks_each_nbd_request_touches(tapctl, disk, tmp_path):
    log = write_log(tmp_path / "disk.cbtlog", SIZE, (), parent=P, child=C)
    _, _, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    h = connect(sock)
    h.pwrite(b"a" * 512, 0)  # block 0
    h.pwrite(b"b" * 2, 5 * BLOCK - 1)  # blocks 4 and 5
    h.pwrite(b"c" * (3 * BLOCK), 10 * BLOCK + 512)  # 10 to 13
    h.zero(BLOCK, 40 * BLOCK)  # 40
    h.trim(2 * BLOCK, 60 * BLOCK + 1)  # 60 to 62
    h.pwrite(b"d" * 4096, SIZE - 4096, nbd.CMD_FLAG_FUA)  # the last block
    h.pread(SIZE // 2, 0)
    h.flush()
    # Every mark is in the file as soon as its request is acknowledged; the header is SM's.
    last = SIZE // BLOCK - 1
    expected = {0, 4, 5, 10, 11, 12, 13, 40, 60, 61, 62, last}
    assert log.read_bytes() == header(SIZE, P, C) + bitmap_of(SIZE, expected)
    assert marked(log) == expected
    h.shutdown()


def test_create_no_attach_marks_in_a_log_named_relative_to_the_caller(tapctl, disk, tmp_path):
    new_log(tmp_path / "disk.cbtlog", SIZE)
    sock = tapctl("create", "--no-attach", "-a", f"raw:{disk}", "-C", "disk.cbtlog", cwd=tmp_path)
    write_blocks(sock.stdout.strip(), [7, 300])
    assert marked(tmp_path / "disk.cbtlog") == {7, 300}
    [info] = tapctl.listing()
    assert info["cbt_log"] == str(tmp_path / "disk.cbtlog")


def test_list_and_stats_name_the_log(tapctl, disk, tmp_path):
    log = new_log(tmp_path / "disk.cbtlog", SIZE)
    pid, minor, _ = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    [info] = tapctl.listing()
    assert info["cbt_log"] == str(log)
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))
    assert stats["cbt_log"] == str(log)


def test_a_missing_log_fails_the_open_and_leaves_nothing_behind(tapctl, disk, tmp_path):
    missing = tmp_path / "missing.cbtlog"
    pid = tapctl.out("spawn")
    proc = tapctl("open", "-p", pid, "-a", f"raw:{disk}", "-C", str(missing), check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"tap-ctl: CBT log {missing}: no such file (logs are made by cbt-util)\n"
    assert not missing.exists()
    assert tapctl.out("list") == f"pid={pid} minor=- state=- args=-"
    # The minor it would have had is free again, and the image is not held open.
    sock = tapctl.out("open", "-p", pid, "-a", f"raw:{disk}")
    assert sock.endswith(".0")
    # create spawns a tapdisk and stops it again.
    proc = tapctl("create", "--no-attach", "-a", f"raw:{disk}", "-C", str(missing), check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "no such file" in proc.stderr
    assert tapctl.pids() == [int(pid)]
    assert not missing.exists()


def test_a_log_too_short_for_the_disk_fails_the_open(tapctl, disk, tmp_path):
    short = new_log(tmp_path / "short.cbtlog", SIZE // 2)
    pid = tapctl.out("spawn")
    proc = tapctl("open", "-p", pid, "-a", f"raw:{disk}", "-C", str(short), check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"tap-ctl: {short}: CBT log ends at byte ")
    assert tapctl.out("list") == f"pid={pid} minor=- state=- args=-"


def test_a_fifo_or_a_directory_as_the_log_fails_the_open_at_once(tapctl, disk, tmp_path):
    fifo = tmp_path / "fifo.cbtlog"
    os.mkfifo(fifo)
    pid = tapctl.out("spawn")
    for log, kind in ((fifo, "a FIFO"), (tmp_path, "a directory")):
        proc = tapctl("open", "-p", pid, "-a", f"raw:{disk}", "-C", str(log), check=False)
        assert proc.returncode == 1
        assert proc.stderr == f"tap-ctl: {log} is {kind}, not a regular file or block device\n"
    assert tapctl.out("list") == f"pid={pid} minor=- state=- args=-"


def test_a_log_outside_the_allowed_directories_is_refused(tapctl, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    disk = images / "disk.raw"
    disk.write_bytes(bytes(SIZE))
    log = new_log(tmp_path / "disk.cbtlog", SIZE)
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"allowed_dirs: [{images}]\n")
    proc = tapctl(
        "create", "--config", str(config), "--no-attach", "-a", f"raw:{disk}", "-C", str(log),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"CBT log {log}: outside the allowed directories ({images})" in proc.stderr
    assert tapctl.pids() == []
    inside = new_log(images / "disk.cbtlog", SIZE)
    tapctl("create", "--config", str(config), "--no-attach", "-a", f"raw:{disk}", "-C", str(inside))


def test_pause_releases_the_log_and_unpause_c_reads_what_sm_coalesced_into_it(
    tapctl, disk, tmp_path
):
    """VDI.delete of a snapshot whose child is attached: pause, coalesce, unpause -c."""
    parent = new_log(tmp_path / "parent.cbtlog", SIZE, {1, 2, 900})
    child = new_log(tmp_path / "child.cbtlog", SIZE)
    pid, minor, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(child))
    write_blocks(sock, [5])
    assert maps(pid, child)
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    assert not maps(pid, child)
    ok("coalesce", "-p", parent, "-c", child)
    tapctl("unpause", "-p", str(pid), "-m", str(minor), "-a", f"raw:{disk}", "-c", str(child))
    assert maps(pid, child)
    write_blocks(sock, [6, 900])
    assert marked(child) == {1, 2, 5, 6, 900}
    assert marked(parent) == {1, 2, 900}


def test_unpause_c_onto_a_new_log_after_sm_renamed_the_old_one_for_a_snapshot(
    tapctl, disk, tmp_path
):
    """SM's CBT snapshot: vdi.cbtlog becomes snap.cbtlog, a new vdi.cbtlog takes over."""
    vdi = new_log(tmp_path / "vdi.cbtlog", SIZE)
    snap = tmp_path / "snap.cbtlog"
    pid, minor, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(vdi))
    write_blocks(sock, [3, 4])
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    vdi.rename(snap)
    ok("set", "-n", snap, "-f", "1", "-c", C)
    new_log(vdi, SIZE)
    ok("set", "-n", vdi, "-p", P)
    tapctl("unpause", "-p", str(pid), "-m", str(minor), "-a", f"raw:{disk}", "-c", str(vdi))
    write_blocks(sock, [4, 8])
    assert snap.read_bytes() == header(SIZE, child=C, consistent=1) + bitmap_of(SIZE, {3, 4})
    assert vdi.read_bytes() == header(SIZE, parent=P) + bitmap_of(SIZE, {4, 8})
    assert maps(pid, vdi) and not maps(pid, snap)


def test_unpause_without_c_stops_tracking(tapctl, disk, tmp_path):
    log = new_log(tmp_path / "disk.cbtlog", SIZE)
    pid, minor, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    write_blocks(sock, [1])
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    tapctl("unpause", "-p", str(pid), "-m", str(minor))
    write_blocks(sock, [2, 3])
    assert marked(log) == {1}
    assert not maps(pid, log)
    [info] = tapctl.listing()
    assert info["cbt_log"] is None
    # And -c starts it again, on any log.
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    tapctl("unpause", "-p", str(pid), "-m", str(minor), "-c", str(log))
    write_blocks(sock, [9])
    assert marked(log) == {1, 9}


def test_unpause_c_with_a_missing_log_fails_and_the_device_stays_paused(tapctl, disk, tmp_path):
    log = new_log(tmp_path / "disk.cbtlog", SIZE)
    missing = tmp_path / "missing.cbtlog"
    pid, minor, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    proc = tapctl("unpause", "-p", str(pid), "-m", str(minor), "-c", str(missing), check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"tap-ctl: CBT log {missing}: no such file (logs are made by cbt-util)\n"
    assert not missing.exists()
    [info] = tapctl.listing()
    assert info["state"] == 0x2 and info["cbt_log"] == str(log)
    tapctl("unpause", "-p", str(pid), "-m", str(minor), "-c", str(log))
    write_blocks(sock, [12])
    assert marked(log) == {12}


def test_snapshot_keeps_marking_the_same_log(tapctl, disk, tmp_path):
    log = new_log(tmp_path / "disk.cbtlog", SIZE)
    pid, minor, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    write_blocks(sock, [2])
    overlay = tmp_path / "overlay.qcow2"
    tapctl("snapshot", "-p", str(pid), "-m", str(minor), "-a", f"qcow2:{overlay}")
    write_blocks(sock, [3, 700])
    assert marked(log) == {2, 3, 700}
    [info] = tapctl.listing()
    assert info["spec"] == f"qcow2:{overlay}" and info["cbt_log"] == str(log)


def test_kill_9_of_the_tapdisk_keeps_the_mark_of_every_acknowledged_write(
    tapctl, raw_image, tmp_path
):
    size = 4 << 30  # 65536 blocks: a few hundred random writes set few of them
    disk = raw_image(str(size))
    log = new_log(tmp_path / "disk.cbtlog", size)
    pid, _, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    started: list[tuple[int, int]] = []
    acked: list[tuple[int, int]] = []

    def writer(seed: int) -> None:
        h = connect(sock)
        rng = random.Random(seed)
        try:
            while True:
                length = rng.choice([512, 4096, BLOCK, 200_000, 1 << 20])
                offset = rng.randrange(0, size - length)
                started.append((offset, length))
                kind = rng.random()
                if kind < 0.7:
                    h.pwrite(rng.randbytes(length), offset)
                elif kind < 0.85:
                    h.zero(length, offset)
                else:
                    h.trim(length, offset)
                acked.append((offset, length))
        except nbd.Error:
            return  # the tapdisk is gone

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acked) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(30)
    assert wait_gone(pid)
    assert len(acked) >= 300

    def touched(requests: list[tuple[int, int]]) -> set[int]:
        return {b for off, n in requests for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1)}

    logged = marked(log)
    assert touched(acked) <= logged  # nothing acknowledged went unmarked
    assert logged <= touched(started)  # and nothing was marked that no request touched
