"""The rank channel: the decode node's direct line to each of its decode ranks.

Worker calls (Engine.call) move every rank in lockstep through the TP group's control
collectives: four gloo collectives a call (~1.4 ms at TP=2 measured here), and only between
model steps. A pull needs neither: each rank plans and reads for itself. So each DecodeRank
serves RankRequests (pd_calls: ChooseStrategy, Pull, PullBatch, PlanAhead) on a socket of its
own, from a thread of its own, and the node sends one request to every rank and collects one
reply from each.

Wire: a Unix stream socket in a directory only this user can enter (mkdtemp, mode 0700): no
TCP listener, and the file system, not a key, decides who may connect. A frame is a header
(seq, body length) then the body, one msgpack RankRequest (tagged) or its reply; the seq
matches a reply to its request, so a reply that arrives after its request timed out is
dropped. Plain sockets, not ZeroMQ (issue 10): a ZeroMQ message passes through an I/O thread
on each side, and a round trip after 5 ms idle cost 250 us on the CI machine against 57 us for
a Unix socket (each extra thread is one more idle core to wake).

Rank 0 lives in the node's own process: the node calls it directly (LocalRank), on its own
thread, after the other ranks' requests went out. Through its socket, rank 0's thread started
its pull 0.26-0.49 ms after the send (a thread to wake, then the GIL to take) and its reply
woke the node again (issue 10, stamps on both sides). The request still makes the msgpack round
trip, so rank 0 sees exactly what a remote rank decodes.
"""
from __future__ import annotations

import enum
import logging
import os
import selectors
import shutil
import socket
import struct
import tempfile
import threading
import time
from typing import Callable, ClassVar, NamedTuple, Union

import msgspec

from .pd_calls import ChooseStrategy, PlanAhead, Pull, PullBatch, RankRequest

log = logging.getLogger(__name__)
POLL_MS = 50                # the node's wait: how often it checks the ranks are alive;
                            # the server's: how often it looks at its stop flag
SPIN_S = 0.001              # after rank 0's part, how long the node polls for the others'
# After an Expect, how long a rank's channel thread polls for the request it announces
# instead of sleeping in select.
EXPECT_S = 0.002
SCHEME = "unix://"
_HEADER = struct.Struct("<QQ")          # seq, body nbytes
MAX_FRAME_NBYTES = 1 << 30              # a header claiming more is not ours: drop the line


class _Served(enum.Enum):
    ANSWERED = "answered"
    EXPECT = "expect"           # an Expect: poll for the request it announces
    CLOSED = "closed"


class Expect(RankRequest):
    """Node to a rank's channel thread: a request follows shortly (a decode server that just
    received one and is allocating its blocks). The thread polls for it for EXPECT_S rather
    than sleeping, so its wakeup overlaps the node's allocation (issue 10); no reply."""
    handler: ClassVar[str] = ""


_requests = msgspec.msgpack.Decoder(Union[ChooseStrategy, Pull, PullBatch, PlanAhead, Expect])


def encode(request: RankRequest) -> bytes:
    """A request's body as RankChannel.send sends it."""
    return msgspec.msgpack.encode(request)


class ChannelClosed(ConnectionError):
    """The other end closed the connection (or sent what is not a frame)."""


def send_frame(sock: socket.socket, seq: int, body: bytes) -> None:
    sock.sendall(_HEADER.pack(seq, len(body)) + body)


def recv_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One whole frame (blocking until all of it is here); ChannelClosed at EOF."""
    seq, nbytes = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if nbytes > MAX_FRAME_NBYTES:
        raise ChannelClosed(f"frame of {nbytes} bytes (at most {MAX_FRAME_NBYTES})")
    return seq, _recv_exact(sock, nbytes)


def _recv_exact(sock: socket.socket, nbytes: int) -> bytes:
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        k = sock.recv_into(view[got:], nbytes - got)
        if k == 0:
            raise ChannelClosed("the other end closed the channel")
        got += k
    return bytes(buf)


def endpoint_path(endpoint: str) -> str:
    if not endpoint.startswith(SCHEME):
        raise ValueError(f"rank channel endpoint={endpoint!r}; allowed: {SCHEME}<path>")
    return endpoint[len(SCHEME):]


class RankChannelServer:
    """One decode rank's end: answers each RankRequest with `handle(request)` on its thread,
    which owns the listening socket and every connection, and closes them when it stops.
    `after_reply()`, if given, runs on that thread after each reply went out: work the node
    need not wait for (a decode rank's ReadDone notifications)."""

    def __init__(self, name: str, handle: Callable[[RankRequest], msgspec.Struct],
                 after_reply: Callable[[], None] | None = None):
        self._handle, self._after_reply = handle, after_reply
        self._dir = tempfile.mkdtemp(prefix="pdbridge-rank-")
        self.endpoint = f"{SCHEME}{self._dir}/channel"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(endpoint_path(self.endpoint))
        self._listener.listen(4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"rank-channel-{name}",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        expect_until = 0.0              # an Expect came: poll, do not sleep, until then
        try:
            while not self._stop.is_set():
                polling = time.monotonic() < expect_until
                ready = sel.select(0 if polling else POLL_MS / 1000)
                if not ready and polling:
                    os.sched_yield()
                    continue
                for key, _ in ready:
                    if key.fileobj is self._listener:
                        conn, _ = self._listener.accept()
                        sel.register(conn, selectors.EVENT_READ)
                        continue
                    served = self._serve_one(key.fileobj)
                    if served is _Served.EXPECT:
                        expect_until = time.monotonic() + EXPECT_S
                    elif served is _Served.ANSWERED:
                        expect_until = 0.0
                    else:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()

    def _serve_one(self, conn: socket.socket) -> "_Served":
        """Answer one frame (an Expect is answered by nothing); CLOSED when the connection
        is over (closed, or not ours)."""
        try:
            seq, body = recv_frame(conn)
        except (ChannelClosed, OSError):
            return _Served.CLOSED
        try:
            request = _requests.decode(body)
        except msgspec.DecodeError:
            log.warning("rank channel: dropped a frame that is no RankRequest")
            return _Served.ANSWERED         # nothing to answer; the node's wait times out
        if isinstance(request, Expect):
            return _Served.EXPECT           # answered by nothing
        try:
            reply = self._handle(request)
        except Exception:                   # a handler reports its failures; this is a bug
            log.exception("rank channel: handler failed")
            return _Served.ANSWERED         # the node's wait times out and says so
        try:
            send_frame(conn, seq, msgspec.msgpack.encode(reply))
        except OSError:
            return _Served.CLOSED           # the node is gone
        finally:
            if self._after_reply is not None:
                try:
                    self._after_reply()
                except Exception:
                    log.exception("rank channel: after_reply failed")
        return _Served.ANSWERED

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class LocalRank(NamedTuple):
    """Rank 0 in the node's process, called on the node's thread: what its channel server
    would run for a request (`handle`), and after its reply (`after_reply`)."""
    handle: Callable[[RankRequest], msgspec.Struct]
    after_reply: Callable[[], None] | None = None


class Asked(NamedTuple):
    """A request sent to the remote ranks (RankChannel.send), for collect."""
    seq: int
    body: bytes
    asked: frozenset
    local: bool                 # rank 0 is among the asked and runs in collect


class RankChannel:
    """The node's end: one connection per decode rank, used by one thread at a time; with
    `local`, rank 0 is called directly instead (its endpoint is not connected)."""

    def __init__(self, endpoints: list[str], local: LocalRank | None = None):
        self._socks: dict[int, socket.socket] = {}
        self._local = local
        self._ranks = len(endpoints)
        self._sel = selectors.DefaultSelector()
        try:
            for rank, endpoint in enumerate(endpoints):
                if rank == 0 and local is not None:
                    continue
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._socks[rank] = sock
                sock.connect(endpoint_path(endpoint))
                self._sel.register(sock, selectors.EVENT_READ, rank)
        except BaseException:
            self.close()
            raise
        self._lost: set[int] = set()        # ranks whose connection closed
        self._seq = 0
        self._after_work: Callable[[], None] | None = None      # collect's, left pending

    def call_all(self, request: RankRequest, reply_type: type, timeout_s: float,
                 check_alive: Callable[[], None] = lambda: None,
                 ranks: list[int] | None = None) -> dict[int, msgspec.Struct]:
        """Send `request` to every rank (or those in `ranks`); rank -> its reply, for those
        that answered within timeout_s. `check_alive` runs between polls (it raises if a
        rank's process died)."""
        replies = self.collect(self.send(request, ranks), reply_type, timeout_s, check_alive)
        self.run_after_work()
        return replies

    def expect(self) -> None:
        """Tell the remote ranks a request follows shortly (Expect): no reply, no seq."""
        body = msgspec.msgpack.encode(Expect())
        for rank in sorted(set(self._socks) - self._lost):
            try:
                send_frame(self._socks[rank], 0, body)
            except OSError:
                self._lose(rank)

    def send(self, request: RankRequest, ranks: list[int] | None = None,
             body: bytes | None = None) -> "Asked":
        """The first half of call_all: `request` to the remote ranks (every rank, or those in
        `ranks`), now; `collect` runs rank 0's part (local) and gathers the replies. A node
        sends as soon as it can (the remote ranks start while it goes on) and collects on
        its transfer thread; nothing else may use the channel in between. `body`: the
        request encoded already (encode), for a caller that made it ahead."""
        self.run_after_work()
        self._seq += 1
        body = body if body is not None else encode(request)
        asked = frozenset(range(self._ranks) if ranks is None else ranks)
        local = self._local is not None and 0 in asked
        # The remote ranks first: once rank 0 (this process) runs, this thread is busy with
        # it; sent after it, the other ranks' requests were ~1 ms late (issue 10, stamps).
        remote = asked - self._lost - ({0} if local else set())
        for rank in sorted(remote):
            try:
                send_frame(self._socks[rank], self._seq, body)
            except OSError:
                self._lose(rank)
        return Asked(self._seq, body, asked, local)

    def collect(self, ask: "Asked", reply_type: type, timeout_s: float,
                check_alive: Callable[[], None] = lambda: None) -> dict[int, msgspec.Struct]:
        """The second half of call_all (after send, before any other send): rank -> reply,
        for those that answered within timeout_s."""
        asked = set(ask.asked)
        replies: dict[int, msgspec.Struct] = {}
        after = None
        if ask.local:
            after = self._call_local(ask.body, reply_type, replies)
            if 0 not in replies:
                asked = asked - {0}         # it failed here and said so: nothing to wait for
        now = time.monotonic()
        deadline = now + timeout_s
        # Rank 0 ran here while the others ran in theirs: their replies are due about now.
        # Poll for them SPIN_S (yielding the core) before sleeping in select: a sleeping
        # thread woke 0.13-0.2 ms after the reply (stamps on both sides); paired runs of
        # `pdbridge up` put the stage 2-8% lower with the poll.
        spin_until = now + SPIN_S if ask.local else 0.0
        while asked - replies.keys() - self._lost:
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                break
            spinning = after is not None or now < spin_until
            ready = self._sel.select(0 if spinning else min(POLL_MS / 1000, left))
            if not ready and after is not None:
                self._run_after(after)      # while the other ranks still read
                after = None
                continue
            if not ready and spinning:
                os.sched_yield()
                continue
            for key, _ in ready:
                rank = key.data
                try:
                    seq, data = recv_frame(key.fileobj)
                except (ChannelClosed, OSError):
                    self._lose(rank)
                    continue
                if seq == ask.seq and rank in asked:    # else: an earlier, timed-out reply
                    replies[rank] = msgspec.msgpack.decode(data, type=reply_type)
            if asked - replies.keys():
                check_alive()
        # Every answer is in before rank 0's after-work ran: it waits for the caller
        # (run_after_work: the node's stage clock is read first), or the next send.
        self._after_work = after
        if asked & self._lost:
            check_alive()                   # a closed connection: did the process die?
        return replies

    def _call_local(self, body: bytes, reply_type: type, replies: dict
                    ) -> Callable[[], None] | None:
        """Rank 0's answer into `replies` (none when its handler failed: logged, like the
        server does); its after_reply, to run once the caller has nothing else to do."""
        try:
            reply = self._local.handle(_requests.decode(body))
        except Exception:
            log.exception("rank channel: rank 0's handler failed")
            return None
        if not isinstance(reply, reply_type):   # what decoding a socket's reply would refuse
            log.error("rank channel: rank 0 answered %s, expected %s",
                      type(reply).__name__, reply_type.__name__)
            return None
        replies[0] = reply
        return self._local.after_reply

    def run_after_work(self) -> None:
        """Rank 0's after-work (its ReadDone notifications) that collect left pending
        because every reply was in first; the caller runs it once it has read its clocks.
        send and close run it too, so it is never skipped."""
        after, self._after_work = self._after_work, None
        if after is not None:
            self._run_after(after)

    @staticmethod
    def _run_after(after: Callable[[], None]) -> None:
        try:
            after()
        except Exception:
            log.exception("rank channel: after_reply failed")

    def _lose(self, rank: int) -> None:
        """A rank's connection closed: it answers nothing more (check_alive says why)."""
        if rank not in self._lost:
            self._lost.add(rank)
            self._sel.unregister(self._socks[rank])

    def close(self) -> None:
        self.run_after_work()
        self._sel.close()
        for sock in self._socks.values():
            sock.close()


def private_dir_ok(endpoint: str) -> bool:
    """Whether an ipc endpoint's directory is this user's alone (tests)."""
    st = os.stat(os.path.dirname(endpoint_path(endpoint)))
    return st.st_uid == os.getuid() and st.st_mode & 0o077 == 0
