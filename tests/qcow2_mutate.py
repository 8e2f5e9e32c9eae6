"""Damaging qcow2 images on purpose, and telling whether a later write made the damage worse.

``check_errors`` is what "no new error beyond the mutation" compares: the error lines of
``qemu-img check`` and the corruptions of the project's own check, taken once after the
image is damaged and once after writes went through it.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
from pathlib import Path

from helpers import require
from tapdisk.drivers.base import ImageError
from tapdisk.drivers.qcow2 import check
from tapdisk.drivers.qcow2.image import Qcow2Image
from tapdisk.drivers.registry import OpenOptions

L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
#: incompatible_features, u64 big-endian; bit 1 is "corrupt".
INCOMPAT_AT = 72
REFCOUNT_ORDER_AT = 96


def field(path: Path, offset: int, fmt: str = ">Q") -> int:
    with path.open("rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def poke(path: Path, offset: int, value: int, fmt: str = ">Q") -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def l2_table(path: Path, l1_index: int = 0) -> int:
    """Host offset of the L2 table that L1 entry ``l1_index`` names."""
    return field(path, field(path, 40) + 8 * l1_index) & L2_OFFSET_MASK


def set_l2_entry(path: Path, index: int, value: int) -> None:
    """Overwrite entry ``index`` of the first L2 table."""
    poke(path, l2_table(path) + 8 * index, value)


def is_marked_corrupt(path: Path) -> bool:
    return bool(field(path, INCOMPAT_AT) & 2)


def qemu_errors(path: Path) -> set[str]:
    """The ERROR lines of ``qemu-img check`` (leaks, which harm no data, left out)."""
    proc = subprocess.run(
        [require("qemu-img"), "check", "-f", "qcow2", str(path)], capture_output=True, text=True
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = {line for line in lines if line.startswith("ERROR")}
    if proc.returncode == 1:  # the check itself could not finish
        errors.add("qemu-img check failed: " + " / ".join(lines[-2:]))
    return errors


def own_errors(path: Path) -> set[str] | None:
    """The corruptions our own check reports; None when it cannot even open the image."""
    try:
        image = Qcow2Image(str(path), OpenOptions(read_only=True))
    except ImageError:
        return None
    try:
        return set(check.check(image).corruptions)
    except ImageError:
        return None
    finally:
        asyncio.run(image.close())


def check_errors(path: Path) -> tuple[set[str], set[str] | None]:
    return qemu_errors(path), own_errors(path)


def assert_no_new_errors(path: Path, before: tuple[set[str], set[str] | None]) -> None:
    """Nothing the writes did shows up in either check."""
    qemu_after, own_after = check_errors(path)
    assert qemu_after <= before[0], sorted(qemu_after - before[0])
    if before[1] is not None:
        assert own_after is not None and own_after <= before[1], own_after
