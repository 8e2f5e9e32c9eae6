"""Hostile or damaged qcow2 images fail with an error naming the field, never a crash."""

from __future__ import annotations

import asyncio
import errno
import struct
import subprocess
from pathlib import Path

import pytest
from image_helpers import qemu_img, qemu_io, read_all
from tapdisk.drivers.base import ImageError, ImageFormatError
from tapdisk.drivers.registry import OpenOptions, open_image

#: Header field -> (offset, struct format).
FIELDS = {
    "backing_file_offset": (8, ">Q"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "incompatible_features": (72, ">Q"),
    "refcount_order": (96, ">I"),
}


def image(tmp_path: Path, name: str = "h.qcow2", size: str = "4M") -> Path:
    path = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    qemu_io("qcow2", path, "write -P 7 0 128k")
    return path


def get(path: Path, field: str) -> int:
    off, fmt = FIELDS[field]
    with path.open("rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def poke(path: Path, field: str, value: int) -> None:
    off, fmt = FIELDS[field]
    with path.open("r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


def open_fails(path: Path, *, read_only: bool = True, **opts: object) -> str:
    with pytest.raises(ImageError) as info:
        img = open_image(f"qcow2:{path}", OpenOptions(read_only=read_only, **opts))  # type: ignore[arg-type]
        asyncio.run(img.close())
    return str(info.value)


def test_cluster_bits_out_of_range_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    poke(path, "cluster_bits", 30)
    assert "cluster_bits" in open_fails(path)


def test_refcount_order_out_of_range_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    poke(path, "refcount_order", 7)
    assert "refcount_order" in open_fails(path)


def test_l1_size_too_small_for_disk_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    poke(path, "size", 1 << 40)
    assert "l1_size" in open_fails(path)


def test_table_offset_past_end_of_file_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    poke(path, "l1_table_offset", 1 << 40)
    msg = open_fails(path)
    assert "l1_table_offset" in msg and "past the end" in msg


def test_unaligned_table_offset_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    poke(path, "refcount_table_offset", get(path, "refcount_table_offset") + 512)
    msg = open_fails(path)
    assert "refcount_table_offset" in msg and "aligned" in msg


def test_overlapping_tables_are_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    poke(path, "l1_table_offset", get(path, "refcount_table_offset"))
    msg = open_fails(path)
    assert "overlaps" in msg


def test_l1_entry_pointing_at_refcount_table_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    l1 = get(path, "l1_table_offset")
    with path.open("r+b") as f:
        f.seek(l1)
        f.write(struct.pack(">Q", get(path, "refcount_table_offset") | (1 << 63)))
    assert "L1 entry 0" in open_fails(path)


def test_refcount_block_loop_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    rt = get(path, "refcount_table_offset")
    with path.open("r+b") as f:  # second refcount block = the first one again
        f.seek(rt)
        first = f.read(8)
        f.seek(rt + 8)
        f.write(first)
    assert "refcount loop" in open_fails(path, read_only=False)


def test_refcount_block_inside_refcount_table_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    rt = get(path, "refcount_table_offset")
    with path.open("r+b") as f:
        f.seek(rt)
        f.write(struct.pack(">Q", rt))
    assert "refcount" in open_fails(path, read_only=False)


def test_l2_entry_into_metadata_never_gets_written(tmp_path: Path) -> None:
    path = image(tmp_path)
    l1 = get(path, "l1_table_offset")
    with path.open("r+b") as f:
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)  # guest cluster 0 -> the L1 table, claimed writable
        f.write(struct.pack(">Q", l1 | (1 << 63)))
    before = path.read_bytes()

    async def go() -> None:
        img = open_image(f"qcow2:{path}", OpenOptions())
        try:
            await img.write(0, memoryview(b"x" * 512))
        finally:
            img.file.close()  # type: ignore[attr-defined]

    with pytest.raises(OSError, match="points at the active L1 table") as info:
        asyncio.run(go())
    assert info.value.errno == errno.EIO
    after = path.read_bytes()
    assert get(path, "incompatible_features") == 2  # the corrupt bit, and nothing else changed
    assert after[:72] + after[80:] == before[:72] + before[80:]


def test_encrypted_image_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    poke(path, "crypt_method", 2)
    assert "crypt_method" in open_fails(path)


def test_external_data_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", path, "1M")
    assert "external data file" in open_fails(path)


def test_unknown_incompatible_feature_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    poke(path, "incompatible_features", 1 << 40)
    assert "incompatible_features" in open_fails(path)


def test_corrupt_bit_allows_read_only_open_only(tmp_path: Path) -> None:
    path = image(tmp_path)
    poke(path, "incompatible_features", 2)
    assert "corrupt" in open_fails(path, read_only=False)
    assert read_all(f"qcow2:{path}")[:4] == b"\x07" * 4


def test_backing_chain_loop_is_refused(tmp_path: Path) -> None:
    a = image(tmp_path, "a.qcow2")
    b = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
    msg = open_fails(b)
    assert "backing_file" in msg and "loops" in msg


def test_backing_file_outside_allowed_dirs_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    image(other, "base.qcow2")
    top_dir = tmp_path / "vms"
    top_dir.mkdir()
    top = top_dir / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "../other/base.qcow2", "-F", "qcow2", top)
    msg = open_fails(top)
    assert "backing_file" in msg and "outside the allowed" in msg
    ok = read_all(f"qcow2:{top}", allowed_dirs=(str(tmp_path),))
    assert ok[:1] == b"\x07"


def test_dirty_image_gets_refcounts_rebuilt_on_read_write_open(tmp_path: Path) -> None:
    path = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "8M")
    # qemu-io aborts with the dirty bit set and refcounts never written (lazy refcounts).
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 3M", "-c", "abort", str(path)],
        capture_output=True,
    )
    assert get(path, "incompatible_features") & 1
    assert "ERROR" in qemu_img_check(path)
    img = open_image(f"qcow2:{path}", OpenOptions())
    asyncio.run(img.close())
    assert get(path, "incompatible_features") & 1 == 0
    out = qemu_img_check(path)
    assert "No errors were found" in out, out
    assert read_all(f"qcow2:{path}")[: 3 << 20] == b"\x03" * (3 << 20)


def qemu_img_check(path: Path) -> str:
    proc = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    return proc.stdout + proc.stderr


def test_unaligned_l2_entry_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    l1 = get(path, "l1_table_offset")
    with path.open("r+b") as f:
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        data = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2)
        f.write(struct.pack(">Q", data + 0x1200))
    with pytest.raises(ImageFormatError, match="not cluster aligned"):
        read_all(f"qcow2:{path}")


def test_random_metadata_damage_gives_image_errors_only(tmp_path: Path) -> None:
    import random

    good = tmp_path / "good.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", good, "1M")
    qemu_io("qcow2", good, "write -P 1 0 64k", "write -c -P 2 128k 4k", "write -z 200k 8k")
    pristine = good.read_bytes()
    rng = random.Random(42)
    bad = tmp_path / "bad.qcow2"
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(300):
        raw = bytearray(pristine)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, 5 * 4096)
            raw[pos] = rng.randrange(256)
        bad.write_bytes(bytes(raw))
        try:
            read_all(f"qcow2:{bad}")
            outcomes["ok"] += 1
        except ImageError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0
