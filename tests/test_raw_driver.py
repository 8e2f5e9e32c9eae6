"""The raw driver against real files: holes, zeroing, tmpfs fallbacks, O_DIRECT, extents."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tapdisk.drivers.base import Extent, ExtentFlags
from tapdisk.drivers.fileio import ImageFile, in_memory
from tapdisk.drivers.raw import RawImage

MiB = 1 << 20
HOLE = ExtentFlags.HOLE | ExtentFlags.ZERO


def make_file(path: Path, size: int, data: dict[int, bytes] | None = None) -> Path:
    """A sparse file of ``size`` bytes with ``data`` written at the given offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in (data or {}).items():
            f.seek(offset)
            f.write(chunk)
    return path


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


async def read(image: RawImage, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await image.read(offset, memoryview(buf))
    return bytes(buf)


def in_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test on one event loop (an image stays bound to the loop it first used)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper


def in_memory_file(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return in_memory(fd)
    finally:
        os.close(fd)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A directory on tmpfs, which refuses FALLOC_FL_ZERO_RANGE and RWF_NOWAIT."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as name:
        yield Path(name)


@in_loop
async def test_discard_punches_a_hole_that_reads_as_zeros(tmp_path):
    path = make_file(tmp_path / "a.raw", 4 * MiB, {0: b"\xaa" * 4 * MiB})
    image = RawImage(str(path))
    before = allocated(path)
    await image.discard(MiB, 2 * MiB)
    assert allocated(path) <= before - 2 * MiB
    assert await read(image, MiB, 2 * MiB) == bytes(2 * MiB)
    assert await read(image, 0, MiB) == b"\xaa" * MiB
    assert os.path.getsize(path) == 4 * MiB
    await image.close()


@in_loop
async def test_write_zeroes_may_unmap_deallocates(tmp_path):
    path = make_file(tmp_path / "a.raw", 4 * MiB, {0: b"\x55" * 4 * MiB})
    image = RawImage(str(path))
    await image.write_zeroes(0, 2 * MiB, may_unmap=True)
    assert allocated(path) <= 2 * MiB
    assert await read(image, 0, 2 * MiB) == bytes(2 * MiB)
    assert await read(image, 2 * MiB, 4) == b"\x55" * 4
    await image.close()


@in_loop
async def test_write_zeroes_no_hole_keeps_space_allocated(tmp_path):
    path = make_file(tmp_path / "a.raw", 4 * MiB, {0: b"\x55" * 4 * MiB})
    image = RawImage(str(path))
    await image.write_zeroes(MiB, 2 * MiB, may_unmap=False)
    assert allocated(path) >= 4 * MiB
    assert await read(image, MiB, 2 * MiB) == bytes(2 * MiB)
    assert await read(image, MiB - 1, 1) == b"\x55"
    assert await read(image, 3 * MiB, 1) == b"\x55"
    await image.close()


@in_loop
async def test_tmpfs_reads_are_inline_although_rwf_nowait_is_refused(shm_dir):
    """tmpfs refuses RWF_NOWAIT; its pages are memory, so reads still skip the thread pool."""
    path = make_file(shm_dir / "a.raw", MiB, {4096: b"tmpfs data"})
    image = RawImage(str(path))
    buf = bytearray(10)
    assert image.read_nowait(4096, memoryview(buf))
    assert buf == b"tmpfs data"
    assert await read(image, 4096, 10) == b"tmpfs data"
    await image.close()


def test_tmpfs_inline_read_past_end_of_file_is_zero_filled(shm_dir):
    """Image formats may end their file before their last block; the tail reads as zeros."""
    path = shm_dir / "short"
    path.write_bytes(b"x" * 6000)
    file = ImageFile(str(path), writable=False)
    buf = bytearray(b"\xff" * 4096)
    assert file.read_nowait(4096, memoryview(buf))
    assert buf == b"x" * 1904 + bytes(2192)
    file.close()


def test_write_into_part_of_an_uncached_page_waits_for_a_thread(tmp_path):
    """The kernel reads a partly written page from disk first; inline, the event loop would
    wait for that read.  Whole pages, and cached ones, are still written inline."""
    path = tmp_path / "cold"
    path.write_bytes(b"\x11" * (4 * 4096))
    file = ImageFile(str(path), writable=True)
    if in_memory(file.fd):
        pytest.skip("the temporary directory is on tmpfs: no page is ever read from disk")
    os.fsync(file.fd)
    os.posix_fadvise(file.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the cache
    assert not file.write_nowait(512, memoryview(b"\x22" * 4096))
    assert file.write_nowait(8192, memoryview(b"\x33" * 4096))  # a whole page needs no read
    os.pread(file.fd, 8192, 0)  # now cached
    assert file.write_nowait(512, memoryview(b"\x22" * 4096))
    assert os.pread(file.fd, 3 * 4096, 0) == b"\x11" * 512 + b"\x22" * 4096 + (
        b"\x11" * 3584 + b"\x33" * 4096
    )
    file.close()


def test_device_nodes_on_devtmpfs_are_not_read_inline():
    """/dev is devtmpfs, but a device's data is the device's: it keeps the RWF_NOWAIT path."""
    assert not in_memory_file("/dev/zero")


@in_loop
async def test_tmpfs_write_zeroes_without_zero_range_still_reads_zeros(shm_dir):
    path = make_file(shm_dir / "a.raw", 2 * MiB, {0: b"\x77" * 2 * MiB})
    image = RawImage(str(path))
    # NO_HOLE forbids the punch, and tmpfs refuses ZERO_RANGE: zero buffers are written.
    await image.write_zeroes(4096, MiB, may_unmap=False)
    assert await read(image, 4096, MiB) == bytes(MiB)
    assert await read(image, 4095, 1) == b"\x77"
    assert await read(image, 4096 + MiB, 1) == b"\x77"
    await image.close()


@in_loop
async def test_tmpfs_fast_zero_fails_with_enotsup_and_leaves_data(shm_dir):
    path = make_file(shm_dir / "a.raw", MiB, {0: b"\x77" * MiB})
    image = RawImage(str(path))
    with pytest.raises(OSError) as info:
        await image.write_zeroes(0, 65536, may_unmap=False, fast_only=True)
    assert info.value.errno == errno.ENOTSUP
    assert await read(image, 0, 65536) == b"\x77" * 65536
    await image.close()


@in_loop
async def test_direct_aligned_write_and_read_round_trip(tmp_path):
    path = make_file(tmp_path / "a.raw", 4 * MiB)
    image = RawImage(str(path), direct=True)
    assert image.block_size == 4096
    data = os.urandom(MiB)
    await image.write(MiB, memoryview(data))
    assert await read(image, MiB, MiB) == data
    assert path.read_bytes()[MiB : 2 * MiB] == data
    await image.close()


@in_loop
async def test_direct_unaligned_write_keeps_neighbouring_bytes(tmp_path):
    path = make_file(tmp_path / "a.raw", MiB, {0: b"\x11" * MiB})
    image = RawImage(str(path), direct=True)
    await image.write(4095, memoryview(b"\x22" * 4099))
    content = path.read_bytes()
    assert content[4094:4095] == b"\x11"
    assert content[4095:8194] == b"\x22" * 4099
    assert content[8194:8195] == b"\x11"
    assert await read(image, 4090, 10) == b"\x11" * 5 + b"\x22" * 5
    await image.close()


@in_loop
async def test_direct_write_at_unaligned_end_of_file_keeps_its_size(tmp_path):
    path = make_file(tmp_path / "a.raw", 10000, {0: b"x" * 10000})
    image = RawImage(str(path), direct=True)
    await image.write(9000, memoryview(b"y" * 1000))
    assert os.path.getsize(path) == 10000
    assert path.read_bytes()[8999:] == b"x" + b"y" * 1000
    assert await read(image, 9990, 10) == b"y" * 10
    await image.close()


@in_loop
async def test_extents_follow_seek_data_and_seek_hole(tmp_path):
    path = make_file(tmp_path / "a.raw", 8 * MiB, {MiB: b"d" * MiB, 5 * MiB: b"e" * MiB})
    image = RawImage(str(path))
    extents = await image.extents(0, 8 * MiB)
    assert extents == [
        Extent(MiB, HOLE),
        Extent(MiB, ExtentFlags.DATA),
        Extent(3 * MiB, HOLE),
        Extent(MiB, ExtentFlags.DATA),
        Extent(2 * MiB, HOLE),
    ]
    await image.close()


@in_loop
async def test_extents_start_inside_a_range_and_stop_at_its_end(tmp_path):
    path = make_file(tmp_path / "a.raw", 8 * MiB, {MiB: b"d" * MiB})
    image = RawImage(str(path))
    extents = await image.extents(MiB + 4096, MiB)
    assert extents == [Extent(MiB - 4096, ExtentFlags.DATA), Extent(4096, HOLE)]
    await image.close()


@in_loop
async def test_read_only_image_advertises_no_trim_or_zero(tmp_path):
    path = make_file(tmp_path / "a.raw", MiB)
    image = RawImage(str(path), read_only=True)
    caps = image.capabilities
    assert not caps.trim and not caps.zero and not caps.fast_zero
    with pytest.raises(OSError):
        await image.write(0, memoryview(b"x"))
    await image.close()
