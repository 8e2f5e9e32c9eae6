"""``tap-ctl`` against the real nbd.ko: create, file systems, fio, pause/snapshot, destroy.

Every test spawns real tapdisk daemons through the project's ``tap-ctl`` with
a private control directory, and checks the images afterwards with qemu-img
(an independent reader of the formats).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kerneltools import sh, sha256_file

from tapdisk import kernel

MiB = 1 << 20
TAPCTL = str(Path(sys.executable).with_name("tap-ctl"))
#: qemu-img format names of our image types (force_size: no CHS rounding of VHD sizes).
QEMU_FORMAT = {"raw": ["-f", "raw"], "vhd": ["-f", "vpc", "-o", "subformat=dynamic,force_size=on"]}
QEMU_FORMAT["qcow2"] = ["-f", "qcow2"]


def make_image(tmp_path: Path, kind: str, size: int = 64 * MiB, name: str = "disk") -> Path:
    path = tmp_path / f"{name}.{kind}"
    sh("qemu-img", "create", "-q", *QEMU_FORMAT[kind], path, str(size))
    return path


@dataclass
class TapCtl:
    """``tap-ctl`` with a private control directory; tears down what it created."""

    directory: Path
    devices: list[str] = field(default_factory=list)

    def __call__(self, command: str, *args: str | os.PathLike[str], timeout: float = 300) -> str:
        return sh(TAPCTL, command, "--control-dir", self.directory, *args, timeout=timeout)

    def create(self, spec: str, *args: str) -> str:
        dev = self("create", "-a", spec, *args).strip()
        assert re.fullmatch(r"/dev/nbd\d+", dev), dev
        self.devices.append(dev)
        return dev

    def destroy(self, dev: str) -> None:
        self("destroy", "-d", dev)
        self.devices.remove(dev)

    def listing(self) -> dict[str, list]:  # type: ignore[type-arg]
        return json.loads(self("list", "--json"))  # type: ignore[no-any-return]

    def pids(self) -> list[int]:
        listing = self.listing()
        return sorted({row["pid"] for row in listing["tapdisks"]} | set(listing["idle"]))

    def cleanup(self) -> None:
        for dev in list(self.devices):
            try:
                self.destroy(dev)
            except AssertionError:
                kernel.disconnect(int(dev.removeprefix("/dev/nbd")))
        for pid in self.pids():
            os.kill(pid, 9)


@pytest.fixture
def tapctl(nbd_module: None, tmp_path: Path) -> Iterator[TapCtl]:
    ctl = TapCtl(tmp_path / "run")
    yield ctl
    ctl.cleanup()


def ext4_with_files(dev: str, tmp_path: Path) -> dict[str, str]:
    """A new ext4 on ``dev`` holding ``write_files``, checked by e2fsck once unmounted
    (mount point ``tmp_path/mnt``); {relative name: sha256}."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mkfs.ext4", "-q", "-F", dev)
    sh("mount", dev, mnt)
    try:
        digests = write_files(mnt)
    finally:
        sh("umount", mnt)
    sh("e2fsck", "-fn", dev)
    return digests


def write_files(root: Path, count: int = 6) -> dict[str, str]:
    """Random files of assorted sizes under ``root``; {relative name: sha256}."""
    (root / "d").mkdir()
    return {f"d/f{i}": sha256_of_new(root / "d" / f"f{i}", i * 250_000 + 3) for i in range(count)}


def sha256_of_new(path: Path, size: int) -> str:
    path.write_bytes(os.urandom(size))
    return sha256_file(path)


def check_ext4_in_image(image: Path, kind: str, digests: dict[str, str], tmp_path: Path) -> None:
    """Read the image with qemu-img (not tapdisk): a clean ext4 holding our files."""
    raw = tmp_path / "converted.raw"
    sh("qemu-img", "convert", "-f", QEMU_FORMAT[kind][1], "-O", "raw", image, raw)
    sh("e2fsck", "-fn", raw)
    for name, digest in digests.items():
        out = tmp_path / "dumped"
        sh("debugfs", "-R", f"dump /{name} {out}", raw)
        assert sha256_file(out) == digest, name
    raw.unlink()


def dmesg_io_errors(dev: str, before: str) -> list[str]:
    name = os.path.basename(dev)
    return [line for line in sh("dmesg")[len(before) :].splitlines() if f"dev {name}" in line]


def fio_verify(dev: str, size_mb: int, *extra: str) -> subprocess.Popen[str]:
    """Random 4 KiB writes with crc32c verification, then a read-back of every block."""
    return subprocess.Popen(
        ["fio", "--name=verify", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
         "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size_mb}M",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(fio: subprocess.Popen[str], timeout: float = 300) -> str:
    output, _ = fio.communicate(timeout=timeout)
    assert fio.returncode == 0, output
    assert re.search(r"err= *0", output), output
    return output


@pytest.mark.parametrize("kind", ["raw", "vhd", "qcow2"])
def test_create_gives_a_device_that_holds_ext4(
    tapctl: TapCtl, tmp_path: Path, kind: str, report: Callable[[str, str], None]
) -> None:
    image = make_image(tmp_path, kind)
    start = time.monotonic()
    dev = tapctl.create(f"{kind}:{image}")
    report(
        f"tap-ctl create -a {kind}: (spawn + open + connect)", f"{time.monotonic() - start:.1f} s"
    )
    assert int(sh("blockdev", "--getsize64", dev)) == 64 * MiB
    digests = ext4_with_files(dev, tmp_path)
    mnt = tmp_path / "mnt"
    sh("mount", "-o", "ro", dev, mnt)
    try:
        for name, digest in digests.items():
            assert sha256_file(mnt / name) == digest, name
    finally:
        sh("umount", mnt)
    tapctl.destroy(dev)

    if kind == "qcow2":
        sh("qemu-img", "check", "-q", image)
    check_ext4_in_image(image, kind, digests, tmp_path)


@pytest.mark.parametrize("kind", ["vhd", "qcow2"])
def test_fio_verify_through_a_created_device(tapctl: TapCtl, tmp_path: Path, kind: str) -> None:
    image = make_image(tmp_path, kind)
    dev = tapctl.create(f"{kind}:{image}")
    before = sh("dmesg")
    finish(fio_verify(dev, 16))
    assert dmesg_io_errors(dev, before) == []


def test_create_with_two_connections_gives_a_two_queue_device(
    tapctl: TapCtl, tmp_path: Path
) -> None:
    image = make_image(tmp_path, "raw")
    dev = tapctl.create(f"raw:{image}", "-n", "2")
    assert len(os.listdir(f"/sys/block/{os.path.basename(dev)}/mq")) == 2
    pattern = tmp_path / "pattern"
    digest = sha256_of_new(pattern, 16 * MiB)
    sh("dd", f"if={pattern}", f"of={dev}", "bs=1M", "oflag=direct", "conv=fsync", "status=none")
    tapctl.destroy(dev)
    assert sha256_file(image, 16 * MiB) == digest


def test_create_on_a_chosen_device_uses_it(tapctl: TapCtl, tmp_path: Path) -> None:
    dev = tapctl.create(f"raw:{make_image(tmp_path, 'raw')}", "-d", "/dev/nbd7")
    assert dev == "/dev/nbd7"
    assert kernel.status(7) == {7: True}


def test_create_on_a_busy_device_fails_and_leaves_nothing_behind(
    tapctl: TapCtl, tmp_path: Path
) -> None:
    first = tapctl.create(f"raw:{make_image(tmp_path, 'raw', name='first')}")
    index = int(first.removeprefix("/dev/nbd"))
    (pid,) = tapctl.pids()
    second = make_image(tmp_path, "raw", name="second")
    proc = subprocess.run(
        [TAPCTL, "create", "--control-dir", tapctl.directory, "-a", f"raw:{second}", "-d", first],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout
    assert "busy" in proc.stderr, proc.stderr
    assert tapctl.pids() == [pid]  # the new tapdisk is gone
    assert kernel.status(index) == {index: True}  # the first device is untouched


def test_list_shows_the_created_device(tapctl: TapCtl, tmp_path: Path) -> None:
    image = make_image(tmp_path, "raw")
    dev = tapctl.create(f"raw:{image}")
    (row,) = tapctl.listing()["tapdisks"]
    assert row["device"] == dev
    assert row["spec"] == f"raw:{image}"
    line = tapctl("list").strip()
    assert line == f"pid={row['pid']} minor={row['minor']} state=0 args=raw:{image}"


def test_destroy_detaches_the_device_and_stops_tapdisk(tapctl: TapCtl, tmp_path: Path) -> None:
    dev = tapctl.create(f"raw:{make_image(tmp_path, 'raw')}")
    index = int(dev.removeprefix("/dev/nbd"))
    (pid,) = tapctl.pids()
    assert kernel.status(index) == {index: True}

    tapctl.destroy(dev)

    assert kernel.status(index) == {index: False}
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert tapctl.listing() == {"tapdisks": [], "idle": [], "unattached": [], "dead": []}


def test_pause_stalls_io_without_errors_and_unpause_resumes_it(
    tapctl: TapCtl, tmp_path: Path
) -> None:
    image = make_image(tmp_path, "qcow2")
    dev = tapctl.create(f"qcow2:{image}")
    before = sh("dmesg")
    fio = fio_verify(dev, 16, "--rate_iops=400")
    try:
        time.sleep(2)
        tapctl("pause", "-d", dev)
        (row,) = tapctl.listing()["tapdisks"]
        time.sleep(3)  # I/O queues in the kernel and in tapdisk meanwhile
        assert fio.poll() is None, "fio finished before the pause: the test proves nothing"
        tapctl("unpause", "-d", dev)
    finally:
        output = finish(fio)
    assert row["state"] & 0x20, row  # blktap's PAUSED while it was
    assert dmesg_io_errors(dev, before) == [], output
    tapctl.destroy(dev)
    sh("qemu-img", "check", "-q", image)


@pytest.mark.parametrize("kind", ["vhd", "qcow2"])
def test_snapshot_under_fio_load_moves_writes_to_the_overlay(
    tapctl: TapCtl, tmp_path: Path, kind: str
) -> None:
    base = make_image(tmp_path, kind, 32 * MiB, name="base")
    overlay = tmp_path / f"overlay.{kind}"
    dev = tapctl.create(f"{kind}:{base}")
    before = sh("dmesg")
    fio = fio_verify(dev, 16, "--rate_iops=400")
    try:
        time.sleep(2)
        assert fio.poll() is None, "fio finished before the snapshot: the test proves nothing"
        tapctl("snapshot", "-d", dev, "-a", f"{kind}:{overlay}")
    finally:
        output = finish(fio)
    assert dmesg_io_errors(dev, before) == [], output
    (row,) = tapctl.listing()["tapdisks"]
    assert row["spec"] == f"{kind}:{overlay}"
    device_digest = sha256_file(dev, 32 * MiB)
    tapctl.destroy(dev)

    if kind == "qcow2":
        # The chain, read by qemu-img, holds what the device showed.
        info = json.loads(sh("qemu-img", "info", "--output=json", overlay))
        assert os.path.realpath(info["full-backing-filename"]) == str(base)
        sh("qemu-img", "check", "-q", overlay)
        chain = tmp_path / "chain.raw"
        sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", overlay, chain)
        assert sha256_file(chain) == device_digest
    else:
        # qemu-img cannot read differencing VHDs: reopen the chain with a new tapdisk.
        again = tapctl.create(f"vhd:{overlay}")
        assert sha256_file(again, 32 * MiB) == device_digest


def test_a_minor_opened_in_sms_order_is_connected_at_open(tapctl: TapCtl, tmp_path: Path) -> None:
    """allocate, spawn, attach, open (SM's order): the open connects /dev/nbdN, the minor's
    marker names it, and close, detach, free undo it all."""
    image = make_image(tmp_path, "vhd")
    marker = Path(tapctl("allocate").strip())
    minor = int(marker.name.removeprefix("tapdisk-"))
    assert marker == tapctl.directory / "tapdisk" / f"tapdisk-{minor}"
    pid = int(tapctl("spawn"))
    tapctl("attach", "-p", str(pid), "-m", str(minor))
    tapctl("open", "-p", str(pid), "-m", str(minor), "-a", f"vhd:{image}", "-t", "30")
    (row,) = tapctl.listing()["tapdisks"]
    dev = row["device"]
    assert re.fullmatch(r"/dev/nbd\d+", dev), row
    index = int(dev.removeprefix("/dev/nbd"))
    assert kernel.status(index) == {index: True}
    assert marker.read_text() == f"{dev}\n"
    assert int(sh("blockdev", "--getsize64", dev)) == 64 * MiB

    pattern = tmp_path / "pattern"
    digest = sha256_of_new(pattern, 4 * MiB)
    sh("dd", f"if={pattern}", f"of={dev}", "bs=1M", "oflag=direct", "conv=fsync", "status=none")
    copy = tmp_path / "copy.raw"  # read back through the NBD socket SM links for qemu
    uri = f"nbd+unix:///?socket={tapctl.directory}/nbd{pid}.{minor}"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, copy)
    assert sha256_file(copy, 4 * MiB) == digest

    tapctl("close", "-p", str(pid), "-m", str(minor), "-t", "120")
    assert kernel.status(index) == {index: False}
    assert marker.read_text() == ""
    tapctl("detach", "-p", str(pid), "-m", str(minor))
    tapctl("free", "-m", str(minor))
    assert not marker.exists()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the tapdisk outlived its last minor"
    assert tapctl.listing() == {"tapdisks": [], "idle": [], "unattached": [], "dead": []}
