"""rbd images through the real nbd.ko: ``tap-ctl create -a rbd:…`` gives ``/dev/nbdX``.

The session's one-node cluster (``ceph`` in tests/conftest.py, scripts/ceph-dev.sh with
memstore) runs inside the VM itself: the host's Ceph binaries are the guest's, and its
monitor and OSD listen on the guest's loopback.  (The host's cluster is out of reach: the
addresses in its maps are the host's 127.0.0.1.)  Without Ceph installed these tests skip,
naming the missing package.  Every test reads the data back around tapdisk: qemu-img's own
rbd driver or ``rbd export``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kerneltools import sh, sha256_file
from rbd_helpers import Cluster
from test_tapctl import (
    MiB,
    TapCtl,
    check_ext4_in_image,
    dmesg_io_errors,
    ext4_with_files,
    finish,
    fio_verify,
)

#: fio's 4 KiB random writes per second under load: 1024 writes (4 MiB) take 20 s or more, so
#: the I/O still runs when the snapshot or the OSD restart comes (reads are not limited).
#: Under TCG the path does about 50 writes/s anyway.
WRITE_IOPS = "--rate_iops=,50"


@pytest.fixture
def tapctl(nbd_module: None, tmp_path: Path) -> Iterator[TapCtl]:
    ctl = TapCtl(tmp_path / "run")
    yield ctl
    ctl.cleanup()


def export(ceph: Cluster, name: str, dest: Path) -> Path:
    """``rbd export`` of an image or snapshot (``NAME@SNAP``) into the file ``dest``."""
    ceph.rbd("export", "--no-progress", name, dest)
    return dest


def test_an_rbd_device_holds_ext4_that_qemu_reads_back(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    name = ceph.create("64M")
    dev = tapctl.create(f"{ceph.spec(name)}:id=admin")
    assert int(sh("blockdev", "--getsize64", dev)) == 64 * MiB
    digests = ext4_with_files(dev, tmp_path)
    tapctl.destroy(dev)

    copy = tmp_path / "copy.raw"  # read by qemu-img's rbd driver, not by tapdisk
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", ceph.spec(name), copy)
    check_ext4_in_image(copy, "raw", digests, tmp_path)


def test_tapctl_snapshot_under_fio_load_takes_an_rbd_snapshot_of_the_device(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    name = ceph.create("16M")
    dev = tapctl.create(ceph.spec(name))
    pattern = tmp_path / "pattern"  # [8M, 12M): written before, untouched by fio
    pattern.write_bytes(os.urandom(4 * MiB))
    sh("dd", f"if={pattern}", f"of={dev}", "bs=1M", "seek=8", "oflag=direct", "conv=fsync",
       "status=none")  # fmt: skip
    before = sh("dmesg")
    fio = fio_verify(dev, 4, WRITE_IOPS)  # [0, 4M)
    try:
        time.sleep(2)
        assert fio.poll() is None, "fio finished before the snapshot: the test proves nothing"
        snapshot = tapctl("snapshot", "-d", dev, "-a", "rbd:under-load").strip()
    finally:
        output = finish(fio)
    assert dmesg_io_errors(dev, before) == [], output
    assert snapshot == f"rbd:{name}@under-load:conf={ceph.conf}"
    (row,) = tapctl.listing()["tapdisks"]
    assert row["spec"] == ceph.spec(name)  # the device goes on writing to the image itself
    device_digest = sha256_file(dev, 16 * MiB)
    tapctl.destroy(dev)

    image = export(ceph, name, tmp_path / "image.raw")
    assert sha256_file(image) == device_digest
    frozen = export(ceph, f"{name}@under-load", tmp_path / "frozen.raw")
    with open(frozen, "rb") as f:
        fio_region = f.read(4 * MiB)
        f.seek(8 * MiB)
        assert f.read(4 * MiB) == pattern.read_bytes()
    with open(image, "rb") as f:
        # fio wrote on after the snapshot: the snapshot holds the image as it was then
        assert fio_region != f.read(4 * MiB)


def test_an_osd_restart_under_fio_load_reaches_the_kernel_as_no_error(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    name = ceph.create("16M")
    dev = tapctl.create(ceph.spec(name))
    before = sh("dmesg")
    fio = fio_verify(dev, 4, WRITE_IOPS)
    running_while_down: list[bool] = []
    try:
        time.sleep(2)
        ceph.restart_osd(down=2.0, during=lambda: running_while_down.append(fio.poll() is None))
    finally:
        output = finish(fio)
    assert running_while_down == [True], "fio finished before the OSD stopped: proves nothing"
    assert dmesg_io_errors(dev, before) == [], output
    device_digest = sha256_file(dev, 16 * MiB)
    tapctl.destroy(dev)
    assert sha256_file(export(ceph, name, tmp_path / "image.raw")) == device_digest
