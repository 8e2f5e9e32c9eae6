"""Online commit (``tap-ctl commit``, ``query``, ``cancel``), as XCP-ng's storage manager
coalesces a QCOW2 chain that a running VM holds open.

Chains are made by qemu-img; libnbd writers keep writing to the leaf and verifying
every read while the image below it is merged into its parent and dropped; the chain
left on disk (leaf over base, the middle image deleted) is then compared by qemu-img
with what the writers wrote.  The query lines are parsed with SM's own pattern.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from image_helpers import qemu_img, qemu_io
from migration_helpers import SIZE, MiB, Writers, compare_with, holds_open
from nbd_servers import nbdkit
from tapctl_helpers import TapCtl, nbd_uri

#: SM's parse of ``tap-ctl query`` (xcp-ng/sm, drivers/blktap2.py, TapCtl.query).
QUERY = re.compile(r"Commit status '(.+)' \((\d+)\/(\d+)\)")
#: The header extension XCP-ng's SM keeps its "hidden" flag in (type "vate", 8 bytes).
HIDDEN_EXTENSION = 0x76617465
#: Seconds each write to the slow parent takes (nbdkit's delay filter).
WRITE_DELAY = 4


def chain(tmp_path: Path) -> tuple[Path, Path, Path, bytearray]:
    """base <- mid <- leaf, each holding data of its own, and what the leaf reads."""
    base, mid, leaf = (tmp_path / f"{name}.qcow2" for name in ("base", "mid", "leaf"))
    qemu_img("create", "-q", "-f", "qcow2", base, str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", leaf)
    ref = bytearray(SIZE)
    for path, pattern, start, length in (
        (base, 0x11, 0, 24 * MiB),
        (mid, 0x22, 8 * MiB, 24 * MiB),
        (leaf, 0x33, 28 * MiB, 8 * MiB),
    ):
        qemu_io("qcow2", path, f"write -P {pattern} {start} {length}")
        ref[start : start + length] = bytes([pattern]) * length
    qemu_io("qcow2", mid, f"write -z {4 * MiB} {2 * MiB}")  # zeroes over the base's data
    ref[4 * MiB : 6 * MiB] = bytes(2 * MiB)
    return base, mid, leaf, ref


def add_hidden_flag(path: Path, value: int) -> None:
    """Add SM's extension (as its qcow2util does: before the end marker, the backing file
    name moved up behind it)."""
    data = bytearray(path.read_bytes()[:65536])
    name_offset, name_size = struct.unpack_from(">QI", data, 8)
    name = bytes(data[name_offset : name_offset + name_size])
    pos = struct.unpack_from(">I", data, 100)[0]  # header_length (v3)
    while struct.unpack_from(">I", data, pos)[0] != 0:
        pos += 8 + -(-struct.unpack_from(">I", data, pos + 4)[0] // 8) * 8
    tail = struct.pack(">IIQ", HIDDEN_EXTENSION, 8, value << 56) + bytes(8) + name
    struct.pack_into(">Q", data, 8, pos + 24)
    data[pos : pos + len(tail)] = tail
    with open(path, "r+b") as f:
        f.write(data[: pos + len(tail)])


def hidden_flag(path: Path) -> int | None:
    data = path.read_bytes()[:65536]
    pos = struct.unpack_from(">I", data, 100)[0]
    while (kind := struct.unpack_from(">I", data, pos)[0]) != 0:
        length = struct.unpack_from(">I", data, pos + 4)[0]
        if kind == HIDDEN_EXTENSION:
            return data[pos + 8]
        pos += 8 + -(-length // 8) * 8
    return None


def query(tapctl: TapCtl, pid: int, minor: int) -> tuple[str, int, int]:
    match = QUERY.match(tapctl.out("query", "-p", str(pid), "-m", str(minor)))
    assert match, "tap-ctl query printed no status line SM can parse"
    return match.group(1), int(match.group(2)), int(match.group(3))


def wait_concluded(tapctl: TapCtl, pid: int, minor: int) -> int:
    """Poll as SM's coalesceOnline does; the bytes coalesced."""
    deadline = time.monotonic() + 120
    status, done, total = query(tapctl, pid, minor)
    while status != "concluded":
        assert status == "running", status
        assert time.monotonic() < deadline, "the commit did not conclude within 120 s"
        time.sleep(0.05)
        status, done, total = query(tapctl, pid, minor)
    assert done == total == SIZE
    return done


def backing_of(path: Path) -> tuple[str, str]:
    info = json.loads(qemu_img("info", "--output=json", "-U", path))
    return info["backing-filename"], info["backing-filename-format"]


def test_a_middle_image_is_merged_and_dropped_under_verifying_writers(
    tapctl: TapCtl, tmp_path: Path
) -> None:
    base, mid, leaf, ref = chain(tmp_path)
    add_hidden_flag(mid, 1)
    add_hidden_flag(leaf, 0)
    pid, minor, sock = tapctl.spawn_open(f"qcow2:{leaf}")
    writers = Writers(sock, ref, seed=81)
    # A relative path, and the type SM's tap-ctl call leaves out: both name the same image.
    tapctl("commit", "-p", str(pid), "-m", str(minor), "-a", f"qcow2:{mid.name}", cwd=tmp_path)
    assert wait_concluded(tapctl, pid, minor) == SIZE
    assert query(tapctl, pid, minor) == ("undefined", 0, 0)  # reported once, then forgotten
    assert not holds_open(pid, mid) and holds_open(pid, base)
    assert backing_of(leaf) == ("base.qcow2", "qcow2")
    assert hidden_flag(leaf) == 0  # SM's extension survives the header's rewrite
    writers.go_on(10)
    writers.finish()
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    mid.unlink()  # the chain on disk no longer needs it
    compare_with(ref, leaf, "qcow2", tmp_path)
    qemu_img("check", "-q", base)
    tapctl("unpause", "-p", str(pid), "-m", str(minor))
    [row] = tapctl.listing()
    assert row["spec"] == f"qcow2:{leaf}"


def test_commit_refuses_the_leaf_an_image_outside_the_chain_and_the_base(
    tapctl: TapCtl, tmp_path: Path
) -> None:
    base, mid, leaf, _ = chain(tmp_path)
    pid, minor, _ = tapctl.spawn_open(f"qcow2:{leaf}")
    target = ("-p", str(pid), "-m", str(minor))
    assert query(tapctl, pid, minor) == ("undefined", 0, 0)
    for path, why in (
        (leaf, "leaf, which the guest writes"),
        (tmp_path / "other.qcow2", "is not in minor"),
        (base, "has no parent to commit into"),
    ):
        proc = tapctl("commit", *target, "-a", str(path), check=False)
        assert proc.returncode != 0 and why in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"tap-ctl: commit of {path} refused: ")
        assert proc.stderr.count("\n") == 1
    tapctl("cancel", *target, "-w")  # nothing to cancel: no error
    assert holds_open(pid, mid)


def test_a_commit_that_fails_leaves_the_chain_and_says_why_once(
    tapctl: TapCtl, tmp_path: Path, tiny_fs: Path
) -> None:
    """The parent sits on a 4 MiB file system: the copy of 24 MiB fails with ENOSPC."""
    base = tiny_fs / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, str(SIZE))
    mid, leaf = tmp_path / "mid.qcow2", tmp_path / "leaf.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", leaf)
    qemu_io("qcow2", mid, f"write -P 0x44 0 {24 * MiB}")
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"allowed_dirs: [{tmp_path}, {tiny_fs}]\n")
    pid = int(tapctl.out("spawn", "--config", str(config)))
    sock = tapctl.out("open", "-p", str(pid), "-a", f"qcow2:{leaf}")
    minor = int(sock.rsplit(".", 1)[1])
    target = ("-p", str(pid), "-m", str(minor))
    tapctl("commit", *target, "-a", str(mid))
    deadline = time.monotonic() + 60
    while (proc := tapctl("query", *target, check=False)).returncode == 0:
        assert QUERY.match(proc.stdout).group(1) == "running"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert proc.stderr.startswith(f"tap-ctl: commit of {mid} failed: ")
    assert "No space left on device" in proc.stderr and proc.stderr.count("\n") == 1
    assert query(tapctl, pid, minor) == ("undefined", 0, 0)
    assert holds_open(pid, mid) and backing_of(leaf) == ("mid.qcow2", "qcow2")
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    assert handle.pread(MiB, 0) == b"\x44" * MiB  # still read through mid
    handle.shutdown()


@pytest.fixture
def slow_parent(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """leaf <- mid (8 MiB of data) <- a raw parent served by nbdkit, whose every write takes
    ``WRITE_DELAY`` seconds: a commit stays in its first write that long, so what a test
    does meanwhile meets a running job.  Yields (mid, leaf, the tapdisk's config)."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"")
    os.truncate(base, SIZE)
    sock = tmp_path / "parent.sock"
    server = nbdkit(sock, "--filter=delay", "file", str(base), f"wdelay={WRITE_DELAY}")
    mid, leaf = tmp_path / "mid.qcow2", tmp_path / "leaf.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", server.uri(), "-F", "raw", mid, str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", leaf)
    qemu_io("qcow2", mid, f"write -P 0x55 0 {8 * MiB}")
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"allowed_dirs: [{tmp_path}]\nremote_backing: true\n")
    try:
        yield mid, leaf, config
    finally:
        server.stop()


def committing(tapctl: TapCtl, mid: Path, leaf: Path, config: Path) -> tuple[int, int, str]:
    """A tapdisk serving ``leaf``, committing ``mid`` into the slow parent: (pid, minor, sock)."""
    pid = int(tapctl.out("spawn", "--config", str(config)))
    sock = tapctl.out("open", "-p", str(pid), "-a", f"qcow2:{leaf}")
    minor = int(sock.rsplit(".", 1)[1])
    tapctl("commit", "-p", str(pid), "-m", str(minor), "-a", str(mid))
    assert query(tapctl, pid, minor)[0] == "running"
    return pid, minor, sock


@pytest.mark.parametrize("stop", ["cancel", "pause"])
def test_a_cancelled_or_paused_commit_leaves_the_chain_and_is_not_concluded(
    tapctl: TapCtl, slow_parent: tuple[Path, Path, Path], stop: str
) -> None:
    mid, leaf, config = slow_parent
    pid, minor, sock = committing(tapctl, mid, leaf, config)
    target = ("-p", str(pid), "-m", str(minor))
    tapctl(*(("cancel", *target, "-w") if stop == "cancel" else ("pause", *target)))
    proc = tapctl("query", *target, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (
        f"tap-ctl: commit of {mid} cancelled: stopped by tap-ctl cancel, a pause or a close; "
        "the chain is as it was\n"
    )
    assert query(tapctl, pid, minor) == ("undefined", 0, 0)
    if stop == "pause":
        tapctl("unpause", *target)
    assert holds_open(pid, mid) and backing_of(leaf) == ("mid.qcow2", "qcow2")
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    assert handle.pread(MiB, 7 * MiB) == b"\x55" * MiB
    handle.shutdown()


@pytest.mark.parametrize("command", ["restart", "mirror", "commit"])
def test_a_restart_a_migration_or_a_second_commit_is_refused_while_a_commit_runs(
    tapctl: TapCtl, slow_parent: tuple[Path, Path, Path], tmp_path: Path, command: str
) -> None:
    mid, leaf, config = slow_parent
    pid, minor, _ = committing(tapctl, mid, leaf, config)
    copy = tmp_path / "copy.img"
    copy.write_bytes(b"")
    os.truncate(copy, SIZE)
    args = {
        "restart": ("restart", "-p", str(pid)),
        "mirror": ("mirror", "-p", str(pid), "-m", str(minor), "-a", f"raw:{copy}"),
        "commit": ("commit", "-p", str(pid), "-m", str(minor), "-a", str(mid)),
    }[command]
    refused = tapctl(*args, check=False)
    assert refused.returncode != 0
    assert f"minor {minor} is" in refused.stderr and f"committing {mid}" in refused.stderr
    assert tapctl.pids() == [pid]
    assert query(tapctl, pid, minor)[0] == "running"
