"""QCOW v1 through the ``qcow:`` driver, with qemu-img as the oracle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Served, run
from image_helpers import compare_fmt, qemu_img, qemu_io, qemu_raw, read_all, workload
from tapdisk.drivers.base import ImageError
from tapdisk.drivers.registry import OpenOptions, open_image

M = 1 << 20


def test_qemu_written_qcow_reads_identically(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow"
    qemu_img("create", "-q", "-f", "qcow", path, "8M")
    qemu_io("qcow", path, "write -P 1 0 300k", "write -P 2 5M 4097", "write -z 7M 64k")
    assert read_all(f"qcow:{path}") == qemu_raw(path, "qcow", tmp_path)


def compressed_qcow(path: Path, clusters: int) -> None:
    """A qcow image (4 KiB clusters) whose first ``clusters`` clusters are compressed."""
    qemu_img("create", "-q", "-f", "qcow", path, "4M")
    cmds = [f"write -c -P {i % 200 + 1} {i * 4096} 4k" for i in range(clusters)]
    qemu_io("qcow", path, *cmds)


def test_compressed_qcow_reads_identically(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow"
    compressed_qcow(path, 100)
    assert path.stat().st_size < 100 * 4096
    assert read_all(f"qcow:{path}") == qemu_raw(path, "qcow", tmp_path)


def test_qcow_backing_file_reads_identically(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io("qcow2", base, "write -P 7 0 4M")
    top = tmp_path / "top.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("qcow", top, "write -P 8 1M 3k")
    assert read_all(f"qcow:{top}") == qemu_raw(top, "qcow", tmp_path)


@pytest.mark.parametrize("with_backing", [False, True])
def test_writes_through_tapdisk_match_qemu(
    tmp_path: Path, serve: Callable[..., Served], with_backing: bool
) -> None:
    path = tmp_path / "w.qcow"
    ref = bytearray(16 * M)
    if with_backing:
        base = tmp_path / "base.raw"
        base.write_bytes(b"\x33" * (16 * M))
        ref[:] = base.read_bytes()
        qemu_img("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", path)
    else:
        qemu_img("create", "-q", "-f", "qcow", path, "16M")
    srv = serve(f"qcow:{path}")
    workload(srv.uri(), ref, seed=11, ops=80)
    assert srv.stop() == 0
    compare_fmt(path, "qcow", bytes(ref), tmp_path)


def test_write_into_compressed_cluster_reallocates(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "c.qcow"
    compressed_qcow(path, 4)
    expect = bytearray(qemu_raw(path, "qcow", tmp_path))

    async def go() -> None:
        img = open_image(f"qcow:{path}", OpenOptions())
        await img.write(1000, memoryview(b"\x55" * 100))
        await img.close()

    asyncio.run(go())
    expect[1000:1100] = b"\x55" * 100
    compare_fmt(path, "qcow", bytes(expect), tmp_path)


def test_qcow_bad_cluster_bits_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.qcow"
    qemu_img("create", "-q", "-f", "qcow", path, "1M")
    raw = bytearray(path.read_bytes())
    raw[32] = 30
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="cluster_bits"):
        open_image(f"qcow:{path}", OpenOptions(read_only=True))


def test_tapimg_created_qcow_is_read_by_qemu(tmp_path: Path) -> None:
    from tapdisk.drivers.imageops import create_image

    path = tmp_path / "new.qcow"
    create_image("qcow", str(path), 8 * M)
    qemu_io("qcow", path, "write -P 3 1M 1M")
    assert '"format": "qcow"' in run("qemu-img", "info", "--output=json", path)
    assert read_all(f"qcow:{path}")[M : 2 * M] == b"\x03" * M
