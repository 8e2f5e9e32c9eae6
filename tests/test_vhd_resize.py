"""``vhd-util resize`` and ``revert``: growing in place (``-f``) and past the BAT room
reserved at create through an undo journal (``-j``), and undoing it.

The journal is blktap's (``libvhd-journal.c``): the tests write and read it with their
own code, from that layout, so a journal either tool leaves behind is one the other
reverts.  Crashes at every step are in ``test_vhd_resize_crash.py``.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from helpers import require, run
from image_helpers import write_all
from vhdutil_helpers import (
    MiB,
    file_size_limit,
    killed_at,
    ok,
    our_vhd,
    qemu_vhd,
    read_prefix,
    traced_calls,
    vhd_util,
)

#: Writes into blocks 0, 1 and 5 of a 20 MiB image.
WRITES = [(0, b"\x01" * 4096), (2 * MiB + 512, b"\x02" * MiB), (10 * MiB, b"\x03" * 700)]


def bat(path: Path) -> list[str]:
    lines = ok("read", "-n", path, "-b", "0", "-c", "10").splitlines()
    return [line.split("offset: ")[1] for line in lines]


def qemu_reads(path: Path, *checks: str) -> None:
    """qemu's vpc driver reads the patterns at the places given (``read -P`` commands)."""
    argv: list[str | Path] = [require("qemu-io"), "-f", "vpc"]
    for check in checks:
        argv += ["-c", f"read -P {check}"]
    out = run(*argv, path)
    assert "Pattern verification failed" not in out, out


def test_fast_resize_grows_in_whole_blocks_within_the_reserved_bat(tmp_path):
    path = our_vhd(tmp_path / "d.vhd", 8, WRITES[:1], "-S", "64")
    ok("resize", "-n", path, "-s", "9", "-f")  # blktap rounds up to 2 MiB blocks
    assert ok("query", "-n", path, "-v", "-S") == "10\n64\n"
    ok("resize", "-n", path, "-s", "64", "-f")
    proc = vhd_util("resize", "-n", path, "-s", "66", "-f")
    assert proc.returncode == errno.EINVAL and "BAT entries" in proc.stderr
    proc = vhd_util("resize", "-n", path, "-s", "4", "-f")
    assert proc.returncode == errno.EINVAL and "cannot shrink" in proc.stderr
    assert ok("query", "-n", path, "-v") == "64\n"
    ok("check", "-b", "-n", path)
    assert read_prefix(path, 4096) == b"\x01" * 4096


def test_journaled_resize_moves_blocks_to_make_room_for_the_bat(tmp_path):
    path = our_vhd(tmp_path / "d.vhd", 20, WRITES)
    before = read_prefix(path, 20 * MiB)
    old_bat = bat(path)
    ok("resize", "-n", path, "-s", "1100000", "-j", tmp_path / "j")
    assert not (tmp_path / "j").exists()
    assert ok("query", "-n", path, "-v", "-S") == "1100000\n1100000\n"
    new_bat = bat(path)
    # The 550000-entry BAT and its batmap end past 2 MiB: blocks 0 and 1 moved to the end.
    assert new_bat[5] == old_bat[5] and new_bat[0] != old_bat[0] and new_bat[1] != old_bat[1]
    assert min(int(new_bat[b]) for b in (0, 1, 5)) > 2_000_000
    assert read_prefix(path, 20 * MiB) == before
    ok("check", "-b", "-n", path)
    qemu_reads(path, "0x01 0 4k", "0x02 2097664 1M", "0x03 10M 700", "0 999000M 4k")


def test_journaled_resize_of_a_child_moves_its_parent_locators(tmp_path):
    base = our_vhd(tmp_path / "base.vhd", 20, [(0, b"\x09" * MiB)])
    child = tmp_path / "child.vhd"
    ok("snapshot", "-n", child, "-p", base)
    write_all(f"vhd:{child}", WRITES[1:])
    before = read_prefix(child, 20 * MiB)
    ok("resize", "-n", child, "-s", "200000", "-j", tmp_path / "j")
    assert read_prefix(child, 20 * MiB) == before
    assert ok("query", "-n", child, "-p", "-v") == f"200000\n{base}\n"
    offsets = [
        int(line.split(":")[1])
        for line in ok("read", "-p", "-n", child).splitlines()
        if "data_offset  :" in line
    ]
    assert len(offsets) == 3 and min(offsets) > 400_000  # past the 100000-entry BAT
    ok("check", "-p", "-b", "-n", child)


def test_journaled_resize_within_the_room_reserved(tmp_path):
    path = our_vhd(tmp_path / "d.vhd", 8, WRITES[:1], "-S", "64")
    size = os.path.getsize(path)
    ok("resize", "-n", path, "-s", "30", "-j", tmp_path / "j")
    assert ok("query", "-n", path, "-v", "-S") == "30\n64\n"  # blktap: 86, its BAT grows anyway
    assert os.path.getsize(path) == size


def test_journaled_resize_of_a_fixed_vhd_preallocates(tmp_path):
    path = tmp_path / "f.vhd"
    ok("create", "-n", path, "-s", "4", "-r")
    write_all(f"vhd:{path}", [(4 * MiB - 512, b"\x05" * 512)])
    ok("resize", "-n", path, "-s", "12", "-j", tmp_path / "j")
    st = os.stat(path)
    assert st.st_size == 12 * MiB + 512 and st.st_blocks * 512 >= 12 * MiB
    assert read_prefix(path, 12 * MiB) == bytes(4 * MiB - 512) + b"\x05" * 512 + bytes(8 * MiB)
    ok("check", "-n", path)


@pytest.mark.parametrize(
    "setup, args, status, message",
    [
        ("ours", ["-s", "4", "-j", "J"], errno.ENOSYS, "cannot shrink"),
        ("qemu", ["-s", "40", "-j", "J"], errno.EINVAL, "not created by xen"),
        ("qemu", ["-s", "40", "-f"], errno.EINVAL, "not created by xen"),
        ("journal exists", ["-s", "40", "-j", "J"], errno.EEXIST, "already exists"),
        ("ours", ["-s", "40"], errno.EINVAL, "options:"),
        ("ours", ["-s", "40", "-f", "-j", "J"], errno.EINVAL, "options:"),
    ],
)
def test_resize_refusals_leave_the_image_alone(tmp_path, setup, args, status, message):
    if setup == "qemu":
        path = qemu_vhd(tmp_path / "d.vhd", "8M", "write -P 0x11 0 4k")
    else:
        path = our_vhd(tmp_path / "d.vhd", 8, WRITES[:1])
    journal = tmp_path / "J"
    if setup == "journal exists":
        journal.write_bytes(b"precious")
    before = path.read_bytes()
    proc = vhd_util("resize", "-n", path, *args, cwd=tmp_path)
    assert proc.returncode == status and message in proc.stderr
    assert path.read_bytes() == before
    assert journal.exists() == (setup == "journal exists")


def test_a_failed_resize_reverts_itself(tmp_path):
    """A write fails while blocks move (a file size limit standing for a full disk): the
    journal puts everything back, as blktap does, and the resize exits with the error."""
    path = our_vhd(tmp_path / "d.vhd", 20, [(0, b"\x01" * 2 * MiB), (2 * MiB, b"\x02" * MiB)])
    write_all(f"vhd:{path}", [(4 * MiB, b"\x04" * 2 * MiB)])
    before = path.read_bytes()
    limit = file_size_limit(len(before) + MiB)  # room for the journal, not for a moved block
    proc = vhd_util("resize", "-n", path, "-s", "1100000", "-j", tmp_path / "j", preexec_fn=limit)
    assert proc.returncode == errno.EFBIG, proc.stderr
    assert path.read_bytes() == before
    assert not (tmp_path / "j").exists()


# ---------------------------------------------------------------------------
# blktap's journal format, written and read here from its layout


JOURNAL_HEAD = struct.Struct(">8s16sQIIQQ")  # then the end of the journal, little-endian
ENTRY = struct.Struct(">QIIQI")  # then 4 padding bytes, which count in the checksum
ENTRY_COOKIE = 0xAAAA12344321AAAA


def entry(kind: int, offset: int, data: bytes, padding: bytes) -> bytes:
    head = ENTRY.pack(ENTRY_COOKIE, kind, len(data), offset, 0) + padding
    total = ~(sum(head) + sum(data)) & 0xFFFFFFFF
    return ENTRY.pack(ENTRY_COOKIE, kind, len(data), offset, total) + padding + data


def blktap_journal(vhd: Path, journal: Path, blocks: list[int]) -> None:
    """The journal blktap's ``vhd-util resize`` writes before moving ``blocks``: footer,
    footer copy, header, locators, BAT (its in-use entries), batmap header and map, then
    each block's bitmap and data.  Entry padding is garbage, as blktap's stack leaves it."""
    raw = vhd.read_bytes()
    size = len(raw)
    table_offset, max_entries = struct.unpack_from(">QxxxxI", raw, 512 + 16)
    current = struct.unpack_from(">Q", raw, 48)[0]
    in_use = -(-current // (2 * MiB))
    bat_bytes = -(-in_use * 4 // 512) * 512
    batmap_at = table_offset + -(-max_entries * 4 // 512) * 512
    map_at, map_sectors = struct.unpack_from(">QI", raw, batmap_at + 8)
    regions = [(1, size - 512, 512), (2, 0, 512), (3, 512, 1024)]
    for i in range(8):
        code, space, _, _, off = struct.unpack_from(">IIIIQ", raw, 512 + 576 + 24 * i)
        if code:
            regions.append((4, off, space))
    regions += [(5, table_offset, bat_bytes), (6, batmap_at, 512), (7, map_at, map_sectors * 512)]
    entries = [entry(k, off, raw[off : off + n], b"\xde\xad\xbe\xef") for k, off, n in regions]
    metadata = b"".join(entries)
    data = b""
    for b in blocks:
        start = struct.unpack_from(">I", raw, table_offset + 4 * b)[0] * 512
        data += entry(8, start, raw[start : start + 512], b"\x01\x02\x03\x04")
        data += entry(8, start + 512, raw[start + 512 : start + 512 + 2 * MiB], b"\x05\x06\x07\x08")
    uuid = raw[size - 512 + 68 : size - 512 + 84]
    eof = 512 + len(metadata) + len(data)
    head = JOURNAL_HEAD.pack(
        b"vjournal", uuid, size - 512, 2 * len(blocks), len(regions), 512 + len(metadata), 512
    )
    journal.write_bytes((head + struct.pack("<Q", eof)).ljust(512, b"\0") + metadata + data)


def test_revert_restores_from_a_journal_blktap_wrote(tmp_path):
    path = our_vhd(tmp_path / "d.vhd", 20, WRITES)
    before = read_prefix(path, 20 * MiB)
    size = os.path.getsize(path)
    journal = tmp_path / "j"
    blktap_journal(path, journal, [0])
    with open(path, "r+b") as f:  # what a resize killed half way leaves
        raw = bytearray(f.read(512))
        raw[:8] = b"v_poison"
        f.seek(0)
        f.write(raw)
        f.seek(1536)
        f.write(b"\x00\x00\x7f\x00" * 2000)  # a longer BAT over batmap and block 0
        f.seek(size)
        f.write(b"\xee" * 3 * MiB)  # block 0 moved past the end
    assert vhd_util("check", "-n", path).returncode == errno.EINVAL
    ok("revert", "-n", path, "-j", journal)
    assert not journal.exists()
    assert os.path.getsize(path) == size
    assert read_prefix(path, 20 * MiB) == before
    ok("check", "-b", "-n", path)


def test_our_journal_is_blktaps_format(tmp_path):
    """A resize killed just before it enables the image leaves its complete journal."""
    (tmp_path / "img").mkdir()
    path = our_vhd(tmp_path / "img" / "d.vhd", 20, WRITES)
    original = path.read_bytes()
    before = read_prefix(path, 20 * MiB)
    journal = tmp_path / "img" / "j"
    args = ("resize", "-n", "d.vhd", "-s", "1100000", "-j", "j")
    calls = traced_calls(tmp_path / "img", tmp_path / "trace", *args)
    writes = [c for c in calls if c.startswith("pwrite64")]
    enable = next(i for i, c in enumerate(writes, 1) if '"conectix' in c)
    assert killed_at("pwrite64", enable, *args, cwd=tmp_path / "img").returncode == -9
    raw = journal.read_bytes()
    cookie, uuid, footer_at, data_n, meta_n, data_at, meta_at = JOURNAL_HEAD.unpack_from(raw)
    assert (cookie, footer_at, uuid) == (b"vjournal", len(original) - 512, original[-444:-428])
    assert struct.unpack_from("<Q", raw, JOURNAL_HEAD.size)[0] == len(raw)
    assert (meta_n, meta_at, data_n) == (6, 512, 4)  # no locators; blocks 0 and 1 moved
    pos, kinds = 512, []
    while pos < len(raw):
        cookie, kind, size, offset, csum = ENTRY.unpack_from(raw, pos)
        body = raw[pos + 32 : pos + 32 + size]
        head = raw[pos : pos + 24] + bytes(4) + raw[pos + 28 : pos + 32]
        assert cookie == ENTRY_COOKIE and csum == ~(sum(head) + sum(body)) & 0xFFFFFFFF
        assert body == original[offset : offset + size]  # what stood there before
        kinds.append(kind)
        pos += 32 + size
    assert kinds == [1, 2, 3, 5, 6, 7, 8, 8, 8, 8]
    assert data_at == 512 + sum(32 + n for n in (512, 512, 1024, 512, 512, 512))
    ok("revert", "-n", path, "-j", journal)
    assert path.read_bytes()[-512:] == original[-512:]
    assert read_prefix(path, 20 * MiB) == before


def test_revert_of_a_journal_that_holds_nothing(tmp_path):
    """Killed before its journal was complete, a resize has not touched the image: revert
    just removes the journal.  One committed by blktap, which then died before enabling
    the image, has it enabled."""
    path = our_vhd(tmp_path / "d.vhd", 8, WRITES[:1])
    original = path.read_bytes()
    journal = tmp_path / "j"
    journal.write_bytes(b"")
    ok("revert", "-n", path, "-j", journal)
    assert not journal.exists() and path.read_bytes() == original
    uuid = original[-444:-428]
    committed = JOURNAL_HEAD.pack(b"vjournal", uuid, len(original) - 512, 0, 0, 0, 0)
    journal.write_bytes((committed + struct.pack("<Q", 9999)).ljust(512, b"\0"))
    with open(path, "r+b") as f:
        for at in (0, len(original) - 512):
            f.seek(at)
            footer = bytearray(f.read(512))
            footer[:8] = b"v_poison"
            footer[64:68] = (~sum(footer[:64] + bytes(4) + footer[68:]) & 0xFFFFFFFF).to_bytes(4)
            f.seek(at)
            f.write(footer)
    assert vhd_util("check", "-n", path).returncode == errno.EINVAL
    ok("revert", "-n", path, "-j", journal)
    assert path.read_bytes() == original and not journal.exists()


def test_revert_refuses_a_journal_of_another_vhd(tmp_path):
    a = our_vhd(tmp_path / "a.vhd", 20, WRITES)
    b = our_vhd(tmp_path / "b.vhd", 20, WRITES)
    journal = tmp_path / "j"
    blktap_journal(a, journal, [0])
    before = b.read_bytes()
    proc = vhd_util("revert", "-n", b, "-j", journal)
    assert proc.returncode == errno.EINVAL and "another VHD" in proc.stderr
    assert b.read_bytes() == before and journal.exists()
    proc = vhd_util("revert", "-n", a, "-j", tmp_path / "missing")
    assert proc.returncode == errno.ENOENT
