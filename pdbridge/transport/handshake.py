"""Handshake: a prefill rank serves its metadata, a decode rank fetches it once per peer.

Metadata = NIXL agent metadata (opaque bytes from Transport.metadata()), the base address and
length of every registered region, and the whole EngineLayout, rebuilt on the decode side from
its source config and checked against the sent digest and against the decode layout
(compat.check_compatible) before any read is planned (DESIGN.md section 5).

Wire: one msgpack message per ZeroMQ frame (messages.py), ROUTER on the prefill side, one
short-lived REQ socket per fetch on the decode side (a REQ that timed out cannot be reused).
Nothing is unpickled; oversized frames are dropped by ZeroMQ itself (MAXMSGSIZE disconnects
the sender), malformed ones get an ErrorReply, and the server thread survives both. Every
socket is a CURVE server or client with keys derived from the deployment's shared secret
(side_channel_key.py): without the secret a peer gets nothing, not even an error.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..plan.transfer_plan import Strategy
from ..spec.layout import EngineLayout
from .compat import check_compatible
from .messages import (MAX_MESSAGE_NBYTES, PROTOCOL_VERSION, Ack, ErrorReply, LeaseRenew,
                       Message, MetadataReply, MetadataRequest, ProtocolError, ReadDone,
                       RegionAddr, decode, encode)
from .side_channel_key import ZAP_DOMAIN, SideChannelKey, load_key

log = logging.getLogger(__name__)
POLL_MS = 50            # how often the server thread looks at its stop flag


class HandshakeError(RuntimeError):
    """A peer could not be reached, refused us, or sent metadata we cannot use."""


class PeerTimeout(HandshakeError):
    pass


class PeerRefused(HandshakeError):
    def __init__(self, where: str, reply: ErrorReply):
        self.field, self.detail = reply.field, reply.detail
        super().__init__(f"{where} refused the request: {reply.field}: {reply.detail}")


def peer_name(engine_id: str, rank: int) -> str:
    """The name a decode transport knows a prefill rank by (Transport.add_peer)."""
    return f"{engine_id}/rank{rank}"


@dataclass(frozen=True)
class RankMetadata:
    """What one prefill rank tells decode ranks about itself; validated against its layout."""
    engine_id: str
    rank: int
    layout: EngineLayout
    agent_metadata: bytes
    regions: tuple[RegionAddr, ...]     # one per layout.rank(rank).regions, same order
    scratch: RegionAddr | None = None   # permute scratch buffer, if any

    def __post_init__(self):
        if not 0 <= self.rank < self.layout.tp_size:
            raise HandshakeError(f"rank={self.rank} is outside tp_size {self.layout.tp_size}")
        want = self.layout.rank(self.rank).regions
        if len(self.regions) != len(want):
            raise HandshakeError(f"regions: {len(self.regions)} given, layout has {len(want)}")
        for i, (got, region) in enumerate(zip(self.regions, want)):
            if got.nbytes != region.nbytes:
                raise HandshakeError(f"regions[{i}] ({region.name}).nbytes: {got.nbytes} given, "
                                     f"layout says {region.nbytes}")

    def to_reply(self) -> MetadataReply:
        return MetadataReply(self.engine_id, self.rank, self.agent_metadata, list(self.regions),
                             self.layout.to_dict(), self.layout.digest, self.scratch)


# ---- prefill side ------------------------------------------------------------------------

Notification = ReadDone | LeaseRenew


class MetadataServer:
    """Serves one prefill rank's metadata (and, optionally, notifications) on a ROUTER socket
    from a background thread. `endpoint` is the bound address (a `*` port resolved)."""

    def __init__(self, meta: RankMetadata, bind: str = "tcp://127.0.0.1:*",
                 max_message_nbytes: int = 64 << 10,
                 on_notification: Callable[[Notification], None] | None = None,
                 key: SideChannelKey | None = None):
        self._meta, self._on_notification = meta, on_notification
        self._reply = encode(meta.to_reply())   # static: encode once
        self._max = max_message_nbytes
        self.key = key or load_key()
        # A context of its own: its ZAP authenticator (a thread) serves this server alone,
        # and both end with it (close).
        self._ctx = zmq.Context()
        self._auth = ThreadAuthenticator(self._ctx, log=log)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.key)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_nbytes)
        self.key.serve(self._sock)
        self._sock.bind(bind)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.messages_received = 0
        self.metadata_served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"metadata-{meta.engine_id}-"
                                        f"{meta.rank}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        serve_until(self._sock, self._stop, self._serve_one)

    def _serve_one(self) -> None:
        frames = self._sock.recv_multipart()
        self.messages_received += 1
        envelope, body = _split_envelope(frames)
        try:
            reply = self._answer(body)
        except Exception as e:      # never let one request take the server down
            log.exception("metadata server: handler failed")
            reply = encode(ErrorReply("internal", f"{type(e).__name__}: {e}"))
        self._sock.send_multipart(envelope + [reply])

    def _answer(self, body: list[bytes]) -> bytes:
        if len(body) != 1:
            return encode(ErrorReply("message", f"expected 1 frame, got {len(body)}"))
        try:
            msg = decode(body[0], self._max)
        except ProtocolError as e:
            return encode(ErrorReply("message", str(e)))
        if isinstance(msg, MetadataRequest):
            return self._answer_metadata(msg)
        if isinstance(msg, (ReadDone, LeaseRenew)) and self._on_notification is not None:
            self._on_notification(msg)
            return encode(Ack(msg.request_id))
        return encode(ErrorReply("type", f"{type(msg).__name__} is not served here"))

    def _answer_metadata(self, req: MetadataRequest) -> bytes:
        m = self._meta
        if req.protocol_version != PROTOCOL_VERSION:
            return encode(ErrorReply("protocol_version", f"peer speaks {req.protocol_version}, "
                                                         f"this server {PROTOCOL_VERSION}"))
        if req.engine_id is not None and req.engine_id != m.engine_id:
            return encode(ErrorReply("engine_id", f"this is engine {m.engine_id!r}, "
                                                  f"not {req.engine_id!r}"))
        if req.rank is not None and req.rank != m.rank:
            return encode(ErrorReply("rank", f"this is rank {m.rank}, not {req.rank}"))
        self.metadata_served += 1
        return self._reply

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving; returns once the thread is gone and the address can be bound again."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._auth.stop()
            self._ctx.term()
        _wait_until_unbound(self.endpoint, deadline)

    def __enter__(self) -> "MetadataServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_until(sock: zmq.Socket, stop: threading.Event, serve_one: Callable[[], None]) -> None:
    """A server thread's loop: serve_one() whenever `sock` has a message, until `stop` is
    set (looked at every POLL_MS); then the socket is closed, on the thread that used it."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    try:
        while not stop.is_set():
            if poller.poll(POLL_MS):
                serve_one()
    finally:
        sock.close(linger=0)


def _wait_until_unbound(endpoint: str, deadline: float) -> None:
    """ZeroMQ closes a socket's listener on its I/O thread, some time after close() returns
    (seen here: a rebind right after close failed 9 times in 300). Wait, until `deadline`, for
    the TCP port to be free, so that a closed server's address is reusable at once."""
    if not endpoint.startswith("tcp://"):
        return
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as ZeroMQ binds
            try:
                probe.bind((host, int(port)))
                return
            except OSError:
                if time.monotonic() >= deadline:
                    return
        time.sleep(0.002)


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER frames are [identity, (more routing...), b"", body...] from a REQ peer, or
    [identity, body...] from a DEALER peer."""
    if b"" in frames[1:]:
        cut = frames.index(b"", 1) + 1
        return frames[:cut], frames[cut:]
    return frames[:1], frames[1:]


# ---- decode side -------------------------------------------------------------------------

def request(endpoint: str, msg: Message, timeout_s: float,
            max_reply_nbytes: int = MAX_MESSAGE_NBYTES,
            context: zmq.Context | None = None, key: SideChannelKey | None = None) -> Message:
    """Send one message and wait for one reply; PeerTimeout if none comes within timeout_s
    (also what a server that holds another secret amounts to: CURVE never completes)."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_reply_nbytes)
        (key or load_key()).connect_as_client(sock)
        sock.connect(endpoint)
        sock.send(encode(msg))
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise PeerTimeout(f"no reply from {endpoint} within {timeout_s:g} s")
        data = sock.recv()
    finally:
        sock.close(linger=0)
    try:
        return decode(data, max_reply_nbytes)
    except ProtocolError as e:
        raise HandshakeError(f"bad reply from {endpoint}: {e}") from None


class PeerDirectory:
    """A decode rank's view of prefill ranks: fetched once per (engine id, rank), checked
    compatible with the decode layout, and handed to the transport (add_peer) once."""

    def __init__(self, decode_layout: EngineLayout, decode_engine_id: str, decode_rank: int, *,
                 timeout_s: float = 5.0, strategy: Strategy = Strategy.AUTO,
                 add_peer: Callable[[str, bytes], Any] | None = None,
                 context: zmq.Context | None = None, key: SideChannelKey | None = None):
        self.decode_layout, self.strategy = decode_layout, strategy
        self._engine_id, self._rank = decode_engine_id, decode_rank
        self._timeout_s, self._add_peer, self._ctx = timeout_s, add_peer, context
        self._key = key or load_key()
        self._peers: dict[tuple[str, int], RankMetadata] = {}
        self._layouts: dict[str, EngineLayout] = {}     # by digest: one rebuild per engine
        self._lock = threading.Lock()
        self.fetches = 0

    def get(self, engine_id: str, rank: int, endpoint: str) -> RankMetadata:
        with self._lock:
            key = (engine_id, rank)
            if key not in self._peers:
                meta = self._fetch(engine_id, rank, endpoint)
                if self._add_peer is not None:
                    self._add_peer(peer_name(engine_id, rank), meta.agent_metadata)
                self._peers[key] = meta
            return self._peers[key]

    def get_ranks(self, engine_id: str, ranks: list[int],
                  endpoint_of: Callable[[int], str]) -> dict[int, RankMetadata]:
        """The ranks a plan reads from (TransferPlan.source_ranks()), and only those."""
        return {r: self.get(engine_id, r, endpoint_of(r)) for r in ranks}

    def layout_of(self, engine_id: str) -> EngineLayout | None:
        """The engine's layout if any of its ranks was fetched: plan with it, then fetch the
        other ranks the plan reads from (the first fetch should target one it will need)."""
        with self._lock:
            return next((m.layout for (e, _), m in self._peers.items() if e == engine_id), None)

    def forget(self, engine_id: str) -> None:
        """Drop an engine's cached metadata (it restarted or went away)."""
        with self._lock:
            for key in [k for k in self._peers if k[0] == engine_id]:
                del self._peers[key]

    def _fetch(self, engine_id: str, rank: int, endpoint: str) -> RankMetadata:
        where = f"prefill engine {engine_id!r} rank {rank} at {endpoint}"
        req = MetadataRequest(self._engine_id, self._rank, self.decode_layout.digest,
                              engine_id, rank)
        self.fetches += 1
        try:
            reply = request(endpoint, req, self._timeout_s, context=self._ctx, key=self._key)
        except PeerTimeout:
            raise PeerTimeout(f"{where}: no metadata within {self._timeout_s:g} s") from None
        if isinstance(reply, ErrorReply):
            raise PeerRefused(where, reply)
        if not isinstance(reply, MetadataReply):
            raise HandshakeError(f"{where}: expected metadata_reply, got {type(reply).__name__}")
        if (reply.engine_id, reply.rank) != (engine_id, rank):
            raise HandshakeError(f"{where}: answered as engine {reply.engine_id!r} "
                                 f"rank {reply.rank}")
        layout = self._layout(reply, where)
        try:
            meta = RankMetadata(engine_id, rank, layout, reply.agent_metadata,
                                tuple(reply.regions), reply.scratch)
        except HandshakeError as e:
            raise HandshakeError(f"{where}: {e}") from None
        check_compatible(meta.layout, self.decode_layout, self.strategy)
        return meta

    def _layout(self, reply: MetadataReply, where: str) -> EngineLayout:
        if reply.digest not in self._layouts:
            try:
                layout = EngineLayout.from_dict({**reply.layout, "digest": reply.digest})
            except Exception as e:      # any bad field of a peer's layout is the peer's fault
                raise HandshakeError(f"{where}: cannot rebuild its layout: "
                                     f"{type(e).__name__}: {e}") from None
            self._layouts[reply.digest] = layout
        return self._layouts[reply.digest]
