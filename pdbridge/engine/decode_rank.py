"""DecodeRank: a decode TP rank's side of P/D disaggregation.

It plans its own reads of a request against the prefill layout (pure planner, each request
planned once: plan_cache.py; a `direct` pull is no plan but index pairs into block rows the
transport prepared once: block_table.py), fetches the metadata of exactly the prefill ranks
it reads from (once per engine), pulls, restores, and notifies every prefill rank it read
from (after its reply to the node went out: the ReadDone frees prefill blocks, and nothing on
the decode side waits for it). The node asks it over its rank channel (rank_channel.py), not
through the TP group. In push mode it progresses its passive NIXL side and waits for the
writers' PushDone (pd_push.PushInbox).
Its channel server, lease keeper and poller thread close in close().
"""
from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from typing import Any

import msgspec
import numpy as np

from pdbridge.plan import PlanCache, RequestBlocks, SCRATCH, Strategy, TransferPlan
from pdbridge.plan.block_table import BlockReads
from pdbridge.spec import EngineLayout
from pdbridge.transport.copies import (check_staging, finish_plan, start_plan, start_reads,
                                      wait_reads)
from pdbridge.transport.handshake import PeerDirectory, peer_name
from pdbridge.transport.messages import (FloorProbe, ProtocolError, PushDone, ReadDone, decode,
                                         encode)
from pdbridge.transport.transport import ReadList

from . import checksums
from .lease_keeper import LeaseKeeper
from .pd_calls import (AwaitPush, ChooseStrategy, PDRankInfo, PDSetup, PlanAhead, PlannedAhead,
                       Pull, PullBatch, PullBatchResult, PullPhases, PullResult, RankRequest,
                       StrategyChoice)
from .pd_push import PushInbox
from .pd_rank import RankBase
from .rank_channel import LocalRank, RankChannelServer


class DecodeRank(RankBase):
    def __init__(self, worker: Any, call: PDSetup):
        super().__init__(worker, call)
        self.directory = PeerDirectory(self.layout, self.engine_id, self.rank,
                                       timeout_s=self.timeout_s, strategy=Strategy.DIRECT,
                                       add_peer=self._add_peer, key=self.key)
        self.plans = PlanCache()
        self.inbox = PushInbox(self.rank, self.layout, self._layout, self.caches.region_buffers)
        self.leases = LeaseKeeper(self.engine_id, self.rank, self.key)
        self._read_done: list[tuple[str, list[int], bytes]] = []    # (engine, ranks, msg)
        # Plans made ahead (PlanAhead) by request id, for their Pulls: bounded, as a request
        # the router gave up on is never pulled (nothing is posted or leased before its Pull).
        self._ahead: OrderedDict[str, _Pending] = OrderedDict()
        self.channel = RankChannelServer(f"{self.engine_id}-{self.rank}", self._serve,
                                         after_reply=self._send_read_done)
        if call.transfer_mode == "push":    # writes land here: progress the passive side
            self._start_poller(self._keep_push_done)

    def info(self) -> PDRankInfo:
        info = super().info()
        info.channel = self.channel.endpoint
        return info

    def local(self) -> LocalRank:
        """This rank as its node's process calls it directly (rank 0: RankChannel(local=)),
        on the node's thread; its channel server then gets no requests."""
        return LocalRank(self._serve, self._send_read_done)

    def _add_peer(self, name: str, agent: bytes) -> None:
        with self._agent_lock:
            self.transport.add_peer(name, agent)

    def _serve(self, request: RankRequest):
        """A RankRequest from the node (on the channel's thread, or the node's: local)."""
        return getattr(self, request.handler)(request)

    # ---- pull ----------------------------------------------------------------------------

    def _plan(self, prefill: EngineLayout, call: ChooseStrategy | Pull,
              strategy: Strategy) -> tuple[TransferPlan, bool]:
        return self.plans.plan(prefill, self.layout, self.rank, RequestBlocks(*call.prefill_blocks),
                               RequestBlocks(*call.decode_blocks), strategy)

    def _block_reads(self, prefill: EngineLayout, call: Pull, strategy: Strategy
                     ) -> BlockReads | None:
        """The pull as index pairs into block rows where its plan would be `direct` (no plan
        made: PlanCache.block_reads); None where it is planned: another strategy, or
        checksums on (the verification walks the plan)."""
        if call.checksums is not None:
            return None
        return self.plans.block_reads(prefill, self.layout, self.rank,
                                      RequestBlocks(*call.prefill_blocks),
                                      RequestBlocks(*call.decode_blocks), strategy)

    def choose_strategy(self, call: ChooseStrategy) -> StrategyChoice:
        """The concrete strategy this rank's plan takes (what `auto` resolves to here). A
        request that cannot be planned is reported, not raised: the pull then plans it again
        and fails it the usual way (recompute or fail)."""
        try:
            plan, _ = self._plan(self._layout(call.prefill_layout), call, call.strategy)
        except Exception as e:
            return StrategyChoice(self.rank, call.strategy, f"{type(e).__name__}: {e}")
        return StrategyChoice(self.rank, plan.strategy)

    def pull(self, call: Pull) -> PullResult:
        pending = self._begin(call)
        return pending if isinstance(pending, PullResult) else self._end(pending)

    def pull_batch(self, call: PullBatch) -> PullBatchResult:
        """Several requests' pulls in one call: every request's reads are posted before any
        is waited for, so they are in flight together (and the node pays one round trip).
        A plan that uses this rank's scratch is read and finished alone, before the next
        request starts: scratch holds one request's bytes at a time. Each request fails or
        succeeds on its own; its ReadDone goes out when its own reads ended."""
        results: list[PullResult | None] = [None] * len(call.pulls)
        in_flight: list[tuple[int, _Pending]] = []
        for i, one in enumerate(call.pulls):
            pending = self._begin(one, post=False)
            if isinstance(pending, PullResult):
                results[i] = pending
            elif pending.error is not None or (pending.plan is not None
                                               and pending.plan.uses_decode_scratch()):
                results[i] = self._end(self._post(pending))     # failed, or alone
            else:
                in_flight.append((i, self._post(pending)))
        for i, pending in in_flight:
            results[i] = self._end(pending)
        return PullBatchResult(self.rank, results)

    def plan_ahead(self, call: PlanAhead) -> PlannedAhead:
        """Plan each pull and fetch its source ranks' metadata now (_begin without posting),
        kept for its Pull, which _begin then serves from it. A pull that fails here, or
        needs the prefill side to prepare, keeps nothing: its Pull plans it again and
        reports that."""
        planned = 0
        for pull in call.pulls:
            pending = self._begin(msgspec.structs.replace(pull, probe_nbytes=0), post=False)
            if isinstance(pending, _Pending) and pending.error is None:
                self._ahead[pull.request_id] = pending
                self._ahead.move_to_end(pull.request_id)
                planned += 1
        while len(self._ahead) > MAX_AHEAD:
            self._ahead.popitem(last=False)
        return PlannedAhead(self.rank, planned)

    def _planned_ahead(self, call: Pull) -> "_Pending | None":
        """The plan made ahead for this Pull's request, if the Pull equals the one it was made
        from in every field but those no plan depends on (deadlines, the probe) and the
        layout's form (sent whole, or named by its digest: the same digest)."""
        ahead = self._ahead.pop(call.request_id, None)
        if ahead is None:
            return None
        a = ahead.call
        same = ahead.prefill.digest == call.prefill_layout.get("digest") and a == \
            msgspec.structs.replace(call, prefill_layout=a.prefill_layout, timeout_s=a.timeout_s,
                                    renew_every_s=a.renew_every_s, probe_nbytes=a.probe_nbytes)
        return ahead if same else None

    def _begin(self, call: Pull, post: bool = True) -> "_Pending | PullResult":
        """Plan, fetch the source ranks' metadata, and (post) submit the reads; a finished
        (failed, or needs_prepare) PullResult when it cannot go on. A plan made ahead from
        the same inputs (plan_ahead) is taken instead."""
        probe = self._probe(call) if call.probe_nbytes > 0 else None
        pending = _Pending(call, time.perf_counter())
        phases = pending.phases
        if probe is not None:
            phases.probe_s, phases.probe_nbytes = probe
        ahead = self._planned_ahead(call) if self._ahead else None
        if ahead is not None:
            pending.prefill, pending.sources = ahead.prefill, ahead.sources
            pending.plan, pending.reads = ahead.plan, ahead.reads
            phases.planned_ahead, phases.block_rows = True, ahead.reads is not None
            return self._post(pending) if post else pending
        plan: TransferPlan | None = None
        try:
            prefill = self._layout(call.prefill_layout)
            # The strategy chosen earlier (ChooseStrategy), which the prefill side prepared for.
            strategy = call.strategies.get(self.rank, call.strategy)
            reads = self._block_reads(prefill, call, strategy)
            if reads is None:
                plan, phases.plan_cached = self._plan(prefill, call, strategy)
            t1 = time.perf_counter()
            phases.plan_s = 0.0 if phases.plan_cached else t1 - pending.t0
            if plan is not None and _needs_prepare(plan, call.scratch_bases, self.rank):
                return PullResult(self.rank, False, f"{plan.strategy.value} needs the prefill "
                                  f"ranks to prepare first", plan.strategy.value,
                                  plan.source_ranks(), needs_prepare=True,
                                  seconds=time.perf_counter() - pending.t0, phases=phases)
            pending.prefill = prefill
            pending.sources = (reads if reads is not None else plan).source_ranks()
            # Exactly the prefill ranks this pull reads from, each fetched once per engine.
            self.directory.get_ranks(call.prefill_engine_id, pending.sources,
                                     lambda r: call.endpoints[r])
            phases.peers_s = time.perf_counter() - t1
            if reads is not None:
                pending.reads, phases.block_rows = reads, True
            else:
                pending.plan = _with_scratch_bases(plan, call.scratch_bases)
        except Exception as e:
            pending.error = e
            if pending.plan is None:
                pending.plan = plan         # planned, then failed: the result names it
        return self._post(pending) if post else pending

    def _probe(self, call: Pull) -> tuple[float, int]:
        """One bare NIXL read, timed: call.probe_nbytes (at most this rank's scratch and the
        source's first region) as one descriptor from prefill rank (this rank mod the
        prefill TP), region 0, into this rank's scratch, then its notification (FloorProbe;
        the prefill node frees nothing for it). It runs where the pull would start, on this
        rank's agent and core, so it is the floor of the same moment: after the same wakeup,
        idle and host state, none of which a read elsewhere shares. Scratch is free here: a
        plan that uses it is read and finished before the next request's begins
        (pull_batch). (seconds, bytes); (0.0, 0) when it cannot run: a probe never fails a
        pull."""
        try:
            source = self.rank % len(call.endpoints)
            region0 = self._layout(call.prefill_layout).rank(source).regions[0].nbytes
            scratch = 0 if self.scratch is None else len(self.scratch)
            nbytes = min(call.probe_nbytes, region0, scratch)
            if nbytes <= 0:
                return 0.0, 0
            self.directory.get_ranks(call.prefill_engine_id, [source], lambda r: call.endpoints[r])
            peer = peer_name(call.prefill_engine_id, source)
            one = lambda v, dt: np.asarray([v], dt)     # noqa: E731
            reads = ReadList(one(0, np.int32), one(0, np.int64), one(SCRATCH, np.int32),
                             one(0, np.int64), one(nbytes, np.int64))
            msg = encode(FloorProbe(self.engine_id, self.rank))
            with self._agent_lock:
                t0 = time.perf_counter()
                handle = self.transport.read(peer, reads)
                try:
                    self.transport.wait(handle, call.timeout_s)
                finally:
                    self.transport.release(handle)
                self.transport.notify(peer, msg)
                return time.perf_counter() - t0, nbytes
        except Exception:
            return 0.0, 0

    def _post(self, pending: "_Pending") -> "_Pending":
        """Submit the request's reads (start_plan), its lease renewed meanwhile."""
        if pending.error is not None:
            return pending
        call, t2 = pending.call, time.perf_counter()
        pending.t_read = t2
        peers = {r: peer_name(call.prefill_engine_id, r) for r in pending.sources}
        self.leases.start(call.request_id, [call.endpoints[r] for r in pending.sources],
                          call.renew_every_s)
        try:
            if pending.reads is not None:
                with self._agent_lock:
                    pending.handles = start_reads(self.transport, pending.reads, peers)
            else:
                check_staging(pending.plan, self.scratch)
                with self._agent_lock:
                    pending.handles = start_plan(self.transport, pending.plan, peers)
        except Exception as e:
            self.leases.stop(call.request_id)
            pending.error = e
        return pending

    def _end(self, pending: "_Pending") -> PullResult:
        """Wait for the request's reads, restore, verify; then ReadDone to its sources."""
        call, phases, plan = pending.call, pending.phases, pending.plan
        if pending.error is None:
            try:
                try:
                    with self._agent_lock:
                        if pending.reads is not None:
                            wait_reads(self.transport, pending.handles, call.timeout_s)
                        else:
                            finish_plan(self.transport, plan, pending.handles,
                                        self.caches.region_buffers, self.scratch,
                                        call.timeout_s)
                finally:
                    self.leases.stop(call.request_id)
                t3 = time.perf_counter()
                phases.read_s = t3 - pending.t_read
                if call.checksums is not None:
                    self._verify(call, pending.prefill, plan)
                phases.verify_s = time.perf_counter() - t3
            except Exception as e:
                pending.error = e
        done = pending.reads if pending.reads is not None else plan
        if pending.error is None:
            result = PullResult(self.rank, True, "", done.strategy.value, pending.sources,
                                done.total_nbytes, done.num_descriptors)
        else:
            e = pending.error
            result = PullResult(self.rank, False, f"{type(e).__name__}: {e}",
                                done.strategy.value if done is not None else "",
                                done.source_ranks() if done is not None else [])
        self._notify_sources(call, result)
        result.phases = phases
        result.seconds = time.perf_counter() - pending.t0
        return result

    def _verify(self, call: Pull, prefill: EngineLayout, plan: TransferPlan) -> None:
        """Compare what landed in this rank's cache with the prefill ranks' digests."""
        blocks = RequestBlocks(*call.prefill_blocks), RequestBlocks(*call.decode_blocks)
        direct = checksums.checksum_plan(prefill, self.layout, self.rank, *blocks, plan=plan)
        expected = {p: d[self.rank] for p, d in call.checksums.items() if self.rank in d}
        checksums.verify(direct, self.caches.region_buffers, expected)

    def _notify_sources(self, call: Pull, result: PullResult) -> None:
        """Tell every prefill rank read from that this rank is done with the request, after
        ALL its reads ended, so a prefill engine never frees blocks another read still uses.
        Queued: _send_read_done sends them once the reply to the node went out."""
        msg = encode(ReadDone(call.request_id, self.engine_id, self.rank, result.ok, result.detail))
        self._read_done.append((call.prefill_engine_id, list(result.sources), msg))

    def _send_read_done(self) -> None:
        """The queued ReadDones (after the reply: on the channel's thread, or for rank 0 on
        the node's while the other ranks still read; and at close)."""
        queued, self._read_done = self._read_done, []
        for engine_id, ranks, msg in queued:
            for r in ranks:
                try:
                    with self._agent_lock:
                        self.transport.notify(peer_name(engine_id, r), msg)
                except Exception:
                    pass    # the prefill rank is gone; its lease expiry frees the blocks

    # ---- push mode (pd_push.py) ----------------------------------------------------------

    def await_push(self, call: AwaitPush) -> PullResult:
        return self.inbox.await_push(call)

    def _keep_push_done(self, message: bytes) -> None:
        try:
            msg = decode(message)
        except ProtocolError:
            return                  # a malformed notification completes nothing
        if isinstance(msg, PushDone):
            self.inbox.add(msg)

    def close(self) -> None:
        self.channel.close()        # no request runs after this
        self._send_read_done()      # what a reply that failed to go out left queued
        self.leases.close()
        super().close()


MAX_AHEAD = 256             # plans kept for their Pulls (DecodeRank._ahead)


@dataclasses.dataclass
class _Pending:
    """One request's pull between _begin and _end on this rank."""
    call: Pull
    t0: float
    phases: PullPhases = dataclasses.field(default_factory=PullPhases)
    prefill: EngineLayout | None = None
    plan: TransferPlan | None = None
    reads: BlockReads | None = None     # instead of a plan: index pairs into block rows
    sources: list[int] = dataclasses.field(default_factory=list)
    handles: list = dataclasses.field(default_factory=list)
    t_read: float = 0.0
    error: Exception | None = None


def _needs_prepare(plan: TransferPlan, bases: dict[int, dict[int, int]], decode_rank: int) -> bool:
    """The plan reads a prefill rank's scratch that no prefill rank has prepared for it."""
    return any(decode_rank not in bases.get(r, {}) for r in plan.scratch_sources())


def _with_scratch_bases(plan: TransferPlan, bases: dict[int, dict[int, int]]) -> TransferPlan:
    """Reads from a prefill rank's scratch, moved to where that rank put this rank's bytes."""
    if not plan.scratch_sources():
        return plan
    from_scratch = plan.src_region == SCRATCH
    offsets = plan.src_offset.copy()
    for r in np.unique(plan.src_rank[from_scratch]).tolist():
        try:
            base = bases[r][plan.decode_rank]
        except KeyError:
            raise RuntimeError(f"plan reads prefill rank {r}'s scratch but it prepared none "
                               f"for decode rank {plan.decode_rank}") from None
        offsets[from_scratch & (plan.src_rank == r)] += base
    return dataclasses.replace(plan, src_offset=offsets)
