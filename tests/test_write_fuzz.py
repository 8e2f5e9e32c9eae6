"""Writes through damaged images never overwrite metadata (fuzzed, fixed seeds, ~20 s).

Images made by qemu-img get metadata bytes mutated: random bytes, and table entries set to
offsets that point into other metadata (header, L1/L2 tables, refcount structures, snapshot
tables, the BAT, block bitmaps, footers), aligned or not.  Writes, zeroing and discards then
go through our driver; each may fail, none may damage what the mutation left:

- ``qemu-img check`` and our own check find no error that was not there before the writes;
- the metadata that existed before is unchanged, but for entries the writes filled in;
- what reads back is what was there plus what the successful writes wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from pathlib import Path

import pytest
from image_helpers import qemu_img, qemu_io
from qcow2_mutate import assert_no_new_errors, check_errors
from tapdisk.drivers.base import ImageError
from tapdisk.drivers.qcow2.format import Header
from tapdisk.drivers.registry import OpenOptions, open_image
from tapdisk.drivers.vhd.check import check_vhd

KiB = 1 << 10
SIZE = 4 << 20
COPIED = 1 << 63
#: Cases per format: about 20 s for the three on a shared 2-core machine.
CASES = 100


def read_image(spec: str) -> tuple[int, list[bytes | None]] | None:
    """(size, 64 KiB chunks or None where a read fails) through a read-only open."""
    chunks: list[bytes | None] = []

    async def go() -> int:
        image = open_image(spec, OpenOptions(read_only=True))
        try:
            for off in range(0, image.size, 64 * KiB):
                buf = bytearray(min(64 * KiB, image.size - off))
                try:
                    await image.read(off, memoryview(buf))
                    chunks.append(bytes(buf))
                except (ImageError, OSError):
                    chunks.append(None)
            return image.size
        finally:
            await image.close()

    try:
        return asyncio.run(go()), chunks
    except (ImageError, OSError):
        return None


def random_requests(rng: random.Random, size: int) -> list[tuple[str, int, int]]:
    out = []
    for _ in range(rng.randint(2, 6)):
        length = rng.choice([512, 4 * KiB, 64 * KiB, 200 * KiB + 512])
        off = rng.randrange(0, max(1, size - length)) // 512 * 512
        out.append((rng.choice(["write", "write", "write", "zero", "discard"]), off, length))
    return out


def write_through(spec: str, requests: list[tuple[str, int, int]], rng: random.Random):
    """Run the requests on a read-write open; (expected bytes, ranges whose content is
    unknown) or None when the image does not open read-write."""
    done: list[tuple[int, bytes]] = []
    unknown: list[tuple[int, int]] = []

    async def go() -> None:
        image = open_image(spec, OpenOptions())
        try:
            for kind, off, length in requests:
                length = min(length, image.size - off)
                if length <= 0:
                    continue
                data = rng.randbytes(length) if kind == "write" else bytes(length)
                try:
                    if kind == "write":
                        await image.write(off, memoryview(data))
                    elif kind == "zero":
                        await image.write_zeroes(off, length)
                    else:
                        await image.discard(off, length)
                        unknown.append((off, length))  # a hint: zeros, or as it was
                        continue
                    done.append((off, data))
                except (ImageError, OSError):
                    unknown.append((off, length))
            await image.flush()
        finally:
            with contextlib.suppress(ImageError, OSError):
                await image.close()

    try:
        asyncio.run(go())
    except (ImageError, OSError):
        return None
    return done, unknown


def assert_reads_back(spec: str, before, done, unknown) -> None:
    """What reads back is ``before`` with ``done`` applied, where anything is known."""
    if before is None:
        return
    size, chunks = before
    expected = bytearray(size)
    care = bytearray(b"\xff" * size)  # 0xff where the content is known
    for i, chunk in enumerate(chunks):
        lo = i * 64 * KiB
        if chunk is None:
            care[lo : lo + 64 * KiB] = bytes(len(care[lo : lo + 64 * KiB]))
        else:
            expected[lo : lo + len(chunk)] = chunk
    for off, data in done:
        expected[off : off + len(data)] = data
    for off, length in unknown:
        care[off : off + length] = bytes(len(care[off : off + length]))
    after = read_image(spec)
    assert after is not None, "the image no longer opens"
    for i, chunk in enumerate(after[1]):
        lo = i * 64 * KiB
        mask = care[lo : lo + 64 * KiB]
        if not any(mask):
            continue
        assert chunk is not None, f"chunk at {lo:#x} no longer reads"
        m = int.from_bytes(mask)
        if int.from_bytes(chunk) & m != int.from_bytes(expected[lo : lo + len(chunk)]) & m:
            pos = next(j for j in range(len(chunk)) if mask[j] and chunk[j] != expected[lo + j])
            raise AssertionError(f"byte {lo + pos:#x} reads {chunk[pos]}, not {expected[lo + pos]}")


def table(raw: bytes, offset: int, count: int) -> list[int]:
    return list(struct.unpack_from(f">{count}Q", raw, offset))


# -- qcow2 ----------------------------------------------------------------------------------


def qcow2_pristine(tmp_path: Path) -> bytes:
    path = tmp_path / "pristine.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, str(SIZE))
    qemu_io("qcow2", path, "write -P 1 0 64k", "write -c -P 2 256k 4k", "write -z 300k 8k")
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io("qcow2", path, "write -P 3 32k 8k", "write -P 4 2M 64k")
    return path.read_bytes()


def qcow2_places(raw: bytes) -> tuple[list[int], list[int], list[int]]:
    """(offsets of 8-byte entries worth pointing elsewhere, metadata offsets to point them at,
    header field offsets)."""
    header = Header.unpack(raw)
    cs = header.cluster_size
    entries: list[int] = []
    meta = [0, header.l1_table_offset, header.refcount_table_offset]
    if header.nb_snapshots:
        meta.append(header.snapshots_offset)
        meta.append(table(raw, header.snapshots_offset, 1)[0])  # the snapshot's L1 table
    for i, e in enumerate(table(raw, header.l1_table_offset, header.l1_size)):
        entries.append(header.l1_table_offset + 8 * i)
        l2 = e & 0x00FFFFFFFFFFFE00
        if l2:
            meta.append(l2)
            entries += [l2 + 8 * j for j in range(cs // 8) if table(raw, l2 + 8 * j, 1)[0]]
    for i, e in enumerate(table(raw, header.refcount_table_offset, 4)):
        entries.append(header.refcount_table_offset + 8 * i)
        if e:
            meta.append(e)
    fields = [8, 20, 24, 36, 40, 48, 56, 60, 64, 72, 96]
    return entries, meta, fields


def mutate_qcow2(raw: bytes, rng: random.Random) -> bytes:
    out = bytearray(raw)
    entries, meta, fields = qcow2_places(raw)
    for _ in range(rng.randint(1, 2)):
        how = rng.random()
        if how < 0.6:
            target = rng.choice(meta) + rng.choice([0, 0, 0x100, 0xD00])
            value = target | (COPIED if rng.random() < 0.5 else 0)
            struct.pack_into(">Q", out, rng.choice(entries), value)
        elif how < 0.75:
            pos = rng.choice(fields)
            if pos == 96:
                struct.pack_into(">I", out, pos, rng.choice([0, 1, 2, 3, 5, 6]))
            else:
                out[pos + rng.randrange(8 if pos in (24, 40, 48, 64, 72) else 4)] ^= (
                    1 << rng.randrange(8)
                )
        else:
            pos = rng.choice(entries) + rng.randrange(8)
            out[pos] = rng.randrange(256)
    return bytes(out)


def test_writes_through_mutated_qcow2_images_never_overwrite_metadata(tmp_path):
    pristine = qcow2_pristine(tmp_path)
    path = tmp_path / "fuzz.qcow2"
    spec = f"qcow2:{path}"
    opened = 0
    for seed in range(CASES):
        rng = random.Random(seed)
        path.write_bytes(mutate_qcow2(pristine, rng))
        before = check_errors(path)
        contents = read_image(spec)
        result = write_through(spec, random_requests(rng, SIZE), rng)
        if result is not None:
            opened += 1
            assert_reads_back(spec, contents, *result)
        assert_no_new_errors(path, before)
    assert opened >= CASES // 4  # the writes reached a fair share of the damaged images


# -- VHD ------------------------------------------------------------------------------------


def vhd_pristine(tmp_path: Path) -> bytes:
    path = tmp_path / "pristine.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic", path, str(SIZE))
    qemu_io("vpc", path, "write -P 1 0 64k", "write -P 2 2M 8k", "write -P 3 3M 4k")
    return path.read_bytes()


def vhd_layout(raw: bytes) -> tuple[int, int]:
    """(BAT offset, BAT entries) from the header."""
    data_offset = struct.unpack_from(">Q", raw, 16)[0]
    table_offset = struct.unpack_from(">Q", raw, data_offset + 16)[0]
    entries = struct.unpack_from(">I", raw, data_offset + 28)[0]
    return table_offset, entries


def mutate_vhd(raw: bytes, rng: random.Random) -> bytes:
    out = bytearray(raw)
    bat, count = vhd_layout(raw)
    used = [e for e in struct.unpack_from(f">{count}I", raw, bat) if e != 0xFFFFFFFF]
    sectors = len(raw) // 512
    targets = [0, 1, 2, bat // 512, sectors - 1, sectors - 2] + [
        u + d for u in used for d in (-1, 0, 1)
    ]
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.5:
            struct.pack_into(">I", out, bat + 4 * rng.randrange(count), rng.choice(targets))
        else:
            block = rng.choice(used)
            out[block * 512 + rng.randrange(512)] = rng.randrange(256)  # its sector bitmap
    return bytes(out)


def vhd_problems(path: Path) -> set[str]:
    return set(check_vhd(str(path)))


def test_writes_through_mutated_vhd_images_never_overwrite_metadata(tmp_path):
    pristine = vhd_pristine(tmp_path)
    path = tmp_path / "fuzz.vhd"
    spec = f"vhd:{path}"
    bat, count = vhd_layout(pristine)
    opened = 0
    for seed in range(CASES):
        rng = random.Random(seed)
        mutated = mutate_vhd(pristine, rng)
        path.write_bytes(mutated)
        problems = vhd_problems(path)
        contents = read_image(spec)
        result = write_through(spec, random_requests(rng, SIZE), rng)
        after = path.read_bytes()
        assert vhd_problems(path) <= problems
        assert after[512:bat] == mutated[512:bat]  # the header
        old = struct.unpack_from(f">{count}I", mutated, bat)
        new = struct.unpack_from(f">{count}I", after, bat)
        assert all(o in (n, 0xFFFFFFFF) for o, n in zip(old, new, strict=True))
        if result is not None:
            opened += 1
            assert_reads_back(spec, contents, *result)
    assert opened >= CASES // 5


# -- QCOW v1 --------------------------------------------------------------------------------


def qcow_pristine(tmp_path: Path) -> bytes:
    path = tmp_path / "pristine.qcow"
    qemu_img("create", "-q", "-f", "qcow", path, str(SIZE))
    qemu_io("qcow", path, "write -P 1 0 64k", "write -P 2 2M 8k", "write -P 3 3M 4k")
    return path.read_bytes()


def qcow_layout(raw: bytes) -> tuple[int, int, list[int]]:
    """(L1 offset, L1 entries, L2 table offsets)."""
    size = struct.unpack_from(">Q", raw, 24)[0]
    cluster_bits, l2_bits = raw[32], raw[33]
    l1_offset = struct.unpack_from(">Q", raw, 40)[0]
    l1_size = -(-size // (1 << (cluster_bits + l2_bits)))
    return l1_offset, l1_size, [e for e in table(raw, l1_offset, l1_size) if e]


def mutate_qcow(raw: bytes, rng: random.Random) -> bytes:
    out = bytearray(raw)
    l1, l1_size, l2s = qcow_layout(raw)
    l2_bytes = 8 << raw[33]
    slots = [l1 + 8 * i for i in range(l1_size)]
    for l2 in l2s:
        slots += [l2 + 8 * j for j in range(l2_bytes // 8) if table(raw, l2 + 8 * j, 1)[0]]
    targets = [0, 512, l1, *l2s, len(raw) - 512]
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.7:
            value = rng.choice(targets) + rng.choice([0, 0, 8, 0x200])
            struct.pack_into(">Q", out, rng.choice(slots), value)
        else:
            out[rng.choice(slots) + rng.randrange(8)] = rng.randrange(256)
    return bytes(out)


def test_writes_through_mutated_qcow_images_never_overwrite_metadata(tmp_path):
    pristine = qcow_pristine(tmp_path)
    path = tmp_path / "fuzz.qcow"
    spec = f"qcow:{path}"
    l1, l1_size, l2s = qcow_layout(pristine)
    count = (8 << pristine[33]) // 8
    opened = 0
    for seed in range(CASES):
        rng = random.Random(seed)
        mutated = mutate_qcow(pristine, rng)
        path.write_bytes(mutated)
        contents = read_image(spec)
        result = write_through(spec, random_requests(rng, SIZE), rng)
        after = path.read_bytes()
        assert after[:l1] == mutated[:l1]  # header and backing name
        for old, new in zip(table(mutated, l1, l1_size), table(after, l1, l1_size), strict=True):
            assert old in (0, new)
        for l2 in l2s:
            for old, new in zip(table(mutated, l2, count), table(after, l2, count), strict=True):
                assert old in (0, new) or old & (1 << 63)  # compressed clusters move on write
        if result is not None:
            opened += 1
            assert_reads_back(spec, contents, *result)
    assert opened >= CASES // 4


@pytest.fixture(autouse=True)
def _quiet_driver_logs(caplog):
    """Corruption is logged once per image; forty images make forty lines nobody reads."""
    caplog.set_level("CRITICAL", logger="tapdisk.drivers")
