"""Edge cases and concurrency through libnbd's Python binding against tapdisk serve."""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

MiB = 1 << 20


def connect(uri: str, *, structured: bool = True, strict: bool = True) -> nbd.NBD:
    """A libnbd handle on ``uri`` with base:allocation requested."""
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_request_structured_replies(structured)
    if not strict:
        h.set_strict_mode(0)  # let requests libnbd would refuse reach the server
    h.connect_uri(uri)
    return h


def wait_all(h: nbd.NBD) -> None:
    while h.aio_in_flight() > 0:
        h.poll(-1)


def make_image(path: Path, size: int, fill: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * (size // len(fill)))
    return path


@pytest.fixture
def served_image(serve, tmp_path) -> Callable[..., tuple[str, Path]]:
    """Factory: serve a fresh image; returns (URI, path)."""

    def factory(size: int = 16 * MiB, *args: str, fill: bytes | None = None) -> tuple[str, Path]:
        image = make_image(tmp_path / "disk.raw", size, fill)
        return serve(f"raw:{image}", *args).uri(), image

    return factory


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as name:
        yield Path(name)


def test_many_requests_in_flight_complete_with_the_right_data(served_image):
    uri, image = served_image(16 * MiB)
    h = connect(uri)
    rng = random.Random(7)
    blocks = {i * 65536: rng.randbytes(rng.randrange(1, 65537)) for i in range(128)}
    buffers = []
    for offset, data in blocks.items():
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        buffers.append(buf)
        h.aio_pwrite(buf, offset)
    assert h.aio_in_flight() >= 64
    wait_all(h)
    reads = {offset: nbd.Buffer(len(data)) for offset, data in blocks.items()}
    for offset, buf in reads.items():
        h.aio_pread(buf, offset)
    assert h.aio_in_flight() >= 64
    wait_all(h)
    for offset, data in blocks.items():
        assert reads[offset].to_bytearray() == data, offset
    content = image.read_bytes()
    assert all(content[o : o + len(d)] == d for o, d in blocks.items())
    h.shutdown()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_small_writes_that_wait_keep_their_own_data(serve, tmp_path, fmt):
    """Small writes arrive inside the receive buffer and are lent from it.  The ones that
    wait (FUA writes, and on a new qcow2 image every write, which allocates first) run in
    tasks, and past 256 in flight they queue: they must not see that buffer reused."""
    image = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "16M"], check=True)
    h = connect(serve(f"{fmt}:{image}").uri())
    rng = random.Random(11)
    blocks = {i * 4096: rng.randbytes(4096) for i in range(600)}
    buffers = []
    for index, (offset, data) in enumerate(blocks.items()):
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        buffers.append(buf)
        h.aio_pwrite(buf, offset, flags=nbd.CMD_FLAG_FUA if index % 3 else 0)
    wait_all(h)
    h.shutdown()
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, flat], check=True)
    content = flat.read_bytes()
    wrong = [o for o, d in blocks.items() if content[o : o + 4096] != d]
    assert not wrong, f"{len(wrong)} of {len(blocks)} blocks hold other data, first at {wrong[0]}"


def test_replies_come_back_in_completion_order_not_request_order(served_image):
    uri, _ = served_image(16 * MiB, fill=b"\x5a")
    h = connect(uri)
    order: list[str] = []

    def done(tag: str) -> Callable[[object], int]:
        def callback(error: object) -> int:
            order.append(tag)
            return 1

        return callback

    # A large FUA write goes through a thread and fdatasync; small cached reads
    # are answered at once, so they overtake it.
    big = nbd.Buffer.from_bytearray(bytearray(b"\x01" * 4 * MiB))
    h.aio_pwrite(big, 8 * MiB, completion=done("write"), flags=nbd.CMD_FLAG_FUA)
    small = [nbd.Buffer(4096) for _ in range(64)]
    for i, buf in enumerate(small):
        h.aio_pread(buf, i * 4096, completion=done(f"read{i}"))
    wait_all(h)
    assert len(order) == 65
    assert order[0] != "write"
    assert all(buf.to_bytearray() == b"\x5a" * 4096 for buf in small)
    h.shutdown()


def test_simple_replies_when_structured_replies_are_declined(served_image):
    uri, _ = served_image(MiB, fill=b"\x42")
    h = connect(uri, structured=False, strict=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    assert h.pread(4096, 4096) == b"\x42" * 4096
    h.pwrite(b"\x43" * 512, 0)
    assert h.pread(1024, 0) == b"\x43" * 512 + b"\x42" * 512
    with pytest.raises(nbd.Error) as info:
        h.pread(512, MiB)  # past the end: a simple error reply, no data follows
    assert info.value.errno == "EINVAL"
    assert h.pread(4, MiB - 4) == b"\x42" * 4
    h.shutdown()


def test_structured_read_error_keeps_the_connection(served_image):
    uri, _ = served_image(MiB, fill=b"\x42")
    h = connect(uri, strict=False)
    assert h.get_structured_replies_negotiated()
    with pytest.raises(nbd.Error) as info:
        h.pread(4096, MiB - 2048)
    assert info.value.errno == "EINVAL"
    assert h.pread(2048, MiB - 2048) == b"\x42" * 2048
    h.shutdown()


def test_block_status_req_one_returns_one_extent_within_the_request(serve, tmp_path):
    image = tmp_path / "sparse.raw"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(2 * MiB)
        f.write(b"d" * MiB)
    h = connect(serve(f"raw:{image}").uri())
    seen: list[list[int]] = []

    def extent(context: str, offset: int, entries: list[int], error: object) -> int:
        assert context == nbd.CONTEXT_BASE_ALLOCATION
        seen.append(entries)
        return 0

    h.block_status(8 * MiB, 0, extent, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [[2 * MiB, nbd.STATE_HOLE | nbd.STATE_ZERO]]
    seen.clear()
    h.block_status(512 * 1024, 2 * MiB, extent, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [[512 * 1024, 0]]
    seen.clear()
    h.block_status(8 * MiB, 0, extent)
    entries = seen[0]
    assert entries[:6] == [2 * MiB, 3, MiB, 0, 5 * MiB, 3]
    h.shutdown()


def test_fua_write_is_on_disk_when_acknowledged(served_image):
    uri, image = served_image(MiB)
    h = connect(uri)
    assert h.can_fua()
    h.pwrite(b"fua!" * 1024, 8192, nbd.CMD_FLAG_FUA)
    with open(image, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"fua!" * 1024
    h.shutdown()


def test_fast_zero_succeeds_where_zeroing_is_cheap(served_image):
    uri, image = served_image(4 * MiB, fill=b"\x99")
    h = connect(uri)
    assert h.can_fast_zero()
    h.zero(MiB, MiB, nbd.CMD_FLAG_FAST_ZERO)
    h.zero(MiB, 2 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(2 * MiB, MiB) == bytes(2 * MiB)
    assert h.pread(1, MiB - 1) == b"\x99"
    h.shutdown()
    assert image.read_bytes()[MiB : 3 * MiB] == bytes(2 * MiB)


def test_fast_zero_fails_with_enotsup_where_it_would_write_zeros(serve, shm_dir):
    image = make_image(shm_dir / "disk.raw", 2 * MiB, b"\x99")
    h = connect(serve(f"raw:{image}").uri())
    with pytest.raises(nbd.Error) as info:
        h.zero(MiB, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert info.value.errno == "ENOTSUP"
    assert h.pread(MiB, 0) == b"\x99" * MiB
    h.zero(MiB, 0, nbd.CMD_FLAG_NO_HOLE)  # without FAST_ZERO it falls back
    assert h.pread(MiB, 0) == bytes(MiB)
    h.shutdown()


def test_df_read_arrives_in_one_chunk(served_image):
    uri, _ = served_image(MiB, fill=b"\x17")
    h = connect(uri)
    assert h.can_df()
    chunks: list[tuple[int, int, int]] = []

    def chunk(data: bytes, offset: int, status: int, error: object) -> int:
        chunks.append((len(data), offset, status))
        return 0

    buf = h.pread_structured(65536, 4096, chunk, nbd.CMD_FLAG_DF)
    assert buf == b"\x17" * 65536
    assert chunks == [(65536, 4096, nbd.READ_DATA)]
    h.shutdown()


def test_zero_length_requests_succeed_and_keep_the_connection(served_image):
    uri, _ = served_image(MiB, fill=b"\x01")
    h = connect(uri, strict=False)
    assert h.pread(0, 0) == b""
    h.pwrite(b"", 4096)
    h.trim(0, 4096)
    h.zero(0, 4096)
    h.cache(0, 4096)
    assert h.pread(4, 0) == b"\x01" * 4
    h.shutdown()


def test_multi_conn_flush_on_one_connection_covers_writes_on_another(served_image):
    uri, image = served_image(4 * MiB)
    writer, flusher, reader = connect(uri), connect(uri), connect(uri)
    assert writer.can_multi_conn()
    data = os.urandom(MiB)
    writer.pwrite(data, MiB)
    flusher.flush()
    assert reader.pread(MiB, MiB) == data
    assert image.read_bytes()[MiB : 2 * MiB] == data
    for h in (writer, flusher, reader):
        h.shutdown()


def test_cache_request_succeeds(served_image):
    uri, _ = served_image(4 * MiB, fill=b"\x33")
    h = connect(uri)
    assert h.can_cache()
    h.cache(2 * MiB, 0)
    assert h.pread(4096, MiB) == b"\x33" * 4096
    h.shutdown()


def test_read_only_export_refuses_writes_with_eperm(served_image):
    uri, image = served_image(MiB, "--read-only", fill=b"\x61")
    h = connect(uri, strict=False)
    assert h.is_read_only()
    for request in (
        lambda: h.pwrite(b"x" * 4096, 0),
        lambda: h.trim(4096, 0),
        lambda: h.zero(4096, 0),
    ):
        with pytest.raises(nbd.Error) as info:
            request()
        assert info.value.errno == "EPERM"
    assert h.pread(4096, 0) == b"\x61" * 4096
    assert image.read_bytes() == b"\x61" * MiB
    h.shutdown()


def test_structured_read_of_zeros_arrives_as_a_hole_chunk(served_image):
    uri, _ = served_image(4 * MiB)  # sparse: all zeros
    h = connect(uri)
    h.pwrite(b"\x01" * 4096, MiB)
    chunks: list[tuple[int, int, int]] = []

    def chunk(data: bytes, offset: int, status: int, error: object) -> int:
        chunks.append((len(data), offset, status))
        return 0

    assert h.pread_structured(65536, 0, chunk) == bytes(65536)
    assert chunks == [(65536, 0, nbd.READ_HOLE)]
    chunks.clear()
    assert h.pread_structured(4096, MiB, chunk) == b"\x01" * 4096
    assert chunks == [(4096, MiB, nbd.READ_DATA)]
    h.shutdown()


def test_largest_advertised_request_succeeds(served_image):
    uri, image = served_image(64 * MiB)
    h = connect(uri)
    largest = h.get_block_size(nbd.SIZE_MAXIMUM)
    assert largest == 32 * MiB
    data = os.urandom(1024) * (largest // 1024)
    h.pwrite(data, 16 * MiB)
    assert h.pread(largest, 16 * MiB) == data
    h.shutdown()
    with open(image, "rb") as f:
        f.seek(16 * MiB)
        assert f.read(largest) == data
