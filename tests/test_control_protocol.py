"""The control protocol, sans-IO: framing, validation, and the byte stream in any pieces."""

from __future__ import annotations

import contextlib
import errno
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapdisk.ctl.protocol import (
    MAX_MESSAGE,
    OPS,
    ControlProtocolError,
    Decoder,
    Request,
    Response,
    encode,
    parse_request,
    parse_response,
)


def test_request_round_trips_through_encode_and_decode():
    request = Request(7, "open", {"spec": "raw:/x.img", "read_only": True, "timeout": 5})
    [message] = Decoder().feed(encode(request))
    assert parse_request(message) == request


def test_frame_is_big_endian_length_then_json():
    data = encode(Response.success(1, {"pid": 42}))
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert json.loads(data[4:]) == {"id": 1, "ok": True, "result": {"pid": 42}}


@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20), st.data())
def test_decoder_reassembles_messages_split_anywhere(cut_sizes, data):
    messages = [
        Request(i, "unpause", {"minor": i, "spec": "qcow2:/p" * i}).to_message() for i in range(5)
    ]
    stream = b"".join(encode(m) for m in messages)
    decoder = Decoder()
    out = []
    pos = 0
    while pos < len(stream):
        n = data.draw(st.sampled_from(cut_sizes))
        out += decoder.feed(stream[pos : pos + n])
        pos += n
    assert out == messages
    assert decoder.pending == 0


def test_decoder_holds_back_an_incomplete_message():
    data = encode(Request(1, "pid"))
    decoder = Decoder()
    assert decoder.feed(data[:-1]) == []
    assert decoder.pending == len(data) - 1
    assert decoder.feed(data[-1:]) == [{"id": 1, "op": "pid", "args": {}}]


def test_oversized_length_prefix_is_refused_before_buffering():
    with pytest.raises(ControlProtocolError, match="length prefix"):
        Decoder().feed(struct.pack(">I", MAX_MESSAGE + 1))


def test_body_that_is_not_json_is_refused():
    with pytest.raises(ControlProtocolError, match="not JSON"):
        Decoder().feed(struct.pack(">I", 3) + b"{x}")


def test_body_that_is_not_an_object_is_refused():
    with pytest.raises(ControlProtocolError, match="not an object"):
        Decoder().feed(struct.pack(">I", 2) + b"[]")


def test_unknown_op_is_refused_naming_it():
    with pytest.raises(ControlProtocolError, match="'format_disk'"):
        parse_request({"id": 1, "op": "format_disk"})


def test_missing_required_argument_is_refused_naming_it():
    with pytest.raises(ControlProtocolError, match="missing argument 'minor'"):
        parse_request({"id": 1, "op": "pause", "args": {}})


def test_unknown_argument_is_refused():
    with pytest.raises(ControlProtocolError, match="unknown argument 'force'"):
        parse_request({"id": 1, "op": "close", "args": {"minor": 0, "force": True}})


def test_argument_of_wrong_type_is_refused():
    with pytest.raises(ControlProtocolError, match="'minor' must be int"):
        parse_request({"id": 1, "op": "close", "args": {"minor": "0"}})


def test_bool_is_not_accepted_as_an_integer():
    with pytest.raises(ControlProtocolError, match="'minor' must be int"):
        parse_request({"id": 1, "op": "close", "args": {"minor": True}})


def test_non_integer_id_is_refused():
    with pytest.raises(ControlProtocolError, match="'id'"):
        parse_request({"id": "1", "op": "pid"})


def test_every_op_accepts_its_required_arguments():
    samples = {int: 1, str: "raw:/x", bool: True, float: 1.5}
    for op, schema in OPS.items():
        args = {name: samples[types[0]] for name, (types, required) in schema.items() if required}
        assert parse_request({"id": 1, "op": op, "args": args}).op == op


def test_failure_response_round_trips():
    response = Response.failure(3, "state", "vbd 0 is not paused")
    [message] = Decoder().feed(encode(response))
    assert parse_response(message) == response


def test_an_os_failure_carries_its_errno_on_the_wire():
    response = Response.failure(4, "os", "no medium", errno.ENOMEDIUM)
    [message] = Decoder().feed(encode(response))
    assert message["error"] == {"kind": "os", "message": "no medium", "errno": errno.ENOMEDIUM}
    assert parse_response(message).errno == errno.ENOMEDIUM
    with pytest.raises(ControlProtocolError, match="bad errno"):
        parse_response({"id": 1, "ok": False, "error": {**message["error"], "errno": "123"}})


def test_failure_with_unknown_kind_cannot_be_built():
    with pytest.raises(ValueError):
        Response.failure(1, "oops", "x")


def test_response_with_bad_error_object_is_refused():
    with pytest.raises(ControlProtocolError, match="bad error object"):
        parse_response({"id": 1, "ok": False, "error": {"kind": "nope", "message": "x"}})


@settings(deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_errors(data):
    with contextlib.suppress(ControlProtocolError):
        for message in Decoder().feed(data):
            parse_request(message)


@settings(deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "op", "args"]),
        st.one_of(
            st.integers(),
            st.text(max_size=8),
            st.none(),
            st.booleans(),
            st.dictionaries(
                st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=4)), max_size=3
            ),
        ),
    )
)
def test_arbitrary_json_objects_raise_only_protocol_errors(message):
    with contextlib.suppress(ControlProtocolError):
        parse_request(message)


@pytest.mark.parametrize("number", [b"Infinity", b"-Infinity", b"NaN", b"1e400"])
def test_a_number_json_does_not_have_is_refused(number):
    body = b'{"id":1,"op":"open","args":{"spec":"raw:/x","timeout":%s}}' % number
    with pytest.raises(ControlProtocolError):
        Decoder().feed(struct.pack(">I", len(body)) + body)


def test_infinity_is_never_encoded():
    with pytest.raises(ControlProtocolError, match="cannot be sent as JSON"):
        encode(Response.success(1, {"timeout": float("inf")}))


@pytest.mark.parametrize("timeout", [0, -1, 86400.5, 1e308])
def test_a_timeout_outside_the_configured_limits_is_refused(timeout):
    with pytest.raises(ControlProtocolError, match="at most 86400 seconds"):
        parse_request({"id": 1, "op": "open", "args": {"spec": "raw:/x", "timeout": timeout}})


def test_a_string_argument_with_a_nul_byte_is_refused():
    with pytest.raises(ControlProtocolError, match="'path' contains a NUL byte"):
        parse_request({"id": 1, "op": "snapshot", "args": {"minor": 0, "path": "/x\0y"}})
