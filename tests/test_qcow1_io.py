"""QCOW v1 reads, writes, backing files and block status, with qemu-img as the oracle."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Served, require, run
from image_helpers import qemu_img, qemu_io, qemu_raw, read_all
from tapdisk.drivers.base import ExtentFlags
from tapdisk.drivers.fileio import in_memory
from tapdisk.drivers.qcow import QcowImage
from tapdisk.drivers.qcow.image import DIRTY_LIMIT_BYTES
from tapdisk.drivers.registry import OpenOptions, open_image

K = 1024
M = 1024 * K


def compare(path: Path, expect: bytes, tmp: Path) -> None:
    """``qemu-img compare`` of a qcow image with the expected contents."""
    ref = tmp / "expect.raw"
    ref.write_bytes(expect)
    run(require("qemu-img"), "compare", "-f", "qcow", "-F", "raw", path, ref)


def mixed_data(size: int, seed: int) -> bytes:
    """Compressible and incompressible stretches, with zero gaps."""
    rng = random.Random(seed)
    out = bytearray(size)
    for off in range(0, size, 16 * K):
        pick = rng.random()
        if pick < 0.4:
            out[off : off + 16 * K] = bytes([rng.randrange(1, 256)]) * (16 * K)
        elif pick < 0.7:
            out[off : off + 16 * K] = rng.randbytes(16 * K)
        elif pick < 0.85:
            out[off : off + 16 * K] = (b"tapdisk qcow %d " % off) * (16 * K // 16)
    return bytes(out[:size])


def convert_compressed(src: Path, path: Path) -> None:
    """``qemu-img convert -c -O qcow``, checked against the source with ``qemu-img compare``.

    qemu-img 7.2 exits 1 after writing a complete, correct compressed qcow image
    (its end-of-stream compressed write of length 0 is refused by the qcow
    driver), so the exit code is not the oracle; the comparison is.
    """
    qemu = require("qemu-img")
    proc = subprocess.run(
        [qemu, "convert", "-c", "-f", "raw", "-O", "qcow", str(src), str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode in (0, 1), proc.stderr
    run(qemu, "compare", "-f", "qcow", "-F", "raw", path, src)
    assert path.stat().st_size < src.stat().st_size // 2


def do(path: Path, *ops: tuple[str, int, bytes | int], backing_dirs: tuple[str, ...] = ()) -> None:
    """Apply ("w", offset, data), ("z", offset, length), ("f", 0, 0) through our driver."""

    async def go() -> None:
        img = open_image(f"qcow:{path}", OpenOptions(allowed_dirs=backing_dirs))
        try:
            for kind, off, arg in ops:
                if kind == "w":
                    assert isinstance(arg, bytes)
                    await img.write(off, memoryview(arg))
                elif kind == "z":
                    assert isinstance(arg, int)
                    await img.write_zeroes(off, arg)
                else:
                    await img.flush()
        finally:
            await img.close()

    asyncio.run(go())


@pytest.mark.parametrize("compressed", [False, True])
def test_qemu_converted_image_reads_identically(tmp_path: Path, compressed: bool) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(mixed_data(3 * M + 5 * K, seed=1))
    path = tmp_path / "conv.qcow"
    if compressed:
        convert_compressed(src, path)
    else:
        qemu_img("convert", "-f", "raw", "-O", "qcow", src, path)
    assert read_all(f"qcow:{path}") == qemu_raw(path, "qcow", tmp_path)


def test_random_writes_match_qemu_compare(tmp_path: Path) -> None:
    path = tmp_path / "r.qcow"
    qemu_img("create", "-q", "-f", "qcow", path, "8M")
    rng = random.Random(5)
    expect = bytearray(8 * M)
    ops: list[tuple[str, int, bytes | int]] = []
    for _ in range(150):
        length = rng.choice([1, 511, 4 * K, 4 * K + 1, 37 * K, 300 * K])
        off = rng.randrange(0, 8 * M - length)
        if rng.random() < 0.8:
            data = rng.randbytes(length)
            ops.append(("w", off, data))
            expect[off : off + length] = data
        else:
            ops.append(("z", off, length))
            expect[off : off + length] = bytes(length)
        if rng.random() < 0.1:
            ops.append(("f", 0, 0))
    do(path, *ops)
    compare(path, bytes(expect), tmp_path)


def test_partial_writes_over_raw_backing_copy_the_rest(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(mixed_data(4 * M, seed=2))
    path = tmp_path / "top.qcow"  # qemu's default with a backing file: 512-byte clusters
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", path)
    expect = bytearray(base.read_bytes())
    ops: list[tuple[str, int, bytes | int]] = []
    for off, length in ((100, 50), (4095, 2), (1 * M + 7, 70 * K), (4 * M - 3, 3)):
        data = bytes([length % 251 + 1]) * length
        ops.append(("w", off, data))
        expect[off : off + length] = data
    do(path, *ops)
    compare(path, bytes(expect), tmp_path)
    assert base.read_bytes() == mixed_data(4 * M, seed=2)


@pytest.mark.parametrize("fmt", ["qcow", "qcow2", "vpc", "raw"])
def test_backing_file_format_is_probed(tmp_path: Path, fmt: str) -> None:
    base = tmp_path / f"base.{fmt}"
    qemu_img("create", "-q", "-f", fmt, base, "4M")
    qemu_io(fmt, base, "write -P 0x11 0 1M", "write -P 0x22 3M 64k")
    path = tmp_path / "top.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", base.name, "-F", fmt, path)
    qemu_io("qcow", path, "write -P 0x33 512k 1k")
    got = read_all(f"qcow:{path}")
    assert got == qemu_raw(path, "qcow", tmp_path)[: len(got)]
    assert got[512 * K : 513 * K] == b"\x33" * K and got[3 * M] == 0x22


def test_three_deep_chain_reads_identically(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow", tmp_path / "a.qcow", "2M")
    qemu_io("qcow", tmp_path / "a.qcow", "write -P 1 0 2M")
    qemu_img("create", "-q", "-f", "qcow", "-b", "a.qcow", "-F", "qcow", tmp_path / "b.qcow")
    qemu_io("qcow", tmp_path / "b.qcow", "write -P 2 512k 512k")
    qemu_img("create", "-q", "-f", "qcow", "-b", "b.qcow", "-F", "qcow", tmp_path / "c.qcow")
    qemu_io("qcow", tmp_path / "c.qcow", "write -P 3 700k 1000")
    path = tmp_path / "c.qcow"
    assert read_all(f"qcow:{path}") == qemu_raw(path, "qcow", tmp_path)


def test_write_across_compressed_clusters_reallocates_them(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(mixed_data(1 * M, seed=3))
    path = tmp_path / "c.qcow"
    convert_compressed(src, path)
    expect = bytearray(src.read_bytes())
    data = b"\xab" * (10 * K)
    expect[6 * K : 16 * K] = data  # tail of cluster 1, clusters 2-3 whole
    do(path, ("w", 6 * K, data), ("f", 0, 0), ("w", 6 * K + 1, b"\xcd"))
    expect[6 * K + 1] = 0xCD
    compare(path, bytes(expect), tmp_path)


def test_metadata_reaches_disk_only_at_flush(tmp_path: Path) -> None:
    path = tmp_path / "f.qcow"
    qemu_img("create", "-q", "-f", "qcow", path, "4M")

    async def go() -> None:
        img = open_image(f"qcow:{path}", OpenOptions())
        try:
            await img.write(M, memoryview(b"\x77" * 8 * K))
            assert qemu_raw(path, "qcow", tmp_path)[M : M + 8 * K] == bytes(8 * K)
            await img.flush()
            assert qemu_raw(path, "qcow", tmp_path)[M : M + 8 * K] == b"\x77" * 8 * K
        finally:
            await img.close()

    asyncio.run(go())


def test_zeroing_unallocated_space_allocates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "z.qcow"
    qemu_img("create", "-q", "-f", "qcow", path, "64M")
    before = path.stat().st_size
    do(path, ("z", 0, 64 * M))
    assert path.stat().st_size == before


def test_block_status_reports_allocated_backing_and_hole(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    with base.open("wb") as f:
        f.truncate(4 * M)
        f.seek(2 * M)
        f.write(b"\x01" * M)  # backing data at [2M, 3M), holes elsewhere
    path = tmp_path / "top.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", path)
    qemu_io("qcow", path, "write -P 5 0 64k")

    async def status() -> list[tuple[int, int, ExtentFlags]]:
        img = open_image(f"qcow:{path}", OpenOptions(read_only=True))
        try:
            out = []
            pos = 0
            while pos < img.size:
                for ext in await img.extents(pos, img.size - pos):
                    out.append((pos, ext.length, ext.flags))
                    pos += ext.length
            return out
        finally:
            await img.close()

    def flags_at(off: int) -> ExtentFlags:
        return next(f for start, n, f in extents if start <= off < start + n)

    extents = asyncio.run(status())
    assert flags_at(0) == ExtentFlags.DATA  # allocated in the qcow image
    assert flags_at(2 * M + 5) == ExtentFlags.DATA  # from the backing file
    assert flags_at(1 * M) == ExtentFlags.HOLE | ExtentFlags.ZERO  # nowhere
    assert sum(n for _, n, _ in extents) == 4 * M


def sixes_qcow(tmp_path: Path) -> Path:
    """A 4 MiB qcow image whose first 64 KiB are allocated and hold 0x06."""
    path = tmp_path / "n.qcow"
    qemu_img("create", "-q", "-f", "qcow", path, "4M")
    qemu_io("qcow", path, "write -P 6 0 64k")
    return path


def test_nowait_paths_serve_allocated_clusters_only(tmp_path: Path) -> None:
    path = sixes_qcow(tmp_path)

    async def go() -> None:
        img = open_image(f"qcow:{path}", OpenOptions())
        assert isinstance(img, QcowImage)
        try:
            buf = bytearray(16 * K)
            assert not img.read_nowait(0, memoryview(buf))  # L2 table not cached yet
            await img.read(0, memoryview(buf))
            assert img.write_nowait(4 * K, memoryview(b"\x07" * 8 * K))
            assert not img.write_nowait(64 * K, memoryview(b"\x08" * 512))  # unallocated
            if img.read_nowait(0, memoryview(buf)):  # False where RWF_NOWAIT is unsupported
                assert buf == b"\x06" * 4 * K + b"\x07" * 8 * K + b"\x06" * 4 * K
            await img.read(0, memoryview(buf))
            assert buf == b"\x06" * 4 * K + b"\x07" * 8 * K + b"\x06" * 4 * K
        finally:
            await img.close()

    asyncio.run(go())


def test_nowait_write_over_uncached_partial_pages_writes_all_or_nothing(tmp_path: Path) -> None:
    """A write 512 bytes into a cluster covers two host pages in part; uncached, both would
    be read from disk inline, so write_nowait refuses the whole write, not just that piece."""
    path = sixes_qcow(tmp_path)

    async def go() -> None:
        img = open_image(f"qcow:{path}", OpenOptions())
        assert isinstance(img, QcowImage)
        try:
            buf = bytearray(16 * K)
            await img.read(32 * K, memoryview(buf))  # caches the L2 table
            fd = img.file.fd
            if in_memory(fd):
                pytest.skip("the temporary directory is on tmpfs: no page is ever read from disk")
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            data = memoryview(b"\x09" * 4 * K)
            if not img.write_nowait(512, data):
                await img.write(512, data)
            await img.read(0, memoryview(buf))
            assert buf == b"\x06" * 512 + b"\x09" * 4 * K + b"\x06" * (12 * K - 512)
        finally:
            await img.close()

    asyncio.run(go())


def test_qemu_io_writes_through_tapdisk_serve_match(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(mixed_data(8 * M, seed=4))
    path = tmp_path / "s.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", path)
    srv = serve(f"qcow:{path}")
    expect = bytearray(base.read_bytes())
    cmds = []
    for i, (off, length) in enumerate(((0, 4096), (123457, 70000), (5 * M - 1, 2), (7 * M, M))):
        cmds += ["-c", f"write -P {i + 40} {off} {length}"]
        expect[off : off + length] = bytes([i + 40]) * length
    cmds += ["-c", f"write -z {3 * M} 8k", "-c", "flush"]
    expect[3 * M : 3 * M + 8 * K] = bytes(8 * K)
    run(require("qemu-io"), "-f", "raw", *cmds, srv.uri())
    assert srv.stop() == 0
    compare(path, bytes(expect), tmp_path)
    out = run(require("qemu-img"), "info", "-f", "qcow", path)
    assert "file format: qcow" in out


def test_dirty_metadata_is_written_back_without_flush_when_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "big.qcow"
    qemu_img("create", "-q", "-f", "qcow", path, "16G")  # 4 KiB L2 tables, 2 MiB each
    spans = (DIRTY_LIMIT_BYTES // 4096) + 8

    async def go() -> None:
        img = open_image(f"qcow:{path}", OpenOptions())
        try:
            for i in range(spans):
                await img.write(i * 2 * M, memoryview(b"\x01"))
            out = run(require("qemu-io"), "-r", "-f", "qcow", "-c", "read -P 1 0 1", path)
            assert "read 1/1 bytes" in out
        finally:
            await img.close()

    asyncio.run(go())
