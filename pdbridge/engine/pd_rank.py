"""One TP rank's side of P/D disaggregation, living in that rank's process: the parts both
roles share, and `open_rank`, which makes the rank its PDSetup names.

A prefill rank (prefill_rank.py) serves its metadata, gathers permuted bytes, digests what
decode ranks read and collects their notifications; a decode rank (decode_rank.py) plans and
pulls its own reads and notifies the prefill ranks it read from. Each owns its threads and
sockets and closes them in `close()`. Push mode (pd_push.py) adds a writer to the prefill rank
and an inbox to the decode rank.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np

from pdbridge.spec import EngineLayout
from pdbridge.transport.chunks import layout_zones
from pdbridge.transport.handshake import peer_name
from pdbridge.transport.side_channel_key import SideChannelKey, load_key

from .pd_calls import FlipByte, PDRankInfo, PDSetup

POLL_INTERVAL_S = 0.001     # the passive NIXL side must progress about every ms (REFERENCE.md)
# While reads are expected (a prefill step just ran, or a notification just came), faster:
# over TCP (hosts apart) a decode rank's read of this rank's memory completes only at this
# side's next progress (UCX emulates it with active messages; measured in `pdbridge bench
# serve`: the read's wait was spread evenly over one interval). On one host reads go through
# shared memory and need no progress here (nixl.DEFAULT_MM_ERROR_HANDLING), and the fast
# polling only takes the cores the reading ranks need (paired runs, issue 10: transfer stage
# 2.10 -> 1.95 ms, ranks' pull 1.24 -> 1.08 ms without it): see reads_need_progress.
POLL_HOT_S = 0.0001
HOT_WINDOW_S = 0.05         # how long after a step or a notification the poller stays hot
ROLES = ("prefill", "decode")
TRANSFER_MODES = ("pull", "push")


def make_transport(kind: str, name: str):
    if kind == "nixl":
        from pdbridge.transport.nixl import NixlTransport
        return NixlTransport(name)
    if kind == "local":
        from pdbridge.transport.local import LocalTransport
        return LocalTransport(name)
    raise ValueError(f"transport={kind!r}; allowed: nixl, local")


def open_rank(worker: Any, call: PDSetup) -> "RankBase":
    """The PrefillRank or DecodeRank that `call.role` names, on this worker's caches."""
    if call.role not in ROLES:
        raise ValueError(f"role={call.role!r}; allowed: {', '.join(ROLES)}")
    if call.transfer_mode not in TRANSFER_MODES:
        raise ValueError(f"transfer_mode={call.transfer_mode!r}; allowed: "
                         f"{', '.join(TRANSFER_MODES)}")
    if call.role == "prefill":
        from .prefill_rank import PrefillRank
        return PrefillRank(worker, call)
    from .decode_rank import DecodeRank
    return DecodeRank(worker, call)


LOOPBACK_HOSTS = ("localhost", "::1")


def reads_need_progress(side_channel_host: str, env: dict[str, str]) -> bool:
    """Whether decode ranks' reads of a prefill rank wait for its progress, i.e. may go over
    TCP: its side channel is reachable beyond this host (only readers on this host reach a
    loopback one, and theirs go through shared memory), or UCX's transports are chosen by
    hand (UCX_TLS, e.g. tcp)."""
    if env.get("UCX_TLS"):
        return True
    host = side_channel_host.strip("[]")
    return not (host.startswith("127.") or host in LOOPBACK_HOSTS)


class RankBase:
    """This rank's transport agent over its registered cache regions (and scratch buffer),
    the layouts it has been sent (by digest), and the notification poller thread."""

    def __init__(self, worker: Any, call: PDSetup):
        self.rank, self.layout, self.caches = worker.rank, worker.layout, worker.caches
        self.engine_id, self.timeout_s = call.engine_id, call.timeout_s
        self.key = SideChannelKey(call.secret) if call.secret else load_key()
        self.transport = make_transport(call.transport, peer_name(call.engine_id, self.rank))
        self.scratch = np.zeros(call.scratch_nbytes, np.uint8) if call.scratch_nbytes else None
        self.transport.register_regions(self.caches.region_buffers, self.scratch,
                                        layout_zones(self.layout.rank(self.rank)))
        self._layouts: dict[str, EngineLayout] = {self.layout.digest: self.layout}
        self._agent_lock = threading.Lock()     # the poller and the other users share the agent
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._hot_until = 0.0       # monotonic; the poller polls every POLL_HOT_S before it
        self._hot_polling = call.hot_polling

    def info(self) -> PDRankInfo:
        return PDRankInfo(self.rank, "", 0 if self.scratch is None else len(self.scratch),
                          self.transport.metadata())

    def layer_hook(self):
        """The model's per-layer callback for the coming forward (push mode only)."""
        return None

    def finish_push(self, error: str = "") -> None:
        pass

    def expect_reads(self) -> None:
        """Reads of this rank's memory may come soon (a forward just ran here): progress
        the passive side every POLL_HOT_S for the next HOT_WINDOW_S (where reads need it:
        PDSetup.hot_polling)."""
        if self._hot_polling:
            self._hot_until = time.monotonic() + HOT_WINDOW_S

    def flip_byte(self, call: FlipByte) -> None:
        """Fault injection: invert one byte of one of this rank's regions."""
        if call.rank == self.rank:
            buf = self.caches.region_buffers[call.region]
            buf[call.offset] = 255 - int(buf[call.offset])

    def _layout(self, d: dict) -> EngineLayout:
        """A peer engine's layout, kept by digest: a call may name it by digest alone
        ({"digest": ...}) once an earlier call carried it whole (DecodeNode sends it once)."""
        digest = d.get("digest")
        layout = self._layouts.get(digest)
        if layout is None:
            if len(d) == 1:
                raise ValueError(f"prefill layout {digest} is named, not sent, and this rank "
                                 f"has not seen it")
            layout = self._layouts[digest] = EngineLayout.from_dict(d)
        return layout

    def _start_poller(self, keep: Callable[[bytes], None]) -> None:
        self._poller = threading.Thread(target=self._poll_loop, args=(keep,), daemon=True,
                                        name=f"pd-notifs-{self.engine_id}-{self.rank}")
        self._poller.start()

    def _poll_loop(self, keep: Callable[[bytes], None]) -> None:
        """Drive the passive side's progress and hand each notification to `keep`: every
        POLL_HOT_S while reads are expected (expect_reads, or a notification came: other
        readers are likely at work), else every POLL_INTERVAL_S."""
        while not self._stop.is_set():
            try:
                with self._agent_lock:
                    notifs = self.transport.get_notifications()
                for _, message in notifs:
                    keep(message)
            except Exception:       # closed under us at shutdown
                return
            if notifs:
                self.expect_reads()
            time.sleep(self.poll_interval(time.monotonic()))

    def poll_interval(self, now: float) -> float:
        """The poller's next sleep: POLL_HOT_S inside the window expect_reads opened."""
        return POLL_HOT_S if now < self._hot_until else POLL_INTERVAL_S

    def close(self) -> None:
        """Stop the poller, then the transport agent (subclasses close their own parts first)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(1.0)
        self.transport.close()
