"""Structured reads of all-zero ranges are answered with OFFSET_HOLE chunks."""

from __future__ import annotations

import nbd
from helpers import require, run


def read_chunk_types(uri: str, offset: int, length: int) -> tuple[bytes, list[int]]:
    h = nbd.NBD()
    h.connect_uri(uri)
    types: list[int] = []

    def chunk(subbuf, chunk_offset, status, error):  # libnbd's chunk callback signature
        types.append(status)
        return 0

    try:
        data = h.pread_structured(length, offset, chunk)
    finally:
        h.shutdown()
    return data, types


def test_zero_range_is_sent_as_a_hole(serve, raw_image):
    image = raw_image("8M", "write -P 0x77 1M 64k")
    served = serve(f"raw:{image}")
    data, types = read_chunk_types(served.uri(), 4 << 20, 1 << 20)
    assert data == bytes(1 << 20)
    assert types == [nbd.READ_HOLE]


def test_data_range_is_sent_as_data(serve, raw_image):
    image = raw_image("8M", "write -P 0x77 1M 64k")
    served = serve(f"raw:{image}")
    data, types = read_chunk_types(served.uri(), 1 << 20, 65536)
    assert data == b"\x77" * 65536
    assert types == [nbd.READ_DATA]


def test_written_zeros_read_back_as_zeros_through_qemu_io(serve, raw_image):
    image = raw_image("8M", "write -P 0x00 0 1M", "write -P 0x01 1M 1M")
    served = serve(f"raw:{image}")
    out = run(
        require("qemu-io"),
        "-f",
        "raw",
        "-c",
        "read -P 0 0 1M",
        "-c",
        "read -P 1 1M 1M",
        served.uri(),
    )
    assert "Pattern verification failed" not in out
