"""Images written by qemu-img read identically through the qcow2 driver."""

from __future__ import annotations

from pathlib import Path

import pytest
from image_helpers import qemu_img, qemu_io, qemu_raw, read_all

PATTERN = (
    "write -P 0x11 0 300k",
    "write -P 0x22 1M 4k",
    "write -P 0x33 5000k 1536k",
    "write -z 2M 64k",
)


def make(tmp_path: Path, name: str, opts: str, size: str = "8M", *cmds: str) -> Path:
    path = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, size)
    qemu_io("qcow2", path, *(cmds or PATTERN))
    return path


@pytest.mark.parametrize(
    "opts",
    [
        "compat=0.10",
        "compat=1.1",
        "cluster_size=512",
        "cluster_size=2M",
        "lazy_refcounts=on",
        "extended_l2=on",
        "refcount_bits=1",
        "refcount_bits=64",
        "compat=0.10,cluster_size=4k",
    ],
)
def test_qemu_written_image_reads_identically(tmp_path: Path, opts: str) -> None:
    path = make(tmp_path, "disk.qcow2", opts)
    assert read_all(f"qcow2:{path}") == qemu_raw(path, "qcow2", tmp_path)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_clusters_read_identically(tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "src.raw"
    data = bytearray()
    for i in range(40):
        data += ((b"block %d " % i) * 8192)[:65536]
    data += bytes(range(256)) * 1024  # less compressible tail
    src.write_bytes(bytes(data))
    path = tmp_path / "c.qcow2"
    qemu_img(
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}", src, path
    )
    assert read_all(f"qcow2:{path}") == bytes(data)


def test_three_deep_backing_chain_reads_identically(tmp_path: Path) -> None:
    base = make(tmp_path, "base.qcow2", "compat=1.1", "8M", "write -P 0x01 0 8M")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qemu_io("qcow2", mid, "write -P 0x02 1M 1M", "write -P 0x03 3M 5k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu_io("qcow2", top, "write -P 0x04 1500k 1M", "write -z 6M 128k", "write -P 5 7M 1")
    assert read_all(f"qcow2:{top}") == qemu_raw(top, "qcow2", tmp_path)
    assert base.exists()


def test_zero_clusters_hide_the_backing_file(tmp_path: Path) -> None:
    make(tmp_path, "base.qcow2", "compat=1.1", "4M", "write -P 0x77 0 4M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("qcow2", top, "write -z 1M 1M", "write -z 3M 4k")
    data = read_all(f"qcow2:{top}")
    assert data == qemu_raw(top, "qcow2", tmp_path)
    assert data[1 << 20 : 2 << 20] == bytes(1 << 20)


def test_raw_backing_file_with_shorter_size(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * 1_000_000)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "4M")
    qemu_io("qcow2", top, "write -P 0x01 512k 4k")
    assert read_all(f"qcow2:{top}") == qemu_raw(top, "qcow2", tmp_path)


def test_disk_larger_than_2_tib_is_sparse_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "3T")
    qemu_io("qcow2", path, "write -P 0x42 2500G 64k")
    import asyncio

    from tapdisk.drivers.registry import OpenOptions, open_image

    async def go() -> bytes:
        img = open_image(f"qcow2:{path}", OpenOptions(read_only=True))
        buf = bytearray(128 * 1024)
        await img.read((2500 << 30) - 65536, memoryview(buf))
        await img.close()
        return bytes(buf)

    assert asyncio.run(go()) == bytes(65536) + b"\x42" * 65536
    assert path.stat().st_size < 10 << 20


def test_internal_snapshots_are_listed(tmp_path: Path) -> None:
    path = make(tmp_path, "s.qcow2", "compat=1.1")
    qemu_img("snapshot", "-c", "first", path)
    qemu_io("qcow2", path, "write -P 0x99 0 64k")
    qemu_img("snapshot", "-c", "second", path)
    from tapdisk.drivers.qcow2.image import Qcow2Image
    from tapdisk.drivers.registry import OpenOptions

    img = Qcow2Image(str(path), OpenOptions(read_only=True))
    assert [s.name for s in img.snapshots] == ["first", "second"]
    img.file.close()
    assert read_all(f"qcow2:{path}") == qemu_raw(path, "qcow2", tmp_path)


def test_cached_allocated_read_needs_no_thread(tmp_path: Path) -> None:
    path = make(tmp_path, "fast.qcow2", "compat=1.1")
    import asyncio

    from tapdisk.drivers.registry import OpenOptions, open_image

    async def go() -> tuple[bool, bool, bytes]:
        img = open_image(f"qcow2:{path}", OpenOptions(read_only=True))
        buf = bytearray(4096)
        cold = img.read_nowait(8192, memoryview(buf))  # L2 table not loaded yet
        await img.read(8192, memoryview(buf))
        warm = img.read_nowait(8192, memoryview(buf))
        await img.close()
        return cold, warm, bytes(buf)

    cold, warm, data = asyncio.run(go())
    assert (cold, warm) == (False, True)
    assert data == b"\x11" * 4096


def test_vhd_backing_file_reads_identically(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic", base, "8M")
    qemu_io("vpc", base, "write -P 0x44 0 3M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.vhd", "-F", "vpc", top)
    qemu_io("qcow2", top, "write -P 0x45 1M 4k")
    assert read_all(f"qcow2:{top}") == qemu_raw(top, "qcow2", tmp_path)
