"""The wire decoders under hostile input (issue 12): arbitrary bytes, mutated valid messages and
random msgpack documents either decode to a known message type or raise ProtocolError; nothing
else escapes, nothing hangs (a 5 s deadline per input), oversized input is refused unread, and a
metadata server fed such frames keeps serving. 500 inputs per property by default, 10,000 slow."""
from __future__ import annotations

import datetime

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdbridge.transport.handshake import MetadataServer
from pdbridge.transport.messages import (Ack, ErrorReply, FloorProbe, LeaseRenew,
                                         MetadataReply, MetadataRequest, ProtocolError, PushDone,
                                         ReadDone, decode, encode)
from test_handshake import assert_alive, rank_meta

VALID = [encode(m) for m in (MetadataRequest("d0", 0, "p0"), ReadDone("p0:1", "d0", 1),
                             ReadDone("p0:2", "d0", 0, ok=False, detail="x"),
                             LeaseRenew("p0:1", "d0", 3), Ack("p0:1"), ErrorReply("f", "d"),
                             FloorProbe("d0", 1))]
KNOWN = (MetadataRequest, MetadataReply, ReadDone, LeaseRenew, PushDone, FloorProbe, Ack,
         ErrorReply)


def _profile(n: int):
    return settings(max_examples=n, deadline=datetime.timedelta(seconds=5),
                    suppress_health_check=[HealthCheck.too_slow], derandomize=False)


def _decodes_or_refuses(data: bytes) -> None:
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert isinstance(msg, KNOWN)


@st.composite
def mutated(draw) -> bytes:
    """A valid message with bytes flipped, cut, inserted or appended."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "append"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


msgpack_docs = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["type", "request_id", "decode_engine_id", "decode_rank", "ok", "detail",
                         "engine_id", "rank", "protocol_version", "x"]) | st.text(max_size=8),
        inner, max_size=6),
    max_leaves=20)
tagged = st.builds(lambda t, d: {**d, "type": t},
                   st.sampled_from(["metadata_request", "metadata_reply", "read_done",
                                    "lease_renew", "ack", "error_reply", "nope"]),
                   st.dictionaries(st.text(max_size=16), msgpack_docs, max_size=6))
HOSTILE = st.binary(max_size=2048) | mutated() | msgpack_docs.map(msgspec.msgpack.encode) \
    | tagged.map(msgspec.msgpack.encode)


@_profile(500)
@given(HOSTILE)
def test_decoder_decodes_or_refuses(data):
    _decodes_or_refuses(data)


@pytest.mark.slow
@_profile(10_000)
@given(HOSTILE)
def test_decoder_decodes_or_refuses_slow(data):
    _decodes_or_refuses(data)


def test_the_property_can_fail():
    """A decoder that lets msgspec's own errors escape is caught by the same check."""
    with pytest.raises(msgspec.DecodeError):
        msgspec.msgpack.Decoder(type(None)).decode(b"\xc1")   # reserved byte: not msgpack
    with pytest.raises(ProtocolError):
        decode(b"\xc1")


def test_oversized_input_is_refused_unread():
    with pytest.raises(ProtocolError, match="exceeds the limit of 64"):
        decode(VALID[0] + b"\x00" * 64, max_nbytes=64)


@_profile(60)
@given(st.lists(HOSTILE, min_size=1, max_size=4))
def test_server_answers_hostile_frames_and_keeps_serving(frames):
    with MetadataServer(rank_meta(), max_message_nbytes=4096) as s:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        s.key.connect_as_client(sock)       # a holder of the secret, sending garbage
        try:
            sock.connect(s.endpoint)
            sock.send_multipart([f or b"\x00" for f in frames])
            if sock.poll(5000):     # an error reply, or nothing for an oversized frame
                assert isinstance(decode(sock.recv_multipart()[-1]), (ErrorReply, Ack, MetadataReply))
        finally:
            sock.close()
        assert_alive(s.endpoint)
