"""The request reader's buffers follow the traffic: none when idle, a payload's only on demand."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapdisk.nbd.transmission import (
    HEADER_BUFFER_SIZE,
    LARGE_PAYLOAD,
    SMALL_BUFFER_SIZE,
    RequestReader,
)

REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
READ, WRITE = 0, 1
MAX_PAYLOAD = 1 << 20


def request(command: int, cookie: int, length: int, payload: bytes = b"") -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, 0, command, cookie, 0, length) + payload


def receive(reader: RequestReader, data: bytes) -> list[tuple[int, bytes | None]]:
    """Deliver ``data`` the way the transport does: (cookie, payload) of each request."""
    out = []
    view = memoryview(data)
    while view:
        target = reader.get_buffer()
        n = min(len(target), len(view))
        target[:n] = view[:n]
        view = view[n:]
        for r in reader.buffer_updated(n):
            out.append((r.cookie, bytes(r.payload) if r.payload is not None else None))
    return out


def test_a_new_reader_holds_no_buffer_until_bytes_arrive():
    reader = RequestReader(MAX_PAYLOAD)
    assert reader.buffer_size == 0
    assert receive(reader, request(READ, 1, 512)) == [(1, None)]
    assert reader.buffer_size == SMALL_BUFFER_SIZE


def test_a_receive_that_fills_the_buffer_grows_it():
    reader = RequestReader(MAX_PAYLOAD)
    burst = b"".join(request(READ, i, 512) for i in range(SMALL_BUFFER_SIZE // REQUEST.size + 1))
    receive(reader, burst)
    assert reader.buffer_size == HEADER_BUFFER_SIZE


def test_a_receive_that_fills_the_buffer_inside_a_payload_grows_it_too():
    reader = RequestReader(MAX_PAYLOAD)
    writes = b"".join(request(WRITE, i, 4096, bytes(4096)) for i in range(5))  # > 16 KiB
    assert [cookie for cookie, _ in receive(reader, writes)] == list(range(5))
    assert reader.buffer_size == HEADER_BUFFER_SIZE


def test_the_buffer_is_released_after_a_sweep_without_receives():
    reader = RequestReader(MAX_PAYLOAD)
    receive(reader, request(READ, 1, 512))
    assert reader.release_if_idle() == 0  # received since the last sweep
    assert reader.release_if_idle() == SMALL_BUFFER_SIZE
    assert reader.buffer_size == 0
    assert receive(reader, request(READ, 2, 512)) == [(2, None)]


def test_a_partly_received_request_keeps_its_buffer():
    reader = RequestReader(MAX_PAYLOAD)
    header = request(READ, 1, 512)
    receive(reader, header[:10])
    reader.release_if_idle()
    assert reader.release_if_idle() == 0
    assert receive(reader, header[10:]) == [(1, None)]


def test_a_payload_buffer_is_allocated_only_when_asked_for():
    reader = RequestReader(MAX_PAYLOAD)
    size = 64 * 1024
    data = request(WRITE, 7, size, b"\x01" * size)
    target = reader.get_buffer()
    target[:100] = data[:100]
    assert reader.buffer_updated(100) == []
    assert reader.payload_bytes == size  # what the caller must make room for
    assert reader.release_if_idle() == 0  # (received since the last sweep)
    assert reader.release_if_idle() == 0  # a request is partly here
    assert receive(reader, data[100:]) == [(7, b"\x01" * size)]
    assert reader.payload_bytes == 0


def test_after_a_large_payload_the_next_one_goes_whole_into_its_own_buffer():
    """The receive after a large write takes one header, so the next large write's payload
    is received straight into its buffer: none of it lands in (and is copied out of) the
    receive buffer."""
    reader = RequestReader(MAX_PAYLOAD)
    size = LARGE_PAYLOAD
    first = request(WRITE, 1, size, b"\x01" * size)
    assert receive(reader, first) == [(1, b"\x01" * size)]
    window = reader.get_buffer()
    assert len(window) == REQUEST.size
    window[:] = request(WRITE, 2, size)
    assert reader.buffer_updated(REQUEST.size) == []
    target = reader.get_buffer()
    assert len(target) == size  # the whole payload, from its first byte
    target[:] = b"\x02" * size
    (second,) = reader.buffer_updated(size)
    assert (second.cookie, bytes(second.payload)) == (2, b"\x02" * size)
    # A small request after it: one header taken alone, then the whole buffer again.
    assert receive(reader, request(READ, 3, 512) + request(READ, 4, 512)) == [(3, None), (4, None)]
    assert len(reader.get_buffer()) > REQUEST.size


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.one_of(st.integers(0, 70_000), st.integers(LARGE_PAYLOAD - 1, 300_000)),
        ),
        min_size=1,
        max_size=8,
    ),
    st.lists(st.integers(1, 200_000), max_size=12),
)
def test_releasing_between_any_receives_changes_no_request(batch, cuts):
    wires, expected = [], []
    for cookie, (is_write, length) in enumerate(batch):
        payload = bytes([cookie % 251 + 1]) * length if is_write else b""
        wires.append(request(WRITE if is_write else READ, cookie, length, payload))
        expected.append((cookie, payload if is_write and length else None))
    stream = b"".join(wires)
    bounds = sorted({c for c in cuts if c < len(stream)})
    reader = RequestReader(MAX_PAYLOAD)
    got = []
    for start, end in zip([0, *bounds], [*bounds, len(stream)], strict=True):
        got += receive(reader, stream[start:end])
        reader.release_if_idle()
        reader.release_if_idle()
    assert got == expected
    assert reader.idle
