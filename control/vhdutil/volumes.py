"""``vhd-util scan -l VG``: the VHDs in the logical volumes of an LVM volume group.

XCP-ng's storage manager keeps each VHD of an LVM SR in a logical volume ``VHD-<uuid>``
and scans them with ``vhd-util scan -f -m 'VHD-*' -l VG_XenStorage-<sr>`` (``-a`` to add
the parents, ``-c`` to go on after a failure).  Most of those volumes are not active, so,
as blktap's scan does, this one activates nothing: ``vgs`` and ``lvs`` (blktap's options)
give each volume's first segment on its physical volume, and the VHD's footer copy, header
and parent locator are read from the physical volume there, with O_DIRECT, so that what
another host of a shared SR wrote is read and not a stale page cache.

A volume's line is blktap's: ``vhd=LV capacity=VIRTUAL size=LV-SIZE hidden=N parent=LV``,
where the parent is the volume its VHD names (LVHD stores a parent as a device-mapper path,
``/dev/mapper/VG--XenStorage--sr-VHD--uuid``: the name after the last single dash, with
double dashes made single).  Volumes come in the group's order (``lvs --unbuffered``, as
blktap's: the order they were made), each parent ``-a`` adds after them; without ``-c`` the
scan stops at the first failure.
"""

from __future__ import annotations

import errno
import fnmatch
import mmap
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from tapdisk.drivers.base import ImageError, ImageFormatError
from tapdisk.drivers.vhd.chain import decode_locator
from tapdisk.drivers.vhd.format import (
    FOOTER_SIZE,
    HEADER_SIZE,
    PLAT_MACX,
    PLAT_NONE,
    PLAT_W2RU,
    TYPE_DIFF,
    TYPE_FIXED,
    Footer,
    Header,
)

from .scanline import ScanImage

#: blktap refuses volumes smaller than this ("device too small").
MIN_VOLUME = 4096
#: Reads from the physical volume are O_DIRECT: whole, aligned blocks of this size.
ALIGN = 4096


@dataclass(frozen=True)
class Volume:
    """A logical volume: its name, size, and where its first segment lies."""

    name: str
    size: int
    device: str
    start: int
    #: Bytes of the first segment.
    length: int
    linear: bool


def _lvm(*argv: str) -> list[list[str]]:
    """The fields of each line an LVM reporting command prints."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageError(f"{argv[0]}: not found: LVM (lvm2) is not installed") from exc
    if done.returncode:
        problem = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise ImageError(f"{argv[0]} {argv[1]}: {problem[0].strip()}")
    return [line.split() for line in done.stdout.splitlines() if line.strip()]


def volumes(group: str) -> list[Volume]:
    """The logical volumes of volume group ``group``, in the group's order (blktap's query)."""
    units = ("--noheadings", "--nosuffix", "--units=b", "--unbuffered")
    pv_start: dict[str, int] = {}
    extent = 0
    for fields in _lvm(
        "vgs",
        group,
        *units,
        "--options=vg_name,vg_extent_size,lv_count,pv_count,pv_name,pe_start",
    ):
        if len(fields) != 6 or fields[0] != group:
            raise ImageError(f"vgs {group}: unexpected line {' '.join(fields)!r}")
        extent = int(fields[1])
        pv_start[fields[4]] = int(fields[5])
    found = []
    for fields in _lvm(
        "lvs",
        group,
        *units,
        "--options=lv_name,lv_size,segtype,seg_count,seg_start,seg_size,devices",
    ):
        if len(fields) != 7:
            raise ImageError(f"lvs {group}: unexpected line {' '.join(fields)!r}")
        name, size, segtype, _, seg_start, seg_size, devices = fields
        if int(seg_start):
            continue  # a later segment: blktap reads the first only
        device, _, first = devices.partition(",")[0].rstrip(")").partition("(")
        if device not in pv_start or not first.isdigit():
            raise ImageError(f"lvs {group}: {name} lies on {devices}, not a physical volume")
        start = pv_start[device] + int(first) * extent
        found.append(Volume(name, int(size), device, start, int(seg_size), segtype == "linear"))
    return found


def volume_name(parent: str) -> str:
    """The volume a parent name designates: ``/dev/mapper/VG--X-VHD--u`` -> ``VHD-u``."""
    if not parent:
        raise ImageFormatError("parent name is empty")
    name = parent.rsplit("/", 1)[-1]
    decoded = name.replace("--", "\0").replace("-", "/").replace("\0", "-")
    if "/" not in decoded:
        raise ImageFormatError(f"parent name {parent!r} names no volume")
    return decoded.rsplit("/", 1)[-1]


class _Device:
    """The physical volume a volume lies on, read with O_DIRECT where it allows."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, through aligned whole blocks."""
        first = offset - offset % ALIGN
        span = -(-(offset + length - first) // ALIGN) * ALIGN
        with mmap.mmap(-1, span) as buf:
            got = os.preadv(self.fd, [buf], first)
            return bytes(buf[offset - first : min(got, offset - first + length)])

    def close(self) -> None:
        os.close(self.fd)


def scan_volume(volume: Volume, fast: bool) -> ScanImage:
    """One volume's scan line, or its error as blktap words it."""
    image = ScanImage(volume.name)
    step = "failure scanning target"  # blktap's words for a volume it cannot place
    try:
        if not volume.linear:
            raise OSError(errno.ENOSYS, "not a linear volume")
        step = "device too small"
        if volume.length < MIN_VOLUME:
            raise OSError(errno.EINVAL, "device too small")
        step = "opening device"
        device = _Device(volume.device)
        try:
            step = "reading headers"
            raw = device.read(volume.start, FOOTER_SIZE + HEADER_SIZE)
            step = "invalid footer"
            footer = Footer.unpack(raw, volume.name)
            footer.validate(volume.name)
            image.capacity, image.size, image.hidden = (
                footer.current_size,
                volume.size,
                footer.hidden,
            )
            if footer.disk_type == TYPE_FIXED:
                return image
            step = "reading header"
            at = footer.data_offset
            if at == FOOTER_SIZE:
                header = Header.unpack(raw[FOOTER_SIZE:], volume.name)
            else:
                header = Header.unpack(device.read(volume.start + at, HEADER_SIZE), volume.name)
            if footer.disk_type == TYPE_DIFF:
                step = "getting parent"
                image.parent = volume_name(_parent_name(device, volume, header, fast))
        finally:
            device.close()
    except (OSError, ImageError) as exc:
        image.error = (-(getattr(exc, "errno", None) or errno.EINVAL), step)
    return image


def _parent_name(device: _Device, volume: Volume, header: Header, fast: bool) -> str:
    """The parent as the header names it (``-f``), else as its locator does (blktap's pick:
    MacX, else the last W2ru, else the first locator set)."""
    if fast and header.parent_name:
        return header.parent_name
    chosen = None
    for locator in header.locators:
        if locator.code == PLAT_MACX:
            chosen = locator
            break
        if locator.code == PLAT_W2RU:
            chosen = locator
        if chosen is None and locator.code != PLAT_NONE:
            chosen = locator
    if chosen is None:
        raise ImageFormatError(f"{volume.name}: no parent locator")
    data = device.read(volume.start + chosen.data_offset, chosen.data_length)
    path = decode_locator(chosen.code, data)
    if path is None:
        raise ImageFormatError(f"{volume.name}: unreadable parent locator")
    return path


def scan(
    group: str, patterns: list[str], fast: bool, parents: bool
) -> Iterator[tuple[ScanImage, bool]]:
    """Scan the volumes of ``group`` whose names match ``patterns`` (blktap's -m, then the
    names given), each once; with ``parents`` then the volumes their VHDs name.  Yields each
    line with whether it is a failure of the scan (a parent not found is only reported)."""
    available = volumes(group)
    chosen: list[Volume] = []
    for pattern in patterns:
        chosen += [v for v in available if v not in chosen and fnmatch.fnmatchcase(v.name, pattern)]
    done = 0
    while done < len(chosen):
        image = scan_volume(chosen[done], fast)
        done += 1
        yield image, image.error is not None
        if not parents or not image.parent or image.parent in (v.name for v in chosen):
            continue
        parent = next((v for v in available if v.name == image.parent), None)
        if parent is not None:
            chosen.append(parent)
            continue
        missing = ScanImage(image.parent)
        missing.error = (-errno.ENOENT, "failure scanning target")
        yield missing, False
