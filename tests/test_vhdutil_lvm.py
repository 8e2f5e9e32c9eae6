"""``vhd-util scan -l VG`` over a real LVM volume group, as SM's LVM SRs call it.

SM's ``getAllVHDs`` runs ``vhd-util scan -f -m 'VHD-*' -l VG_XenStorage-<sr>`` (``-a`` for
the parents, ``-c`` after a failure) and ``getVHDInfoLVM`` ``-m VHD-<uuid>``: most of the
volumes are inactive, so the scan reads each VHD from the physical volume where the volume's
first segment lies.  Here the volume group lies on a loop device; the volumes are made with
activation off (``--driverloaded n``: this kernel may have no device-mapper), and each VHD,
made by ``vhd-util`` as a file, is copied onto the physical volume where ``pvs`` says its
volume lies.  A parent is named the way LVHD names it: by its device-mapper path.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import require
from vhdutil_helpers import MiB, ok, vhd_util

ENV = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")


def lvm(*argv: str) -> str:
    done = subprocess.run(
        [require(argv[0]), *argv[1:]], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class Group:
    """A volume group on a loop device."""

    def __init__(self, name: str, device: str, files: Path) -> None:
        self.name, self.device, self.files = name, device, files

    def mapper_name(self, volume: str) -> str:
        """The device-mapper name of a volume: ``VG-LV`` with each dash in them doubled."""
        return f"{self.name.replace('-', '--')}-{volume.replace('-', '--')}"

    def volume(self, name: str, size_mb: int, vhd: Path | None = None) -> None:
        """A volume of ``size_mb`` MiB holding the file ``vhd`` (if given) at its start."""
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-L", f"{size_mb}M", "-n", name,
            self.name)  # fmt: skip
        if vhd is None:
            return
        pe_start = int(lvm("pvs", "--noheadings", "--nosuffix", "--units=b", "-o", "pe_start",
                           self.device))  # fmt: skip
        extent = int(lvm("vgs", "--noheadings", "--nosuffix", "--units=b", "-o",
                         "vg_extent_size", self.name))  # fmt: skip
        segments = lvm("pvs", "--noheadings", "--segments", "-o", "lv_name,pvseg_start",
                       self.device)  # fmt: skip
        rows = [line.split() for line in segments.splitlines()]
        [first] = [int(row[1]) for row in rows if row[0] == name]  # free space: no name
        fd = os.open(self.device, os.O_WRONLY)
        try:
            os.pwrite(fd, vhd.read_bytes(), pe_start + first * extent)
            os.fsync(fd)
        finally:
            os.close(fd)

    def vhd(self, volume: str, size_mb: int, parent: str | None = None) -> Path:
        """A VHD file named as the volume's device-mapper node (so a child's header and
        locators name its parent as LVHD's do), over the parent volume's file if given."""
        path = self.files / self.mapper_name(volume)
        if parent is None:
            ok("create", "-n", path, "-s", size_mb)
        else:
            ok("snapshot", "-n", path, "-p", self.files / self.mapper_name(parent))
        return path


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    backing = tmp_path / "pv.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    device = lvm("losetup", "-f", "--show", str(backing)).strip()
    name = f"VG_XenStorage-test{os.getpid()}"
    files = tmp_path / "mapper"
    files.mkdir()
    try:
        lvm("pvcreate", "-q", device)
        lvm("vgcreate", "-q", name, device)
        yield Group(name, device, files)
    finally:
        subprocess.run(["vgremove", "-f", name], env=ENV, capture_output=True)
        subprocess.run(["pvremove", "-f", device], env=ENV, capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)


def chain(group: Group) -> None:
    """A raw volume LV-raw, then VHD-p1 (hidden, as SM leaves a parent) and VHD-c1 over it.
    The scan goes in the group's order (``lvs --unbuffered``, as blktap's): as they were made."""
    group.volume("LV-raw", 4)
    parent = group.vhd("VHD-p1", 16)
    ok("set", "-n", parent, "-f", "hidden", "-v", "1")
    group.volume("VHD-p1", 8, parent)
    group.volume("VHD-c1", 12, group.vhd("VHD-c1", 16, parent="VHD-p1"))


def scan(*argv: str) -> subprocess.CompletedProcess[str]:
    return vhd_util("scan", *argv)


def test_scan_lists_the_vhds_of_the_matching_volumes_as_blktap_does(group):
    chain(group)
    proc = scan("-f", "-m", "VHD-*", "-l", group.name)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (
        "vhd=VHD-p1 capacity=16777216 size=8388608 hidden=1 parent=none\n"
        "vhd=VHD-c1 capacity=16777216 size=12582912 hidden=0 parent=VHD-p1\n"
    )


def test_scan_of_one_volume_adds_its_parents_with_a(group):
    chain(group)
    assert scan("-f", "-m", "VHD-c1", "-l", group.name).stdout == (
        "vhd=VHD-c1 capacity=16777216 size=12582912 hidden=0 parent=VHD-p1\n"
    )
    assert scan("-f", "-m", "VHD-c1", "-l", group.name, "-a").stdout == (
        "vhd=VHD-c1 capacity=16777216 size=12582912 hidden=0 parent=VHD-p1\n"
        "vhd=VHD-p1 capacity=16777216 size=8388608 hidden=1 parent=none\n"
    )


def test_without_f_the_parent_comes_from_its_locator(group):
    chain(group)
    assert scan("-m", "VHD-c1", "-l", group.name).stdout == (
        "vhd=VHD-c1 capacity=16777216 size=12582912 hidden=0 parent=VHD-p1\n"
    )


def test_a_parent_volume_that_is_gone_is_reported_and_the_scan_succeeds(group):
    group.vhd("VHD-p1", 16)
    group.volume("VHD-c1", 12, group.vhd("VHD-c1", 16, parent="VHD-p1"))
    proc = scan("-f", "-m", "VHD-*", "-l", group.name, "-a")
    assert proc.returncode == 0
    assert proc.stdout == (
        "vhd=VHD-c1 capacity=16777216 size=12582912 hidden=0 parent=VHD-p1\n"
        "vhd=VHD-p1 scan-error=-2 error-message='failure scanning target'\n"
    )


def test_a_volume_without_a_vhd_stops_the_scan_unless_c(group):
    chain(group)
    proc = scan("-f", "-m", "*", "-l", group.name)
    assert proc.returncode == errno.EINVAL
    assert proc.stdout == "vhd=LV-raw scan-error=-22 error-message='invalid footer'\n"
    proc = scan("-f", "-m", "*", "-l", group.name, "-c")
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "vhd=LV-raw scan-error=-22 error-message='invalid footer'",
        "vhd=VHD-p1 capacity=16777216 size=8388608 hidden=1 parent=none",
        "vhd=VHD-c1 capacity=16777216 size=12582912 hidden=0 parent=VHD-p1",
    ]


def test_pretty_print_shows_the_volumes_as_a_tree(group):
    chain(group)
    assert scan("-m", "VHD-*", "-l", group.name, "-p").stdout == (
        "vhd=VHD-p1 capacity=16777216 size=8388608 hidden=1 parent=none\n"
        "   vhd=VHD-c1 capacity=16777216 size=12582912 hidden=0 parent=VHD-p1\n"
    )


def test_a_volume_group_that_does_not_exist_is_a_one_line_error(group):
    proc = scan("-f", "-m", "VHD-*", "-l", "VG_XenStorage-none")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "VG_XenStorage-none" in proc.stderr
