"""Overlap checking: a damaged qcow2 never turns guest writes into metadata overwrites.

A write through a bad L2 entry, or onto a cluster that holds metadata, fails with EIO, is
logged once, and marks the image corrupt (the header's incompatible bit, as qemu does), so
that it opens read-only until repaired; neither ``qemu-img check`` nor our own check finds
anything the writes did.
"""

from __future__ import annotations

import asyncio
import errno
import sys
from pathlib import Path

import nbd
import pytest
from helpers import run
from image_helpers import qemu_img, qemu_io, read_all
from qcow2_mutate import (
    INCOMPAT_AT,
    REFCOUNT_ORDER_AT,
    assert_no_new_errors,
    check_errors,
    field,
    is_marked_corrupt,
    l2_table,
    poke,
    set_l2_entry,
)
from tapdisk.drivers.base import ImageFormatError
from tapdisk.drivers.registry import OpenOptions, open_image

KiB, MiB = 1 << 10, 1 << 20
#: Header, refcount table, refcount block, L1 table: qemu-img's layout with 4 KiB clusters.
REFCOUNT_TABLE = 0x1000


def small_clusters(tmp_path: Path, name: str = "d.qcow2", data: bool = True) -> Path:
    """8 MiB, 4 KiB clusters, the first 128 KiB written by qemu."""
    path = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "8M")
    if data:
        qemu_io("qcow2", path, "write -P 7 0 128k")
    return path


def nbd_write_errno(uri: str, offset: int, length: int) -> str | None:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        h.pwrite(b"\xab" * length, offset)
    except nbd.Error as exc:
        return exc.errno
    finally:
        h.shutdown()
    return None


def write_through_driver(path: Path, *writes: tuple[int, int]) -> list[int | None]:
    """Each write's errno (None: it went through), then close the image."""
    results: list[int | None] = []

    async def go() -> None:
        image = open_image(f"qcow2:{path}", OpenOptions())
        try:
            for offset, length in writes:
                try:
                    await image.write(offset, memoryview(b"\xcd" * length))
                    results.append(None)
                except OSError as exc:
                    results.append(exc.errno)
        finally:
            await image.close()

    asyncio.run(go())
    return results


def read_only(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset``, read through a read-only open."""
    buf = bytearray(length)

    async def go() -> None:
        image = open_image(f"qcow2:{path}", OpenOptions(read_only=True))
        try:
            await image.read(offset, memoryview(buf))
        finally:
            await image.close()

    asyncio.run(go())
    return bytes(buf)


def read_write_open_fails(path: Path) -> str:
    with pytest.raises(ImageFormatError) as info:
        image = open_image(f"qcow2:{path}", OpenOptions())
        asyncio.run(image.close())
    return str(info.value)


def test_l2_entry_inside_the_refcount_table_fails_writes_and_marks_the_image_corrupt(
    tmp_path, serve
):
    path = small_clusters(tmp_path)
    set_l2_entry(path, 0, 0x1D00)  # inside the refcount table, unaligned, no COPIED flag
    before = check_errors(path)
    served = serve(f"qcow2:{path}")
    assert nbd_write_errno(served.uri(), 0, 64 * KiB) == "EIO"
    assert nbd_write_errno(served.uri(), 5 * MiB, 4 * KiB) == "EIO"
    served.stop()
    assert served.stderr.count("marking the image corrupt") == 1  # logged once
    assert_no_new_errors(path, before)
    assert "corrupt: true" in qemu_img("info", "-f", "qcow2", path)
    assert "corrupt bit" in read_write_open_fails(path)
    assert read_only(path, 64 * KiB, 64 * KiB) == b"\x07" * (64 * KiB)


def test_reads_refuse_the_entry_writes_refuse(tmp_path, serve):
    path = small_clusters(tmp_path)
    set_l2_entry(path, 0, 0x1D00)
    served = serve(f"qcow2:{path}")
    h = nbd.NBD()
    h.connect_uri(served.uri())
    with pytest.raises(nbd.Error) as info:
        h.pread(4096, 0)
    assert info.value.errno == "EIO"
    assert h.pread(4096, 4096) == b"\x07" * 4096  # other clusters still read
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 4096, 64 * KiB)  # the image is marked corrupt: no more writes
    h.shutdown()
    assert is_marked_corrupt(path)


def test_aligned_entry_onto_the_refcount_table_is_not_written_nor_freed(tmp_path):
    path = small_clusters(tmp_path)
    set_l2_entry(path, 0, REFCOUNT_TABLE)  # plausible, but not COPIED: a write would free it
    before = check_errors(path)
    assert write_through_driver(path, (0, 4 * KiB), (5 * MiB, 4 * KiB)) == [errno.EIO, errno.EIO]
    assert_no_new_errors(path, before)
    assert is_marked_corrupt(path)


def test_discard_of_an_entry_onto_metadata_frees_nothing(tmp_path):
    path = small_clusters(tmp_path)
    set_l2_entry(path, 1, REFCOUNT_TABLE | (1 << 63))
    before = check_errors(path)

    async def go() -> None:
        image = open_image(f"qcow2:{path}", OpenOptions())
        try:
            with pytest.raises(OSError) as info:
                await image.discard(0, 64 * KiB)
            assert info.value.errno == errno.EIO
        finally:
            await image.close()

    asyncio.run(go())
    assert_no_new_errors(path, before)


def test_entry_onto_a_snapshot_l1_table_is_not_written(tmp_path):
    path = small_clusters(tmp_path)
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io("qcow2", path, "write -P 9 0 4k")  # the active table gets its own copy
    # The snapshot's L1 table lies after the active one; find it through the snapshot table.
    snapshots_offset = field(path, 64)
    snapshot_l1 = field(path, snapshots_offset)
    assert snapshot_l1 % 4096 == 0 and snapshot_l1 != field(path, 40)
    set_l2_entry(path, 2, snapshot_l1 | (1 << 63))
    before = check_errors(path)
    assert write_through_driver(path, (2 * 4 * KiB, 512)) == [errno.EIO]
    assert_no_new_errors(path, before)


@pytest.mark.parametrize("order", [0, 3, 5, 6])
def test_mutated_refcount_order_refuses_a_read_write_open(tmp_path, order):
    path = small_clusters(tmp_path)
    poke(path, REFCOUNT_ORDER_AT, order, ">I")
    before = check_errors(path)
    assert "refcount" in read_write_open_fails(path)
    assert is_marked_corrupt(path)
    assert_no_new_errors(path, before)
    assert read_only(path, 0, 4096) == b"\x07" * 4096


def test_healthy_image_with_snapshots_takes_writes_cleanly(tmp_path):
    path = small_clusters(tmp_path)
    qemu_img("snapshot", "-c", "s1", path)
    writes = [(0, 64 * KiB), (100 * KiB, 8 * KiB), (5 * MiB, 4 * KiB), (7 * MiB, 1 * MiB)]
    assert write_through_driver(path, *writes) == [None] * len(writes)
    assert check_errors(path) == (set(), set())
    assert not is_marked_corrupt(path)
    qemu_img("snapshot", "-a", "s1", path)
    assert read_all(f"qcow2:{path}")[: 128 * KiB] == b"\x07" * (128 * KiB)


def test_version_2_image_fails_writes_without_a_corrupt_bit(tmp_path):
    path = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", path, "8M")
    qemu_io("qcow2", path, "write -P 7 0 128k")
    poke(path, l2_table(path), 0x1D00)
    before = check_errors(path)
    assert write_through_driver(path, (0, 64 * KiB), (5 * MiB, 4 * KiB)) == [errno.EIO, errno.EIO]
    assert_no_new_errors(path, before)


def test_reads_refuse_an_entry_whose_data_would_be_metadata(tmp_path):
    path = small_clusters(tmp_path)
    set_l2_entry(path, 0, REFCOUNT_TABLE | (1 << 63))  # well-formed, but onto the refcount table
    with pytest.raises(ImageFormatError, match="points at the refcount table"):
        read_only(path, 0, 4096)
    assert read_only(path, 4096, 4096) == b"\x07" * 4096


def tap_img_repair(path: Path) -> str:
    return run(str(Path(sys.executable).with_name("tap-img")), "check", "-r", "all", path)


def test_tap_img_repairs_refcounts_a_read_write_open_refuses(tmp_path):
    path = small_clusters(tmp_path)
    poke(path, REFCOUNT_ORDER_AT, 3, ">I")  # 8-bit refcounts read from 16-bit blocks
    read_write_open_fails(path)
    assert is_marked_corrupt(path)
    assert "repaired" in tap_img_repair(path)
    assert not is_marked_corrupt(path)
    assert check_errors(path) == (set(), set())
    image = open_image(f"qcow2:{path}", OpenOptions())  # read-write again
    asyncio.run(image.close())
    assert read_only(path, 0, 128 * KiB) == b"\x07" * (128 * KiB)


def test_tap_img_clears_the_corrupt_bit_of_a_sound_image(tmp_path):
    path = small_clusters(tmp_path)
    poke(path, INCOMPAT_AT, field(path, INCOMPAT_AT) | 2)
    assert "corrupt bit" in read_write_open_fails(path)
    tap_img_repair(path)
    assert not is_marked_corrupt(path)
    assert check_errors(path) == (set(), set())
    assert read_only(path, 0, 128 * KiB) == b"\x07" * (128 * KiB)
