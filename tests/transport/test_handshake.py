"""Handshake over real ZeroMQ sockets on 127.0.0.1 / ipc: round trip, caching, timeouts,
malformed input, refusals."""
from __future__ import annotations

import os
import socket
import tempfile
import threading

import msgspec
import pytest
import zmq

from pdbridge.transport.compat import GeometryMismatch
from pdbridge.transport.handshake import (HandshakeError, MetadataServer, PeerDirectory,
                                          PeerRefused, PeerTimeout, RankMetadata, peer_name,
                                          request)
from pdbridge.transport.messages import (Ack, ErrorReply, LeaseRenew, MetadataReply,
                                         MetadataRequest, ReadDone, RegionAddr, decode, encode)
from pdbridge.transport.side_channel_key import SideChannelKey, load_key
from transport_layouts import tiny_config, tiny_layout

TIMEOUT_S = 5.0


def rank_meta(engine_id="p0", rank=0, layout=None, agent=b"agent-bytes") -> RankMetadata:
    layout = layout or tiny_layout(2, conv_layout="SD")
    regions = tuple(RegionAddr(0x10000 * (i + 1), r.nbytes)
                    for i, r in enumerate(layout.rank(rank).regions))
    return RankMetadata(engine_id, rank, layout, agent + bytes([rank]), regions,
                        RegionAddr(0x900000, 4096))


@pytest.fixture
def server():
    with MetadataServer(rank_meta()) as s:
        yield s


def directory(**kw) -> PeerDirectory:
    kw.setdefault("timeout_s", TIMEOUT_S)
    return PeerDirectory(tiny_layout(1), "d0", 0, **kw)


def raw(endpoint: str, frames: list[bytes], timeout_s: float = TIMEOUT_S, key=None):
    """Send arbitrary frames from a DEALER (a CURVE client of `key`, default this process's
    secret); the decoded reply, or None if none came."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    (key or load_key()).connect_as_client(sock)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return decode(sock.recv_multipart()[-1])
    finally:
        sock.close()


def assert_alive(endpoint: str) -> None:
    reply = request(endpoint, MetadataRequest("d9", 0, "x"), TIMEOUT_S)
    assert isinstance(reply, MetadataReply)


# ---- round trip ------------------------------------------------------------------------

def test_round_trip_tcp(server):
    assert server.endpoint.startswith("tcp://127.0.0.1:")
    peers = []
    d = directory(add_peer=lambda name, md: peers.append((name, md)))
    got = d.get("p0", 0, server.endpoint)
    want = rank_meta()
    assert got.layout is not want.layout and got.layout.digest == want.layout.digest
    assert got.layout.describe() == want.layout.describe()
    assert got.layout.rank(1).regions == want.layout.rank(1).regions
    assert (got.engine_id, got.rank, got.agent_metadata) == ("p0", 0, b"agent-bytes\x00")
    assert got.regions == want.regions and got.scratch == want.scratch
    assert peers == [(peer_name("p0", 0), b"agent-bytes\x00")]


def test_round_trip_ipc():
    with tempfile.TemporaryDirectory() as tmp:
        path = f"ipc://{os.path.join(tmp, 'meta.sock')}"
        with MetadataServer(rank_meta(rank=1), bind=path) as s:
            assert s.endpoint == path
            assert directory().get("p0", 1, path).rank == 1


def test_fetch_is_cached_per_engine_and_rank():
    with MetadataServer(rank_meta(rank=0)) as s0, MetadataServer(rank_meta(rank=1)) as s1:
        ends = {0: s0.endpoint, 1: s1.endpoint}
        d = directory()
        first = d.get_ranks("p0", [0, 1], ends.__getitem__)
        again = d.get_ranks("p0", [1, 0], ends.__getitem__)
        assert (s0.metadata_served, s1.metadata_served, d.fetches) == (1, 1, 2)
        assert first[0] is again[0] and first[1] is again[1]
        assert first[0].layout is first[1].layout     # one rebuild per engine
        assert d.layout_of("p0") is first[0].layout and d.layout_of("p1") is None
        d.forget("p0")
        d.get("p0", 0, ends[0])
        assert s0.metadata_served == 2


def test_only_needed_ranks_are_fetched():
    with MetadataServer(rank_meta(rank=0)) as s0, MetadataServer(rank_meta(rank=1)) as s1:
        directory().get_ranks("p0", [1], {0: s0.endpoint, 1: s1.endpoint}.__getitem__)
        assert (s0.messages_received, s1.metadata_served) == (0, 1)


# ---- failures on the decode side --------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_timeout_on_dead_server():
    d = directory(timeout_s=0.3)
    with pytest.raises(PeerTimeout, match=r"'p0' rank 0 .*no metadata within 0.3 s"):
        d.get("p0", 0, f"tcp://127.0.0.1:{_free_port()}")
    assert d.fetches == 1


def test_timeout_after_server_closed():
    s = MetadataServer(rank_meta())
    s.close()
    with pytest.raises(PeerTimeout):
        directory(timeout_s=0.3).get("p0", 0, s.endpoint)


def test_wrong_engine_or_rank_is_refused(server):
    with pytest.raises(PeerRefused) as e:
        directory().get("p1", 0, server.endpoint)
    assert e.value.field == "engine_id" and "'p0'" in e.value.detail
    with pytest.raises(PeerRefused) as e:
        directory().get("p0", 1, server.endpoint)
    assert e.value.field == "rank"


def test_protocol_version_is_checked(server):
    reply = request(server.endpoint, MetadataRequest("d0", 0, "x", protocol_version=99),
                    TIMEOUT_S)
    assert isinstance(reply, ErrorReply) and reply.field == "protocol_version"


def test_incompatible_peer_is_refused_before_use():
    meta = rank_meta(layout=tiny_layout(2, tiny_config(conv_kernel=3)))
    with MetadataServer(meta) as s:
        d = directory()
        with pytest.raises(GeometryMismatch) as e:
            d.get("p0", 0, s.endpoint)
        assert e.value.field == "tensors[0].dims.state_len"


def _fetch_against(reply_bytes: bytes) -> Exception | None:
    """Fetch from a fake prefill rank that answers its one request with fixed bytes."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    load_key().serve(sock)                      # it holds the secret (and lies)
    sock.bind("tcp://127.0.0.1:*")

    def answer_once():
        if sock.poll(int(TIMEOUT_S * 1000)):
            frames = sock.recv_multipart()      # [identity, b"", request]
            sock.send_multipart(frames[:2] + [reply_bytes])

    fake = threading.Thread(target=answer_once, daemon=True)
    fake.start()
    try:
        directory().get("p0", 0, sock.getsockopt_string(zmq.LAST_ENDPOINT))
    except Exception as e:
        return e
    finally:
        fake.join(TIMEOUT_S)
        sock.close()
    return None


def test_tampered_digest_is_refused():
    bad = msgspec.structs.replace(rank_meta().to_reply(), digest="0" * 16)
    e = _fetch_against(encode(bad))
    assert isinstance(e, HandshakeError) and "digest" in str(e)


def test_region_sizes_are_checked():
    good = rank_meta().to_reply()
    regions = list(good.regions)
    regions[1] = RegionAddr(regions[1].base_addr, regions[1].nbytes - 1)
    e = _fetch_against(encode(msgspec.structs.replace(good, regions=regions)))
    assert isinstance(e, HandshakeError) and "regions[1]" in str(e)


def test_garbage_reply_is_an_error():
    e = _fetch_against(b"\xc1 not msgpack")
    assert isinstance(e, HandshakeError) and "bad reply" in str(e)


def test_unrebuildable_layout_is_an_error():
    good = rank_meta().to_reply()
    e = _fetch_against(encode(msgspec.structs.replace(good, layout={"tp_size": 2})))
    assert isinstance(e, HandshakeError) and "cannot rebuild its layout" in str(e)


# ---- malformed input on the server side -------------------------------------------------

@pytest.mark.parametrize("frames,field", [
    ([b"\x00\x01garbage\xff"], "message"),
    ([encode(MetadataRequest("d0", 0, "abc"))[:-4]], "message"),               # truncated
    ([msgspec.msgpack.encode({"type": "metadata_request", "decode_rank": "zero"})], "message"),
    ([encode(ErrorReply("x", "y"))], "type"),                                    # wrong type
    ([encode(ReadDone("r1", "d0", 0))], "type"),            # no notification handler
    ([b"a", b"b"], "message"),                              # two frames
])
def test_malformed_messages_get_error_reply(server, frames, field):
    reply = raw(server.endpoint, frames)
    assert isinstance(reply, ErrorReply) and reply.field == field
    assert_alive(server.endpoint)


def test_huge_message_is_dropped_and_server_survives():
    with MetadataServer(rank_meta(), max_message_nbytes=4096) as s:
        assert raw(s.endpoint, [b"\x00" * 100_000], timeout_s=0.5) is None
        assert s.messages_received == 0
        assert_alive(s.endpoint)


def test_deeply_nested_message(server):
    nested = b"\x91" * 50_000 + b"\x00"
    reply = raw(server.endpoint, [nested])
    assert isinstance(reply, ErrorReply)
    assert_alive(server.endpoint)


def test_notifications_reach_the_handler():
    seen = []
    with MetadataServer(rank_meta(), on_notification=seen.append) as s:
        for msg in (ReadDone("r1", "d0", 1, ok=False, detail="x"), LeaseRenew("r1", "d0", 1)):
            assert request(s.endpoint, msg, TIMEOUT_S) == Ack("r1")
    assert seen == [ReadDone("r1", "d0", 1, False, "x"), LeaseRenew("r1", "d0", 1)]


def test_failing_handler_does_not_kill_the_server():
    def boom(msg):
        raise RuntimeError("handler bug")
    with MetadataServer(rank_meta(), on_notification=boom) as s:
        reply = request(s.endpoint, LeaseRenew("r1", "d0", 0), TIMEOUT_S)
        assert isinstance(reply, ErrorReply) and "handler bug" in reply.detail
        assert_alive(s.endpoint)


def test_close_is_clean_and_frees_the_port():
    s = MetadataServer(rank_meta())
    endpoint = s.endpoint
    s.close()
    assert not s._thread.is_alive()
    with MetadataServer(rank_meta(), bind=endpoint) as again:
        assert_alive(again.endpoint)


def test_rank_metadata_is_validated():
    layout = tiny_layout(2)
    with pytest.raises(HandshakeError, match="regions"):
        RankMetadata("p0", 0, layout, b"", (RegionAddr(0, 1),))
    with pytest.raises(HandshakeError, match="rank=2"):
        RankMetadata("p0", 2, layout, b"", ())
