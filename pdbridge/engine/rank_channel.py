"""The rank channel: the decode node's direct line to each of its decode ranks.

Worker calls (Engine.call) move every rank in lockstep through the TP group's control
collectives: four gloo collectives a call (~1.4 ms at TP=2 measured here), and only between
model steps. A pull needs neither: each rank plans and reads for itself. So each DecodeRank
serves RankRequests (pd_calls: ChooseStrategy, Pull) on a socket of its own, from a thread of
its own, and the node sends one request to every rank and collects one reply from each.

Wire: ZeroMQ over `ipc://` in a directory only this user can enter (mkdtemp, mode 0700): no
TCP listener, and the file system, not a key, decides who may connect. Frames: [seq, body],
body one msgpack RankRequest (tagged) or its reply; the seq matches a reply to its request, so
a reply that arrives after its request timed out is dropped.
"""
from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from typing import Callable, Union

import msgspec
import zmq

from pdbridge.transport.handshake import serve_until

from .pd_calls import ChooseStrategy, Pull, PullBatch, RankRequest

log = logging.getLogger(__name__)
POLL_MS = 50                # the node's wait: how often it checks the ranks are alive
_requests = msgspec.msgpack.Decoder(Union[ChooseStrategy, Pull, PullBatch])


class RankChannelServer:
    """One decode rank's end: answers each RankRequest with `handle(request)` on its thread."""

    def __init__(self, name: str, handle: Callable[[RankRequest], msgspec.Struct]):
        self._handle = handle
        self._dir = tempfile.mkdtemp(prefix="pdbridge-rank-")
        self.endpoint = f"ipc://{self._dir}/channel"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"rank-channel-{name}",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        serve_until(self._sock, self._stop, self._serve_one)

    def _serve_one(self) -> None:
        frames = self._sock.recv_multipart()
        if len(frames) != 3:
            return                          # not ours: nothing to answer
        ident, seq, body = frames
        try:
            reply = self._handle(_requests.decode(body))
        except Exception:                   # a handler reports its failures; this is a bug
            log.exception("rank channel: handler failed")
            return                          # the node's wait times out and says so
        self._sock.send_multipart([ident, seq, msgspec.msgpack.encode(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)


class RankChannel:
    """The node's end: one DEALER socket per decode rank."""

    def __init__(self, endpoints: list[str]):
        self._ctx = zmq.Context()
        self._socks = []
        for endpoint in endpoints:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self._socks.append(sock)
        self._seq = 0

    def call_all(self, request: RankRequest, reply_type: type, timeout_s: float,
                 check_alive: Callable[[], None] = lambda: None,
                 ranks: list[int] | None = None) -> dict[int, msgspec.Struct]:
        """Send `request` to every rank (or those in `ranks`); rank -> its reply, for those
        that answered within timeout_s. `check_alive` runs between polls (it raises if a
        rank's process died)."""
        self._seq += 1
        seq = struct.pack("<Q", self._seq)
        body = msgspec.msgpack.encode(request)
        socks = self._socks if ranks is None else [self._socks[r] for r in ranks]
        for sock in socks:
            sock.send_multipart([seq, body])
        poller = zmq.Poller()
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        index = {sock: rank for rank, sock in enumerate(self._socks)}
        replies: dict[int, msgspec.Struct] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(socks):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sock, _ in poller.poll(min(POLL_MS, max(1, int(left * 1000)))):
                got_seq, data = sock.recv_multipart()
                if got_seq == seq:          # else: the reply of an earlier, timed-out request
                    replies[index[sock]] = msgspec.msgpack.decode(data, type=reply_type)
            if len(replies) < len(socks):
                check_alive()
        return replies

    def close(self) -> None:
        for sock in self._socks:
            sock.close(linger=0)
        self._ctx.term()


def private_dir_ok(endpoint: str) -> bool:
    """Whether an ipc endpoint's directory is this user's alone (tests)."""
    st = os.stat(os.path.dirname(endpoint[len("ipc://"):]))
    return st.st_uid == os.getuid() and st.st_mode & 0o077 == 0
