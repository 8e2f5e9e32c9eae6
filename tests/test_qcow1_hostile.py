"""Hostile QCOW v1 images: each bad field gives an ImageFormatError naming it, no stray write."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest
from image_helpers import qemu_img, qemu_io
from tapdisk.drivers.base import ImageError, ImageFormatError
from tapdisk.drivers.registry import OpenOptions, open_image

# Header offsets (big-endian), see the QCOW v1 layout.
BACKING_OFFSET, BACKING_SIZE, SIZE, CLUSTER_BITS, L2_BITS, CRYPT, L1_OFFSET = (
    8,
    16,
    24,
    32,
    33,
    36,
    40,
)


def put(path: Path, offset: int, fmt: str, value: int) -> None:
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    path.write_bytes(bytes(raw))


def get(path: Path, offset: int, fmt: str) -> int:
    value: int = struct.unpack_from(fmt, path.read_bytes(), offset)[0]
    return value


def image(tmp_path: Path, name: str = "h.qcow") -> Path:
    """A 4 KiB-cluster qcow image with data in guest clusters 0, 1 and 2 (one L2 table)."""
    path = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow", path, "8M")
    qemu_io("qcow", path, "write -P 9 0 12k")
    return path


def l2_offset(path: Path, l1_index: int = 0) -> int:
    return get(path, get(path, L1_OFFSET, ">Q") + 8 * l1_index, ">Q")


def refused(path: Path, match: str, *, read_only: bool = True) -> None:
    """Opening (and reading all of) the image fails with an error matching ``match``."""

    async def go() -> None:
        img = open_image(f"qcow:{path}", OpenOptions(read_only=read_only))
        try:
            await img.read(0, memoryview(bytearray(64 * 1024)))
        finally:
            await img.close()

    with pytest.raises(ImageFormatError, match=match):
        asyncio.run(go())


def test_bad_magic_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, 0, ">I", 0x51464900)
    refused(path, "magic")


def test_qcow2_image_opened_as_qcow_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    refused(path, "version")


def test_cluster_bits_out_of_range_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, CLUSTER_BITS, ">B", 8)
    refused(path, "cluster_bits")


def test_l2_bits_out_of_range_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, L2_BITS, ">B", 20)
    refused(path, "l2_bits")


def test_encrypted_image_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, CRYPT, ">I", 1)
    refused(path, "crypt_method.*encrypted")


@pytest.mark.parametrize("size", [0, 1, 1 << 60])
def test_size_out_of_range_is_refused(tmp_path: Path, size: int) -> None:
    path = image(tmp_path)
    put(path, SIZE, ">Q", size)
    refused(path, "size")


def test_size_needing_huge_l1_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, SIZE, ">Q", 1 << 55)
    refused(path, "size .*L1 table")


def test_l1_table_past_end_of_file_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, L1_OFFSET, ">Q", path.stat().st_size - 8)
    refused(path, "l1_table_offset.*past the end")


def test_unaligned_l1_table_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, L1_OFFSET, ">Q", get(path, L1_OFFSET, ">Q") + 3)
    refused(path, "l1_table_offset.*unaligned")


def test_backing_name_too_long_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, BACKING_OFFSET, ">Q", 48)
    put(path, BACKING_SIZE, ">I", 5000)
    refused(path, "backing_file_size")


def test_backing_name_past_end_of_file_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, BACKING_OFFSET, ">Q", path.stat().st_size - 2)
    put(path, BACKING_SIZE, ">I", 10)
    refused(path, "backing_file_offset")


def test_backing_name_overlapping_l1_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, BACKING_OFFSET, ">Q", get(path, L1_OFFSET, ">Q"))
    put(path, BACKING_SIZE, ">I", 8)
    refused(path, "backing_file_offset.*overlaps the L1")


def test_unaligned_l2_table_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    l1 = get(path, L1_OFFSET, ">Q")
    put(path, l1, ">Q", l2_offset(path) + 8)
    refused(path, "L1 entry 0.*not 512-byte aligned")


def test_l2_table_past_end_of_file_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, get(path, L1_OFFSET, ">Q"), ">Q", (path.stat().st_size + 4096) // 4096 * 4096)
    refused(path, "L1 entry 0.*past the end")


def test_l2_table_inside_l1_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.qcow"
    qemu_img("create", "-q", "-f", "qcow", path, "8G")  # 4096 L1 entries: L1 spans 32 KiB
    qemu_io("qcow", path, "write -P 1 0 4k")
    put(path, get(path, L1_OFFSET, ">Q"), ">Q", 4096)
    refused(path, "L1 entry 0.*overlaps the header or L1")


def test_two_l1_entries_sharing_an_l2_table_are_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, get(path, L1_OFFSET, ">Q") + 8, ">Q", l2_offset(path))
    refused(path, "L1 entries 0 and 1.*overlap")


def test_data_cluster_overlapping_its_l2_table_is_refused_and_not_written(tmp_path: Path) -> None:
    path = image(tmp_path)
    l2 = l2_offset(path)
    put(path, l2, ">Q", l2)  # guest cluster 0 claims to live in the L2 table itself
    before = path.read_bytes()

    async def write() -> None:
        img = open_image(f"qcow:{path}", OpenOptions())
        try:
            await img.write(0, memoryview(b"\xff" * 4096))
        finally:
            await img.close()

    with pytest.raises(ImageFormatError, match=r"entry 0.*overlaps the L2 table"):
        asyncio.run(write())
    assert path.read_bytes() == before


def test_data_cluster_in_l1_area_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.qcow"
    qemu_img("create", "-q", "-f", "qcow", path, "8G")
    qemu_io("qcow", path, "write -P 1 0 4k")
    put(path, l2_offset(path), ">Q", 4096)  # cluster 1 of the file is part of the 32 KiB L1
    refused(path, "entry 0: data offset 0x1000 is in the header/L1 area", read_only=False)


def test_unaligned_data_cluster_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    l2 = l2_offset(path)
    put(path, l2 + 8, ">Q", get(path, l2 + 8, ">Q") + 512)
    refused(path, "entry 1: data offset .* not cluster aligned")


def test_data_cluster_past_end_of_file_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    put(path, l2_offset(path) + 16, ">Q", (path.stat().st_size // 4096 + 10) * 4096)
    refused(path, "entry 2: data offset .*past the end of file")


def test_compressed_cluster_past_end_of_file_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    entry = (1 << 63) | (100 << (63 - 12)) | (path.stat().st_size - 10)
    put(path, l2_offset(path), ">Q", entry)
    refused(path, "compressed data at .* outside the data area")


def test_garbage_compressed_cluster_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    l2 = l2_offset(path)
    data = get(path, l2 + 8, ">Q")  # point "compressed" data at a cluster of 0x09 bytes
    put(path, l2, ">Q", (1 << 63) | (300 << (63 - 12)) | data)
    refused(path, "compressed cluster")


def test_backing_file_that_is_itself_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.qcow"
    base = tmp_path / "base.qcow"  # raw despite the name: same length as the image's name
    base.write_bytes(bytes(1 << 20))
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.qcow", "-F", "raw", path)
    raw = bytearray(path.read_bytes())
    off = get(path, BACKING_OFFSET, ">Q")
    raw[off : off + 9] = b"loop.qcow"
    path.write_bytes(bytes(raw))
    refused(path, "loops back")


def test_backing_chain_loop_of_two_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow", tmp_path / "b.qcow"
    (tmp_path / "x.qcow").write_bytes(bytes(1 << 20))
    (tmp_path / "y.qcow").write_bytes(bytes(1 << 20))
    qemu_img("create", "-q", "-f", "qcow", "-b", "x.qcow", "-F", "raw", a)
    qemu_img("create", "-q", "-f", "qcow", "-b", "y.qcow", "-F", "raw", b)
    for path, target in ((a, b"b.qcow"), (b, b"a.qcow")):
        raw = bytearray(path.read_bytes())
        off = get(path, BACKING_OFFSET, ">Q")
        raw[off : off + len(target)] = target
        path.write_bytes(bytes(raw))
    refused(a, "loops back")


def test_backing_file_outside_allowed_dirs_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    (outside / "base.raw").write_bytes(bytes(1 << 20))
    path = inside / "top.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", "../outside/base.raw", "-F", "raw", path)
    with pytest.raises(ImageError, match="outside the allowed directories"):
        open_image(f"qcow:{path}", OpenOptions(read_only=True))
    img = open_image(f"qcow:{path}", OpenOptions(read_only=True, allowed_dirs=(str(tmp_path),)))
    asyncio.run(img.close())
