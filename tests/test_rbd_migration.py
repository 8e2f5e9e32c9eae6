"""Live migration into and out of Ceph: ``tap-ctl mirror --switch`` moves a running device
from a local file to an RBD image (a pool outgrowing its hosts' disks) and from an RBD image
back to a local file, under libnbd writers that verify every read.  The target then holds
what they wrote, byte for byte, as ``rbd export`` or the file shows it."""

from __future__ import annotations

import json
from pathlib import Path

from migration_helpers import SIZE, MiB, Writers, compare_with, holds_open, old_target, source_qcow2
from rbd_helpers import Cluster
from tapctl_helpers import TapCtl


def switch(tapctl: TapCtl, pid: int, minor: int, spec: str) -> None:
    """Move the device to ``spec`` and check the command's last progress line."""
    result = tapctl("mirror", "-p", str(pid), "-m", str(minor), "-a", spec, "--switch")
    final = json.loads(result.stdout.splitlines()[-1])
    assert final["final"] and final["state"] == "switched", final
    assert final["done"] == final["total"] == SIZE
    [row] = tapctl.listing()
    assert row["spec"] == spec


def imported(ceph: Cluster, data: bytes, path: Path) -> str:
    """A new rbd image holding ``data`` (``rbd import``); returns ``rbd/NAME``."""
    name = ceph.create()  # for its unique name
    ceph.rbd("rm", "--no-progress", name)
    path.write_bytes(data)
    ceph.rbd("import", "--no-progress", path, name)
    return name


def test_a_local_device_moves_live_into_an_rbd_image(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    source, ref = source_qcow2(tmp_path)
    name = imported(ceph, b"\x99" * SIZE, tmp_path / "old.raw")  # all of it must go
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"ceph_conf: {ceph.conf}\nallowed_dirs: [{tmp_path}]\n")
    pid = int(tapctl.out("spawn", "--config", str(config)))
    sock = tapctl.out("open", "-p", str(pid), "-a", f"qcow2:{source}")
    minor = int(sock.rsplit(".", 1)[1])
    writer = Writers(sock, ref, seed=61)
    switch(tapctl, pid, minor, f"rbd:{name}")  # the cluster comes from the YAML
    assert not holds_open(pid, source)
    writer.go_on(10)  # the guest goes on, in Ceph alone
    writer.finish()
    tapctl("close", "-p", str(pid), "-m", str(minor))
    ceph.export(name, tmp_path / "export.raw")
    compare_with(ref, tmp_path / "export.raw", "raw", tmp_path)


def test_an_rbd_device_moves_live_to_a_local_file_and_lets_go_of_the_image(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    ref = bytearray(SIZE)
    for i, start in enumerate(range(0, SIZE, 16 << 20)):
        ref[start : start + (8 << 20)] = bytes([0x41 + i]) * (8 << 20)
    name = imported(ceph, bytes(ref), tmp_path / "source.raw")
    target = old_target(tmp_path / "target.img")
    pid, minor, sock = tapctl.spawn_open(ceph.spec(name))
    assert "watcher=" in ceph.rbd("status", name)
    writer = Writers(sock, ref, seed=62)
    switch(tapctl, pid, minor, f"raw:{target}")
    assert "watcher=" not in ceph.rbd("status", name)  # librbd closed: the image is free
    writer.go_on(10)
    writer.finish()
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    compare_with(ref, target, "raw", tmp_path)


def test_a_move_into_rbd_leaves_the_source_s_holes_unallocated_in_the_pool(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    """The copy zeroes a hole with unmap allowed, which librbd turns into whole objects
    discarded: the image stays as thin as its source (16 of 64 MiB are holes)."""
    source, _ = source_qcow2(tmp_path)  # data in [0, 16), [20, 36) and [44, 60) MiB
    name = imported(ceph, b"\x99" * SIZE, tmp_path / "old.raw")
    pid, minor, _ = tapctl.spawn_open(f"qcow2:{source}")
    switch(tapctl, pid, minor, ceph.spec(name))
    tapctl("close", "-p", str(pid), "-m", str(minor))
    allocated = ceph.allocated(name)
    objects = [(start, 4 * MiB) for start in range(0, SIZE, 4 * MiB)]
    holes = {16, 36, 40, 60}  # MiB where the source's four holed objects start
    assert allocated == [(start, length) for start, length in objects if start // MiB not in holes]
