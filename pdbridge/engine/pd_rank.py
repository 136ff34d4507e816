"""PDRank: one TP rank's side of P/D disaggregation, living in that rank's process.

A prefill rank registers its cache regions (and a permute scratch buffer) with its transport
agent, serves its metadata over the handshake, gathers permuted bytes when asked, and
collects the decode ranks' ReadDone notifications. A decode rank plans its own reads against
the prefill layout (pure planner), fetches the metadata of exactly the prefill ranks its plan
reads from (once per engine), pulls, restores, and notifies every prefill rank it read from.
In push mode (pd_push.py) the prefill rank writes into the decode ranks during its last
prefill step instead, and the decode rank polls for their PushDone notifications.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import numpy as np

from pdbridge.plan import CopyList, RequestBlocks, SCRATCH, Strategy, TransferPlan, plan_transfer
from pdbridge.spec import EngineLayout
from pdbridge.transport.chunks import layout_zones
from pdbridge.transport.copies import execute_plan, run_copies
from pdbridge.transport.handshake import (MetadataServer, PeerDirectory, RankMetadata, peer_name,
                                         request)
from pdbridge.transport.messages import LeaseRenew, ReadDone, RegionAddr, encode
from pdbridge.transport.side_channel_key import SideChannelKey, load_key
from pdbridge.transport.transport import buffer_info

from pdbridge.transport.messages import ProtocolError, PushDone, decode

from . import checksums
from .pd_calls import (ArmPush, AwaitPush, ChooseStrategy, DigestReads, FlipByte, ForgetRequest,
                       Notifications, PDRankInfo, PDSetup, PollNotifications, PreparePermute,
                       Pull, PullResult, ReadDigests, ScratchBases, StrategyChoice)
from .pd_push import PushInbox, PushSender
from .scratch_allocator import ScratchAllocator

POLL_INTERVAL_S = 0.001     # the passive NIXL side must progress about every ms (REFERENCE.md)
# Notifications waiting for the node's next poll, at most (issue 12: a flood of 60 KB
# messages grew a prefill process by 1 GB). Beyond it a message is dropped and counted; a
# dropped ReadDone only delays its blocks' release until the lease expires.
MAX_INBOX_NBYTES = 8 << 20


def make_transport(kind: str, name: str):
    if kind == "nixl":
        from pdbridge.transport.nixl import NixlTransport
        return NixlTransport(name)
    if kind == "local":
        from pdbridge.transport.local import LocalTransport
        return LocalTransport(name)
    raise ValueError(f"transport={kind!r}; allowed: nixl, local")


class PDRank:
    def __init__(self, worker: Any, call: PDSetup):
        if call.role not in ("prefill", "decode"):
            raise ValueError(f"role={call.role!r}; allowed: prefill, decode")
        if call.transfer_mode not in ("pull", "push"):
            raise ValueError(f"transfer_mode={call.transfer_mode!r}; allowed: pull, push")
        self.rank, self.layout, self.caches = worker.rank, worker.layout, worker.caches
        self.role, self.engine_id, self.timeout_s = call.role, call.engine_id, call.timeout_s
        self.key = SideChannelKey(call.secret) if call.secret else load_key()
        self.side_channel_host = call.side_channel_host
        self.transport = make_transport(call.transport, peer_name(call.engine_id, self.rank))
        self.scratch = np.zeros(call.scratch_nbytes, np.uint8) if call.scratch_nbytes else None
        self.transport.register_regions(self.caches.region_buffers, self.scratch,
                                        layout_zones(self.layout.rank(self.rank)))
        self._layouts: dict[str, EngineLayout] = {self.layout.digest: self.layout}
        self.server: MetadataServer | None = None
        self._agent_lock = threading.Lock()     # the poller and push writes share the agent
        self._poller: threading.Thread | None = None
        self.push = PushSender(self.rank, self.engine_id, self.layout, self.transport,
                               self._agent_lock, self._layout, self.caches.region_buffers)
        if self.role == "prefill":
            self._start_prefill()
        else:
            self.directory = PeerDirectory(self.layout, self.engine_id, self.rank,
                                           timeout_s=self.timeout_s, strategy=Strategy.DIRECT,
                                           add_peer=self.transport.add_peer, key=self.key)
            self.inbox = PushInbox(self.rank, self.layout, self._layout,
                                   self.caches.region_buffers)
            if call.transfer_mode == "push":    # writes land here: progress the passive side
                self._start_poller(self._keep_push_done)

    def info(self) -> PDRankInfo:
        return PDRankInfo(self.rank, self.server.endpoint if self.server else "",
                          0 if self.scratch is None else len(self.scratch),
                          self.transport.metadata())

    # ---- prefill side ------------------------------------------------------------------

    def _start_prefill(self) -> None:
        self.scratch_alloc = ScratchAllocator(0 if self.scratch is None else len(self.scratch))
        self._inbox: list[tuple[float, bytes]] = []
        self._inbox_nbytes, self.inbox_dropped = 0, 0
        self._lock = threading.Lock()
        regions = tuple(RegionAddr(buffer_info(b).addr, buffer_info(b).nbytes)
                        for b in self.caches.region_buffers)
        scratch = None if self.scratch is None else RegionAddr(self.scratch.ctypes.data, len(self.scratch))
        meta = RankMetadata(self.engine_id, self.rank, self.layout, self.transport.metadata(),
                            regions, scratch)
        self.server = MetadataServer(meta, bind=f"tcp://{self.side_channel_host}:*",
                                     on_notification=lambda m: self._keep(encode(m)),
                                     key=self.key)
        self._start_poller(self._keep)

    def _start_poller(self, keep) -> None:
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, args=(keep,), daemon=True,
                                        name=f"pd-notifs-{self.engine_id}-{self.rank}")
        self._poller.start()

    def _keep(self, message: bytes) -> None:
        with self._lock:
            if self._inbox_nbytes + len(message) > MAX_INBOX_NBYTES:
                self.inbox_dropped += 1
                return
            self._inbox_nbytes += len(message)
            self._inbox.append((time.monotonic(), message))

    def _poll_loop(self, keep) -> None:
        """Drive the passive side's progress and hand each notification to `keep`."""
        while not self._stop.is_set():
            try:
                with self._agent_lock:
                    notifs = self.transport.get_notifications()
                for _, message in notifs:
                    keep(message)
            except Exception:       # closed under us at shutdown
                return
            time.sleep(POLL_INTERVAL_S)

    # ---- push mode (pd_push.py) ----------------------------------------------------------

    def arm_push(self, call: ArmPush) -> None:
        self.push.arm(call)

    def layer_hook(self):
        """The model's per-layer callback for the coming forward, if a push is armed."""
        if not self.push.armed:
            return None
        sync = self.caches.region_buffers and getattr(self.caches.region_buffers[0], "is_cuda", False)
        if not sync:
            return self.push.after_layer
        import torch

        def after_layer(layer: int) -> None:
            torch.cuda.current_stream().synchronize()   # the layer's cache writes have landed
            self.push.after_layer(layer)
        return after_layer

    def finish_push(self, error: str = "") -> None:
        self.push.finish(error)

    def await_push(self, call: AwaitPush) -> PullResult:
        return self.inbox.await_push(call)

    def _keep_push_done(self, message: bytes) -> None:
        try:
            msg = decode(message)
        except ProtocolError:
            return                  # a malformed notification completes nothing
        if isinstance(msg, PushDone):
            self.inbox.add(msg)

    def poll_notifications(self, call: PollNotifications) -> Notifications:
        with self._lock:
            out, self._inbox, self._inbox_nbytes = self._inbox, [], 0
        now = time.monotonic()
        return Notifications(self.rank, [m for _, m in out], [now - t for t, _ in out])

    def prepare_permute(self, call: PreparePermute) -> ScratchBases:
        """Gather, for every decode rank that chose permute, its bytes from this rank.

        The decode ranks' choice is taken as given, never re-decided here: with `auto` this
        side's cost model may differ from theirs (calibrated elsewhere), and a rank whose
        plan reads a scratch nobody filled fails its pull."""
        decode = self._layout(call.decode_layout)
        pblocks, dblocks = RequestBlocks(*call.prefill_blocks), RequestBlocks(*call.decode_blocks)
        bases = {}
        for j, strategy in sorted(call.strategies.items()):
            if strategy is not Strategy.PERMUTE:
                continue
            plan = plan_transfer(self.layout, decode, j, pblocks, dblocks, Strategy.PERMUTE)
            copies = plan.prefill_reorder.get(self.rank)
            if copies is None or not len(copies):
                continue
            base = self.scratch_alloc.allocate(call.request_id, plan.prefill_scratch_nbytes[self.rank])
            shifted = _shift(copies, dst=base)
            run_copies(shifted, self.caches.region_buffers, self.scratch)
            bases[j] = base
        return ScratchBases(self.rank, bases)

    def digest_reads(self, call: DigestReads) -> ReadDigests:
        """The digest of the source bytes each decode rank reads from this rank. Reported,
        not raised: a decode rank left without one fails its checksum."""
        decode = self._layout(call.decode_layout)
        pblocks, dblocks = RequestBlocks(*call.prefill_blocks), RequestBlocks(*call.decode_blocks)
        digests = {}
        try:
            for j in range(decode.tp_size):
                plan = checksums.checksum_plan(self.layout, decode, j, pblocks, dblocks)
                if len(plan.reads_from(self.rank)):
                    digests[j] = checksums.source_digest(plan, self.rank, self.caches.region_buffers)
        except Exception as e:
            return ReadDigests(self.rank, {}, f"{type(e).__name__}: {e}")
        return ReadDigests(self.rank, digests)

    def flip_byte(self, call: FlipByte) -> None:
        if call.rank == self.rank:
            buf = self.caches.region_buffers[call.region]
            buf[call.offset] = 255 - int(buf[call.offset])

    def forget(self, call: ForgetRequest) -> None:
        self.scratch_alloc.free(call.request_id)

    # ---- decode side -------------------------------------------------------------------

    def choose_strategy(self, call: ChooseStrategy) -> StrategyChoice:
        """The concrete strategy this rank's plan takes (what `auto` resolves to here). A
        request that cannot be planned is reported, not raised (a raising call ends a worker
        process): the pull then plans it again and fails it the usual way (recompute or fail)."""
        try:
            plan = plan_transfer(self._layout(call.prefill_layout), self.layout, self.rank,
                                 RequestBlocks(*call.prefill_blocks),
                                 RequestBlocks(*call.decode_blocks), call.strategy)
        except Exception as e:
            return StrategyChoice(self.rank, call.strategy, f"{type(e).__name__}: {e}")
        return StrategyChoice(self.rank, plan.strategy)

    def pull(self, call: Pull) -> PullResult:
        t0 = time.perf_counter()
        plan: TransferPlan | None = None
        try:
            prefill = self._layout(call.prefill_layout)
            # The strategy chosen earlier (ChooseStrategy), which the prefill side prepared for.
            strategy = call.strategies.get(self.rank, call.strategy)
            plan = plan_transfer(prefill, self.layout, self.rank, RequestBlocks(*call.prefill_blocks),
                                 RequestBlocks(*call.decode_blocks), strategy)
            sources = plan.source_ranks()
            # Exactly the prefill ranks this plan reads from, each fetched once per engine.
            self.directory.get_ranks(call.prefill_engine_id, sources, lambda r: call.endpoints[r])
            plan = _with_scratch_bases(plan, call.scratch_bases)
            peers = {r: peer_name(call.prefill_engine_id, r) for r in sources}
            with LeaseRenewer(call, self.engine_id, self.rank, sources, self.key):
                execute_plan(self.transport, plan, peers, self.caches.region_buffers,
                             self.scratch, call.timeout_s)
            if call.checksums is not None:
                self._verify(call, prefill, plan)
            result = PullResult(self.rank, True, "", plan.strategy.value, sources,
                                plan.total_nbytes, plan.num_descriptors)
        except Exception as e:
            result = PullResult(self.rank, False, f"{type(e).__name__}: {e}",
                                plan.strategy.value if plan else "", plan.source_ranks() if plan else [])
        result.seconds = time.perf_counter() - t0
        self._notify_sources(call, result)
        return result

    def _verify(self, call: Pull, prefill: EngineLayout, plan: TransferPlan) -> None:
        """Compare what landed in this rank's cache with the prefill ranks' digests."""
        blocks = RequestBlocks(*call.prefill_blocks), RequestBlocks(*call.decode_blocks)
        direct = checksums.checksum_plan(prefill, self.layout, self.rank, *blocks, plan=plan)
        expected = {p: d[self.rank] for p, d in call.checksums.items() if self.rank in d}
        checksums.verify(direct, self.caches.region_buffers, expected)

    def _notify_sources(self, call: Pull, result: PullResult) -> None:
        """Tell every prefill rank read from that this rank is done with the request, after
        ALL its reads ended, so a prefill engine never frees blocks another read still uses."""
        msg = encode(ReadDone(call.request_id, self.engine_id, self.rank, result.ok, result.detail))
        for r in result.sources:
            try:
                self.transport.notify(peer_name(call.prefill_engine_id, r), msg)
            except Exception:
                pass        # the prefill rank is gone; its lease expiry frees the blocks

    # ---- shared ------------------------------------------------------------------------

    def _layout(self, d: dict) -> EngineLayout:
        digest = d.get("digest")
        if digest not in self._layouts:
            self._layouts[digest] = EngineLayout.from_dict(d)
        return self._layouts[digest]

    def close(self) -> None:
        if self._poller is not None:
            self._stop.set()
            self._poller.join(1.0)
        if self.server is not None:
            self.server.close()
        self.transport.close()


class LeaseRenewer:
    """While a pull runs, renew the prefill engine's lease on the request every
    `call.renew_every_s` through each source rank's metadata server (a LeaseRenew message)."""

    def __init__(self, call: Pull, engine_id: str, rank: int, sources: list[int],
                 key: SideChannelKey | None = None):
        self._every = call.renew_every_s
        self._key = key
        self._msg = LeaseRenew(call.request_id, engine_id, rank)
        self._endpoints = [call.endpoints[r] for r in sources]
        self._stop = threading.Event()
        self.sent = 0

    def __enter__(self) -> "LeaseRenewer":
        if self._every > 0:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="pd-lease-renew")
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            for endpoint in self._endpoints:
                try:
                    request(endpoint, self._msg, timeout_s=self._every, key=self._key)
                    self.sent += 1
                except Exception:
                    pass        # a prefill rank that does not answer: its reads will fail too

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._every > 0:
            self._thread.join(2 * self._every + 1.0)


def _shift(copies: CopyList, dst: int) -> CopyList:
    return CopyList(copies.src_region, copies.src_offset, copies.dst_region,
                    copies.dst_offset + dst, copies.nbytes)


def _with_scratch_bases(plan: TransferPlan, bases: dict[int, dict[int, int]]) -> TransferPlan:
    """Reads from a prefill rank's scratch, moved to where that rank put this rank's bytes."""
    from_scratch = plan.src_region == SCRATCH
    if not from_scratch.any():
        return plan
    offsets = plan.src_offset.copy()
    for r in np.unique(plan.src_rank[from_scratch]).tolist():
        try:
            base = bases[r][plan.decode_rank]
        except KeyError:
            raise RuntimeError(f"plan reads prefill rank {r}'s scratch but it prepared none "
                               f"for decode rank {plan.decode_rank}") from None
        offsets[from_scratch & (plan.src_rank == r)] += base
    return dataclasses.replace(plan, src_offset=offsets)
