"""Writes through ``tapdisk serve qcow2:...`` keep the image consistent for qemu-img."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from helpers import Served, run
from image_helpers import compare_fmt, qemu_img, qemu_io, workload
from tapdisk.drivers.registry import OpenOptions, open_image

K = 1024
M = 1024 * K


def check_clean(path: Path) -> None:
    out = run("qemu-img", "check", "-f", "qcow2", path)
    assert "No errors were found" in out, out


def compare(path: Path, ref: bytes, tmp: Path) -> None:
    compare_fmt(path, "qcow2", ref, tmp)


@pytest.mark.parametrize(
    "opts",
    ["compat=1.1", "compat=0.10", "cluster_size=4k,refcount_bits=1", "cluster_size=2M"],
)
def test_random_workload_leaves_image_consistent(
    tmp_path: Path, serve: Callable[..., Served], opts: str
) -> None:
    path = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, "32M")
    ref = bytearray(32 * M)
    srv = serve(f"qcow2:{path}")
    workload(srv.uri(), ref, seed=1, ops=150)
    assert srv.stop() == 0
    check_clean(path)
    compare(path, bytes(ref), tmp_path)


def test_workload_over_backing_file_matches_qemu(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_io("qcow2", base, "write -P 0x5a 0 16M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    ref = bytearray(b"\x5a" * (16 * M))
    srv = serve(f"qcow2:{top}")
    workload(srv.uri(), ref, seed=2, ops=120)
    assert srv.stop() == 0
    check_clean(top)
    compare(top, bytes(ref), tmp_path)


def test_writes_into_compressed_clusters_reallocate(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    src = tmp_path / "src.raw"
    data = bytearray(b"compressible " * (8 * M // 13 + 1))[: 8 * M]
    src.write_bytes(bytes(data))
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", src, path)
    srv = serve(f"qcow2:{path}")
    workload(srv.uri(), data, seed=3, ops=60)
    assert srv.stop() == 0
    out = run("qemu-img", "check", "-f", "qcow2", path, check=False)
    assert "ERROR" not in out and "Leaked" not in out, out
    compare(path, bytes(data), tmp_path)


def test_internal_snapshot_survives_writes(tmp_path: Path, serve: Callable[..., Served]) -> None:
    path = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io("qcow2", path, "write -P 0x31 0 8M")
    qemu_img("snapshot", "-c", "before", path)
    ref = bytearray(b"\x31" * (8 * M))
    srv = serve(f"qcow2:{path}")
    workload(srv.uri(), ref, seed=4, ops=40)
    assert srv.stop() == 0
    check_clean(path)
    compare(path, bytes(ref), tmp_path)
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=before", "-O", "raw", path, snap)
    assert snap.read_bytes() == b"\x31" * (8 * M)


def test_refcount_table_grows(tmp_path: Path, serve: Callable[..., Served]) -> None:
    path = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "24M")
    ref = bytearray(24 * M)
    srv = serve(f"qcow2:{path}")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    for off in range(0, 24 * M, M):
        block = bytes([off // M + 1]) * M
        h.pwrite(block, off)
        ref[off : off + M] = block
    h.flush()
    h.shutdown()
    assert srv.stop() == 0
    check_clean(path)
    compare(path, bytes(ref), tmp_path)
    header = path.read_bytes()[:64]
    assert int.from_bytes(header[56:60], "big") > 1  # refcount_table_clusters grew


def test_discard_frees_clusters(tmp_path: Path, serve: Callable[..., Served]) -> None:
    path = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    qemu_io("qcow2", path, "write -P 1 0 16M")
    srv = serve(f"qcow2:{path}")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    h.trim(8 * M, 4 * M)
    h.flush()
    h.shutdown()
    assert srv.stop() == 0
    check_clean(path)
    out = run("qemu-img", "check", "-f", "qcow2", path)
    assert "128/256" in out, out  # 64 KiB clusters: 8 MiB of 16 MiB still allocated


def test_write_zeroes_sets_zero_flag(tmp_path: Path, serve: Callable[..., Served]) -> None:
    path = tmp_path / "z.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io("qcow2", path, "write -P 1 0 4M")
    srv = serve(f"qcow2:{path}")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    h.zero(2 * M, M)
    h.flush()
    h.shutdown()
    assert srv.stop() == 0
    check_clean(path)
    mapping = qemu_img("map", "--output=json", path)
    assert '"start": 1048576, "length": 2097152, "depth": 0, "present": true, "zero": true' in (
        mapping
    ), mapping


def test_extended_l2_workload_over_backing_matches_qemu(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x21" * (16 * M))
    top = tmp_path / "x.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=64k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top,
    )
    qemu_io("qcow2", top, "write -P 0x31 100k 3k", "write -z 1M 16k")
    ref = bytearray(base.read_bytes())
    ref[100 * K : 103 * K] = b"\x31" * (3 * K)
    ref[M : M + 16 * K] = bytes(16 * K)
    srv = serve(f"qcow2:{top}")
    workload(srv.uri(), ref, seed=5, ops=100)
    assert srv.stop() == 0
    check_clean(top)
    compare(top, bytes(ref), tmp_path)


def test_writes_beyond_2_tib_stay_sparse(tmp_path: Path, serve: Callable[..., Served]) -> None:
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4T")
    srv = serve(f"qcow2:{path}")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    far = (3 << 40) + 12345
    h.pwrite(b"far away" * 512, far)
    h.zero(1 << 30, 2 << 40)
    h.flush()
    h.shutdown()
    assert srv.stop() == 0
    check_clean(path)
    got = qemu_io("qcow2", path, f"read -v {far} 8")
    assert "66 61 72 20 61 77 61 79" in got, got
    assert path.stat().st_size < 16 << 20


def test_many_requests_in_flight_stay_consistent(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x17" * (8 * M))
    top = tmp_path / "top.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", "-b", "base.raw", "-F", "raw", top
    )
    srv = serve(f"qcow2:{top}")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    rng = random.Random(9)
    ref = bytearray(base.read_bytes())
    buffers = []
    # Up to 32 writes in flight, each inside its own 64 KiB stripe (so none overlap), partial
    # clusters sharing L2 tables; the second pass overwrites clusters allocated by the first.
    for _ in range(2):
        for stripe in range(0, 8 * M, 64 * K):
            off = stripe + rng.randrange(0, 32 * K)
            data = rng.randbytes(rng.randrange(1, 32 * K))
            ref[off : off + len(data)] = data
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            buffers.append(buf)
            h.aio_pwrite(buf, off)
            while h.aio_in_flight() >= 32:
                h.poll(-1)
        while h.aio_in_flight():
            h.poll(-1)
    h.flush()
    assert h.pread(8 * M, 0) == bytes(ref)
    h.shutdown()
    assert srv.stop() == 0
    check_clean(top)
    compare(top, bytes(ref), tmp_path)


def test_overwrite_of_an_owned_cluster_is_written_inline(tmp_path: Path) -> None:
    """An overwrite inside a cluster the image owns, with its L2 table cached, changes no
    metadata: write_nowait does it at once.  A write that allocates is refused."""
    path = tmp_path / "inline.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io("qcow2", path, "write -P 6 0 64k")

    async def go() -> bytes:
        img = open_image(f"qcow2:{path}", OpenOptions())
        try:
            buf = bytearray(16384)
            assert not img.write_nowait(4096, memoryview(b"\x07" * 4096))  # L2 not cached
            await img.read(0, memoryview(buf))
            assert img.write_nowait(4096, memoryview(b"\x07" * 4096))
            assert not img.write_nowait(1 << 20, memoryview(b"\x08" * 4096))  # unallocated
            await img.read(0, memoryview(buf))
            return bytes(buf)
        finally:
            await img.close()

    assert asyncio.run(go()) == b"\x06" * 4096 + b"\x07" * 4096 + b"\x06" * 8192
    run("qemu-img", "check", "-q", "-f", "qcow2", path)
