"""Property tests of the sans-IO NBD codec: any split of the byte stream, any option sequence."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapdisk.nbd.errors import ClientAborted, ProtocolError
from tapdisk.nbd.handshake import MAX_OPTION_LENGTH, ExportInfo, Handshake, Negotiated
from tapdisk.nbd.transmission import Request, RequestReader, check_any_request, check_request

REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY = struct.Struct(">QIII")
OPTION_REPLY_MAGIC = 0x0003E889045565A9
WRITE = 1
MAX_PAYLOAD = 1 << 20

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- RequestReader -------------------------------------------------------------------

requests = st.one_of(
    st.tuples(
        st.integers(0, 2**64 - 1),  # cookie
        st.sampled_from([0, 2, 3, 4, 5, 6, 7, 99]),  # every command but WRITE, and junk
        st.integers(0, 2**16 - 1),  # flags
        st.integers(0, 2**64 - 1),  # offset
        st.integers(0, 2**32 - 1),  # length (no payload follows)
        st.none(),
    ),
    st.tuples(
        st.integers(0, 2**64 - 1),
        st.just(WRITE),
        st.integers(0, 2**16 - 1),
        st.integers(0, 2**64 - 1),
        st.none(),
        st.one_of(st.binary(max_size=600), st.just(b"\xab" * 300_000)),  # > header buffer
    ),
)


def encode(request: tuple) -> tuple[bytes, tuple]:
    """Wire bytes of one request, and what the reader should return for it."""
    cookie, command, flags, offset, length, payload = request
    if command == WRITE:
        length = len(payload)
        expected_payload = payload if payload else None
    else:
        payload, expected_payload = b"", None
    wire = REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length) + payload
    return wire, (cookie, command, flags, offset, length, expected_payload)


def feed(reader: RequestReader, stream: bytes, cuts: list[int]) -> list[tuple]:
    """Deliver ``stream`` in pieces ending at ``cuts`` the way the transport does."""
    out = []
    view = memoryview(stream)
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        piece = view[start:end]
        while piece:
            target = reader.get_buffer()
            n = min(len(target), len(piece))
            assert n > 0, "the reader offered no buffer space"
            target[:n] = piece[:n]
            piece = piece[n:]
            for r in reader.buffer_updated(n):
                payload = bytes(r.payload) if r.payload is not None else None
                out.append((r.cookie, r.command, r.flags, r.offset, r.length, payload))
    return out


@PROPERTY
@given(st.lists(requests, max_size=12), st.data())
def test_request_reader_yields_exactly_the_requests_sent_for_any_split(batch, data):
    encoded = [encode(r) for r in batch]
    stream = b"".join(wire for wire, _ in encoded)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=20)))
    cuts = [c for c in cuts if c < len(stream)]
    reader = RequestReader(MAX_PAYLOAD)
    assert feed(reader, stream, cuts) == [expected for _, expected in encoded]
    assert reader.idle


@PROPERTY
@given(st.lists(requests, max_size=4), st.integers(0, 2**32 - 1), st.data())
def test_request_reader_rejects_a_bad_magic_after_valid_requests(batch, magic, data):
    if magic == REQUEST_MAGIC:
        magic += 1
    encoded = [encode(r) for r in batch]
    good = b"".join(wire for wire, _ in encoded)
    stream = good + REQUEST.pack(magic, 0, 0, 1, 0, 512)
    cut = data.draw(st.integers(0, len(stream)))
    reader = RequestReader(MAX_PAYLOAD)
    seen: list[tuple] = []
    with pytest.raises(ProtocolError, match="magic"):
        seen += feed(reader, stream[:cut], [])
        seen += feed(reader, stream[cut:], [])
    assert len(seen) <= len(batch)


@PROPERTY
@given(st.integers(MAX_PAYLOAD + 1, 2**32 - 1))
def test_request_reader_refuses_a_write_over_the_limit_before_its_payload(length):
    reader = RequestReader(MAX_PAYLOAD)
    header = REQUEST.pack(REQUEST_MAGIC, 0, WRITE, 1, 0, length)
    with pytest.raises(ProtocolError, match="exceeds"):
        feed(reader, header, [])


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(st.sampled_from([0, 1]), st.integers(0, 9)),  # mostly READ and WRITE
    st.one_of(st.just(0), st.sampled_from([1, 2, 4, 8, 16, 32, 1 | 4])),  # mostly none
    st.one_of(st.integers(0, 2**22), st.integers(0, 2**64 - 1)),  # offset, mostly in range
    st.one_of(  # length, around the payload limit too
        st.sampled_from([0, 4096, MAX_PAYLOAD, MAX_PAYLOAD + 1]),
        st.integers(0, 2**21),
        st.integers(0, 2**32 - 1),
    ),
    st.integers(0, 0x3FF),  # export flags
    st.integers(0, 2**23),  # export size
    st.booleans(),  # block status negotiated
)
def test_check_request_fast_path_agrees_with_every_rule(
    command, flags, offset, length, export_flags, size, block_status_ok
):
    """check_request answers plain READ and WRITE on its own; it must say what the full
    rule set says, for those and for everything else."""
    request = Request(1, command, flags, offset, length, None)
    args = (request, export_flags, size, MAX_PAYLOAD, block_status_ok)
    assert check_request(*args) == check_any_request(*args)


# -- Handshake -----------------------------------------------------------------------

EXPORTS = {
    "disk": ExportInfo(
        name="disk",
        size=1 << 30,
        flags=1 | 4 | 8,
        description="a disk",
        contexts=("base:allocation", "qemu:dirty-bitmap:cbt"),
    ),
    "ro": ExportInfo(name="ro", size=4096, flags=1 | 2),
}
names = st.sampled_from(["", "disk", "ro", "nope", "d\u00efsk"])


def info_payload(name: str, infos: list[int]) -> bytes:
    raw = name.encode()
    return struct.pack(f">I{len(raw)}sH{len(infos)}H", len(raw), raw, len(infos), *infos)


def meta_payload(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        body += struct.pack(">I", len(query.encode())) + query.encode()
    return body


class _Zeros(bytes):
    """Zero bytes that print short in a falsifying example."""

    def __repr__(self) -> str:
        return f"<{len(self)} zero bytes>"


OVERSIZED = _Zeros(MAX_OPTION_LENGTH + 1)

# (option, payload, export name it selects when it is a well-formed GO or EXPORT_NAME)
options = st.one_of(
    names.flatmap(
        lambda name: st.tuples(
            st.sampled_from([OPT_INFO, OPT_GO]),
            st.lists(st.integers(0, 5), max_size=4).map(lambda infos: info_payload(name, infos)),
            st.just(name),
        )
    ),
    st.tuples(
        st.sampled_from([OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT]),
        st.builds(
            meta_payload,
            names,
            st.lists(
                st.sampled_from(
                    ["base:allocation", "base:", "qemu:", "qemu:dirty-bitmap:cbt", "qemu:x", ""]
                ),
                max_size=3,
            ),
        ),
        st.none(),
    ),
    st.tuples(
        st.sampled_from([OPT_LIST, OPT_STRUCTURED_REPLY, OPT_ABORT]), st.just(b""), st.none()
    ),
    names.map(lambda name: (OPT_EXPORT_NAME, name.encode(), name)),
    # Anything at all: known codes with junk payloads, unknown codes, oversized data.
    # (GO and EXPORT_NAME are left out here: junk can be a valid request for the default.)
    st.tuples(
        st.integers(0, 2**32 - 1).filter(lambda o: o not in (OPT_GO, OPT_EXPORT_NAME)),
        st.binary(max_size=40),
        st.none(),
    ),
    st.tuples(
        st.sampled_from([OPT_LIST, OPT_GO, OPT_EXPORT_NAME, 0xDEAD]),
        st.just(OVERSIZED),
        st.none(),
    ),
)


def parse_replies(output: bytes) -> list[tuple[int, int, bytes]]:
    replies = []
    pos = 0
    while pos < len(output):
        magic, option, kind, length = OPTION_REPLY.unpack_from(output, pos)
        assert magic == OPTION_REPLY_MAGIC
        pos += OPTION_REPLY.size
        replies.append((option, kind, output[pos : pos + length]))
        pos += length
        assert pos <= len(output), "a reply claims more data than was sent"
    return replies


def is_final(kind: int) -> bool:
    return kind == REP_ACK or bool(kind & 0x80000000)


@PROPERTY
@given(
    st.sampled_from([0, 1, 3]),
    st.sampled_from([None, "disk"]),
    st.lists(options, max_size=8),
    st.binary(max_size=40),
    st.data(),
)
def test_handshake_answers_every_option_with_a_final_reply(
    client_flags, default, sequence, trailing, data
):
    handshake = Handshake(EXPORTS, default)
    greeting = handshake.take_output()
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    assert handshake.receive(struct.pack(">I", client_flags)) is None
    for option, payload, name in sequence:
        # Bytes after a GO or EXPORT_NAME that selects an export belong to transmission.
        selects = name is not None and (name in EXPORTS or (name == "" and default is not None))
        extra = trailing if selects and option in (OPT_GO, OPT_EXPORT_NAME) else b""
        wire = struct.pack(">QII", IHAVEOPT, option, len(payload)) + payload + extra
        cut = data.draw(st.integers(0, len(wire)))
        try:
            result = handshake.receive(wire[:cut])
            rest = wire[cut:]
            if result is None:
                result = handshake.receive(rest)
                rest = b""
        except ClientAborted:
            assert option == OPT_ABORT
            assert parse_replies(handshake.take_output()) == [(OPT_ABORT, REP_ACK, b"")]
            return
        except ProtocolError:
            assert option == OPT_EXPORT_NAME and not selects  # it cannot report errors
            return
        output = handshake.take_output()
        if isinstance(result, Negotiated):
            assert selects and option in (OPT_GO, OPT_EXPORT_NAME)
            assert handshake.leftover + rest == extra
            assert result.export.name == (name or default)
            if option == OPT_EXPORT_NAME:
                padding = 0 if client_flags & 2 else 124
                assert len(output) == 10 + padding
                assert struct.unpack(">Q", output[:8])[0] == result.export.size
            else:
                replies = parse_replies(output)
                assert replies[-1] == (OPT_GO, REP_ACK, b"")
            return
        assert result is None
        assert option != OPT_EXPORT_NAME, "EXPORT_NAME has no way to carry an option reply"
        replies = parse_replies(output)
        assert replies, f"option {option} got no reply"
        assert all(answered == option for answered, _, _ in replies)
        assert is_final(replies[-1][1])
        assert all(kind in (REP_SERVER, REP_INFO, REP_META_CONTEXT) for _, kind, _ in replies[:-1])


@PROPERTY
@given(st.integers(0, 2**32 - 1).filter(lambda flags: flags & ~3))
def test_handshake_refuses_client_flags_with_unknown_bits(client_flags):
    handshake = Handshake(EXPORTS, "disk")
    with pytest.raises(ProtocolError, match="client flags"):
        handshake.receive(struct.pack(">I", client_flags))
