"""``vhd-util read``: each flag's output, byte for byte as blktap 4.0.8's vhd-util prints it
for the same image (its ``vhd-util-read.c``; compared by hand on these images).  One
difference: where text lines and raw bytes mix (``-m``, ``-d`` over unallocated
blocks), blktap's stdio buffering puts its text after the raw bytes when stdout is a
pipe; this prints them in order.

The image: 20 MiB, 2 MiB blocks, made by ``vhd-util create``, so its layout is known:
BAT at 1536, batmap header at 2048 and map at 2560; block 0 (sectors 0-7 written)
at 3584 with its data at 4096; block 2 (sector 3 written) at 2104832; block 3 (full)
at 4206080.
"""

from __future__ import annotations

import errno

import pytest
from vhdutil_helpers import MiB, ok, our_vhd, qemu_vhd, vhd_util, vhd_util_bytes

BLOCK = 2 * MiB


@pytest.fixture
def image(tmp_path):
    return our_vhd(
        tmp_path / "img.vhd",
        20,
        [(0, b"\x01" * 4096), (2 * BLOCK + 1536, b"\x02" * 512), (3 * BLOCK, b"\x03" * BLOCK)],
    )


def test_t_translates_sectors_to_file_offsets(image):
    assert ok("read", "-n", image, "-t", "4", "-c", "2") == (
        "logical sector 4: block number: 0, sector offset: 4, file offset: 6144\n"
        "logical sector 5: block number: 0, sector offset: 5, file offset: 6656\n"
    )
    assert ok("read", "-n", image, "-t", "8195", "-x") == (
        "logical sector 0x2003: block number: 0x2, sector offset: 0x3, file offset: 0x202600\n"
    )
    assert ok("read", "-n", image, "-t", "4096") == (
        "logical sector 4096: block number: 1, sector offset: 0, file offset: not allocated\n"
    )


def test_b_prints_bat_entries(image):
    assert ok("read", "-n", image, "-b", "0", "-c", "4") == (
        "block: 0: offset: 3584\n"
        "block: 1: offset: not allocated\n"
        "block: 2: offset: 2104832\n"
        "block: 3: offset: 4206080\n"
    )
    assert ok("read", "-n", image, "-b", "1", "-c", "2", "-x") == (
        "block: 0x1: offset: not allocated\nblock: 0x2: offset: 0x201e00\n"
    )


def test_block_past_the_bat_is_erange(image):
    assert ok("read", "-n", image, "-b", "0", "-c", "10").count("\n") == 10
    proc = vhd_util("read", "-n", image, "-b", "0", "-c", "11")
    assert proc.returncode == errno.ERANGE
    assert proc.stdout == ""
    assert "block 11 past end of file" in proc.stderr


def test_sector_past_the_end_is_erange(image):
    proc = vhd_util("read", "-n", image, "-t", "40960")
    assert (proc.returncode, proc.stdout) == (errno.ERANGE, "")
    assert "sector 40961 past end of file" in proc.stderr
    proc = vhd_util("read", "-n", image, "-i", "40960")
    assert (proc.returncode, proc.stdout) == (errno.ERANGE, "sector 40960 past end of file\n")


def test_i_tests_bitmap_bits(image):
    assert ok("read", "-n", image, "-i", "6", "-c", "3") == (
        "block 0: sec: 6: 1\nblock 0: sec: 7: 1\nblock 0: sec: 8: 0\n"
    )
    assert ok("read", "-n", image, "-i", "4096") == "block 1: sec: 0: 0\n"


def test_e_lists_extents_of_written_sectors(image):
    assert ok("read", "-n", image, "-e", "0", "-c", "8200") == "0 8\n8195 1\n"
    assert ok("read", "-n", image, "-e", "0", "-c", "16384", "-x") == (
        "0 0x8\n0x2003 0x1\n0x3000 0x1000\n"
    )


def test_m_prints_raw_bitmaps(image):
    proc = vhd_util_bytes("read", "-n", image, "-m", "1", "-c", "2")
    assert proc.returncode == 0
    assert proc.stdout == b"block 1 not allocated\n" + b"\x10" + bytes(511)
    assert vhd_util_bytes("read", "-n", image, "-m", "0").stdout == b"\xff" + bytes(511)


def test_a_and_j_show_the_batmap(image):
    proc = vhd_util_bytes("read", "-n", image, "-a")
    assert proc.stdout == b"\x10" + bytes(511)
    proc = vhd_util("read", "-n", image, "-j", "2", "-c", "2")
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr == "batmap for block 2: 0\nbatmap for block 3: 1\n"


def test_d_prints_stored_blocks(image):
    proc = vhd_util_bytes("read", "-n", image, "-d", "0", "-c", "2")
    assert proc.stdout == b"\x01" * 4096 + bytes(BLOCK - 4096) + b"block 1 not allocated\n"


def test_r_and_R_read_through_the_chain(image, tmp_path):
    child = tmp_path / "child.vhd"
    ok("snapshot", "-n", child, "-p", image)
    proc = vhd_util_bytes("read", "-n", child, "-r", "7", "-c", "2")
    assert proc.stdout == b"\x01" * 512 + bytes(512)
    assert vhd_util_bytes("read", "-n", child, "-R", "4095", "-c", "2").stdout == b"\x01\x00"
    proc = vhd_util_bytes("read", "-n", child, "-R", str(20 * MiB - 1), "-c", "2")
    assert proc.returncode == errno.ERANGE and proc.stdout == b""


def test_flags_combine_in_blktaps_order(image):
    text = ok("read", "-n", image, "-i", "0", "-t", "0", "-b", "0", "-c", "1")
    assert text == (
        "logical sector 0: block number: 0, sector offset: 0, file offset: 4096\n"
        "block: 0: offset: 3584\n"
        "block 0: sec: 0: 1\n"
    )


def test_flags_that_need_a_bat_are_refused_on_a_fixed_vhd(tmp_path):
    fixed = tmp_path / "f.vhd"
    ok("create", "-n", fixed, "-s", "2", "-r")
    for flag in (["-b", "0"], ["-B"], ["-t", "0"], ["-m", "0"], ["-a"]):
        proc = vhd_util("read", "-n", fixed, *flag)
        assert proc.returncode == errno.EINVAL
        assert proc.stdout == f"Failed to get bat for {fixed}: -22\n"
        assert "a fixed VHD has no BAT" in proc.stderr
    assert vhd_util_bytes("read", "-n", fixed, "-r", "0", "-c", "1").stdout == bytes(512)
    assert "Disk type           : Fixed hard disk" in ok("read", "-n", fixed, "-p")


def test_batmap_flags_on_a_qemu_vhd(tmp_path):
    path = qemu_vhd(tmp_path / "q.vhd", "8M", "write -P 0x11 0 4k")
    proc = vhd_util("read", "-n", path, "-a")
    assert (proc.returncode, proc.stdout) == (errno.EINVAL, "failed to read batmap: -22\n")
    assert "no batmap" in proc.stderr
    assert ok("read", "-n", path, "-e", "0", "-c", "16") == "0 16\n"  # qemu fills bitmaps
    assert vhd_util_bytes("read", "-n", path, "-r", "0", "-c", "9").stdout == (
        b"\x11" * 4096 + bytes(512)
    )
