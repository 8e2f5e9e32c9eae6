"""Hostile VHDs: every malformed field is refused with an ImageFormatError naming it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from tapdisk.drivers.base import ImageFormatError
from tapdisk.drivers.vhd.create import create_vhd, snapshot_vhd
from tapdisk.drivers.vhd.format import FOOTER_SIZE, Footer, Header
from tapdisk.drivers.vhd.image import VhdImage

MiB = 1 << 20


def make(tmp_path: Path, blocks_written: int = 2) -> Path:
    """A 16 MiB dynamic VHD with data in its first ``blocks_written`` blocks."""
    path = tmp_path / "h.vhd"
    create_vhd(str(path), 16 * MiB)

    async def fill() -> None:
        image = VhdImage(str(path))
        for b in range(blocks_written):
            await image.write(b * 2 * MiB, memoryview(b"\xab" * 4096))
        await image.close()

    asyncio.run(fill())
    return path


def refused(path: Path, *words: str, read_only: bool = True) -> str:
    with pytest.raises(ImageFormatError) as info:
        VhdImage(str(path), read_only=read_only)
    message = str(info.value)
    for word in words:
        assert word in message
    return message


def patch_header(path: Path, **changes: object) -> None:
    with open(path, "r+b") as f:
        f.seek(512)
        header = Header.unpack(f.read(1024), str(path))
        for key, value in changes.items():
            setattr(header, key, value)
        f.seek(512)
        f.write(header.pack())


def patch_footers(path: Path, **changes: object) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        footer = Footer.unpack(f.read(512), str(path))
        for key, value in changes.items():
            setattr(footer, key, value)
        for off in (0, size - FOOTER_SIZE):
            f.seek(off)
            f.write(footer.pack())


def set_bat(path: Path, index: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(1536 + 4 * index)
        f.write(value.to_bytes(4, "big"))


def test_file_smaller_than_a_footer_is_refused(tmp_path):
    path = tmp_path / "tiny.vhd"
    path.write_bytes(b"conectix" + bytes(100))
    refused(path, "truncated")


def test_truncated_file_is_refused(tmp_path):
    path = make(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(2 * MiB)  # cuts the second block and drops the trailing footer
    refused(path, "BAT[0]", "past the end")


def test_truncated_bat_is_refused(tmp_path):
    path = make(tmp_path, blocks_written=0)
    patch_header(path, max_table_entries=4096)
    refused(path, "header.table_offset", "past the end of the file")


def test_bat_entry_past_end_of_file_is_refused(tmp_path):
    path = make(tmp_path)
    set_bat(path, 5, (os.path.getsize(path) // 512) + 8)
    refused(path, "BAT[5]", "past the end of the file")


def test_bat_entry_overlapping_metadata_is_refused(tmp_path):
    path = make(tmp_path)
    set_bat(path, 0, 3)  # sector 3 = inside the BAT itself
    refused(path, "BAT[0]", "overlaps metadata")


def test_bat_entries_overlapping_each_other_are_refused(tmp_path):
    path = make(tmp_path)
    with open(path, "rb") as f:
        f.seek(1536)
        first = int.from_bytes(f.read(4), "big")
    set_bat(path, 1, first + 8)
    refused(path, "BAT[1]", "overlaps block BAT[0]")


def test_bad_footer_checksum_in_both_copies_is_refused(tmp_path):
    path = make(tmp_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for off in (0, size - FOOTER_SIZE):
            f.seek(off + 48)
            f.write(b"\x7f")
    refused(path, "footer.checksum")


def test_bad_footer_cookie_is_refused(tmp_path):
    path = tmp_path / "junk.vhd"
    path.write_bytes(bytes(4096))
    refused(path, "footer.cookie")


def test_bad_header_checksum_is_refused(tmp_path):
    path = make(tmp_path)
    with open(path, "r+b") as f:
        f.seek(512 + 28)
        f.write(b"\x00\x00\x00\x09")
    refused(path, "header.checksum")


def test_absurd_virtual_size_is_refused(tmp_path):
    path = make(tmp_path)
    patch_footers(path, current_size=1 << 60)
    refused(path, "footer.current_size")


def test_disabled_image_is_refused(tmp_path):
    path = make(tmp_path)
    patch_footers(path, cookie=b"v_poison")
    refused(path, "v_poison")


def test_unknown_disk_type_is_refused(tmp_path):
    path = make(tmp_path)
    patch_footers(path, disk_type=7)
    refused(path, "footer.disk_type")


def test_data_offset_past_end_of_file_is_refused(tmp_path):
    path = make(tmp_path)
    patch_footers(path, data_offset=1 << 40)
    refused(path, "footer.data_offset")


def test_block_size_not_a_power_of_two_is_refused(tmp_path):
    path = make(tmp_path)
    patch_header(path, block_size=3 * MiB)
    refused(path, "header.block_size")


def test_bat_smaller_than_virtual_size_is_refused(tmp_path):
    path = make(tmp_path)
    patch_header(path, max_table_entries=4)
    refused(path, "header.max_table_entries")


def test_absurd_bat_size_is_refused(tmp_path):
    path = make(tmp_path)
    patch_header(path, max_table_entries=0xFFFFFFFF)
    refused(path, "header.max_table_entries", "exceeds the limit")


def test_bat_overlapping_header_is_refused(tmp_path):
    path = make(tmp_path)
    patch_header(path, table_offset=1024)
    refused(path, "header.table_offset")


def test_parent_locator_outside_file_is_refused(tmp_path):
    base = make(tmp_path)
    child = tmp_path / "child.vhd"
    snapshot_vhd(str(child), str(base))
    with open(child, "r+b") as f:
        f.seek(512)
        header = Header.unpack(f.read(1024), str(child))
        header.locators[1].data_offset = 1 << 40
        f.seek(512)
        f.write(header.pack())
    refused(child, "header.locator[1].data_offset")


def test_parent_locator_overlapping_the_bat_is_refused(tmp_path):
    base = make(tmp_path)
    child = tmp_path / "child.vhd"
    snapshot_vhd(str(child), str(base))
    with open(child, "r+b") as f:
        f.seek(512)
        header = Header.unpack(f.read(1024), str(child))
        header.locators[2].data_offset = 1536
        f.seek(512)
        f.write(header.pack())
    refused(child, "overlaps the BAT")


def test_parent_name_escaping_allowed_directories_is_refused(tmp_path):
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    base = outside / "base.vhd"
    create_vhd(str(base), 16 * MiB)
    child = inside / "child.vhd"
    snapshot_vhd(str(child), str(base))  # locators hold ../outside/base.vhd
    refused(child, "escapes the allowed directories", "header.locator")


def test_corrupt_batmap_refuses_read_write_but_allows_read_only(tmp_path):
    path = make(tmp_path)
    with open(path, "r+b") as f:
        f.seek(1536 + 512 + 512)  # the batmap map
        f.write(b"\x55")
    refused(path, "batmap.checksum", read_only=False)
    image = VhdImage(str(path), read_only=True)
    asyncio.run(image.close())


@pytest.mark.parametrize(
    ("target", "words"),
    [
        (lambda size, bat0: 1, "overlaps metadata"),  # the header
        (lambda size, bat0: 3, "overlaps metadata"),  # the BAT
        (lambda size, bat0: bat0, "overlaps block"),  # block 0's bitmap
        (lambda size, bat0: bat0 - 1, "overlaps block"),  # its data over that bitmap
        (lambda size, bat0: size // 512 - 1, "past the end of the file"),  # the footer
    ],
)
def test_bat_entry_into_metadata_never_opens_for_writing(tmp_path, target, words):
    path = make(tmp_path)
    with open(path, "rb") as f:
        f.seek(1536)
        bat0 = int.from_bytes(f.read(4), "big")
    set_bat(path, 2, target(os.path.getsize(path), bat0))
    before = path.read_bytes()
    refused(path, "BAT[", words, read_only=False)
    assert path.read_bytes() == before
