"""DecodeRank: a decode TP rank's side of P/D disaggregation.

It plans its own reads of a request against the prefill layout (pure planner, each request
planned once: plan_cache.py), fetches the metadata of exactly the prefill ranks its plan reads
from (once per engine), pulls, restores, and notifies every prefill rank it read from. The node
asks it over its rank channel (rank_channel.py), not through the TP group. In push mode it
progresses its passive NIXL side and waits for the writers' PushDone (pd_push.PushInbox).
Its channel server, lease keeper and poller thread close in close().
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from pdbridge.plan import PlanCache, RequestBlocks, SCRATCH, Strategy, TransferPlan
from pdbridge.spec import EngineLayout
from pdbridge.transport.copies import execute_plan
from pdbridge.transport.handshake import PeerDirectory, peer_name
from pdbridge.transport.messages import ProtocolError, PushDone, ReadDone, decode, encode

from . import checksums
from .lease_keeper import LeaseKeeper
from .pd_calls import (AwaitPush, ChooseStrategy, PDRankInfo, PDSetup, Pull, PullPhases,
                       PullResult, RankRequest, StrategyChoice)
from .pd_push import PushInbox
from .pd_rank import RankBase
from .rank_channel import RankChannelServer


class DecodeRank(RankBase):
    def __init__(self, worker: Any, call: PDSetup):
        super().__init__(worker, call)
        self.directory = PeerDirectory(self.layout, self.engine_id, self.rank,
                                       timeout_s=self.timeout_s, strategy=Strategy.DIRECT,
                                       add_peer=self._add_peer, key=self.key)
        self.plans = PlanCache()
        self.inbox = PushInbox(self.rank, self.layout, self._layout, self.caches.region_buffers)
        self.leases = LeaseKeeper(self.engine_id, self.rank, self.key)
        self.channel = RankChannelServer(f"{self.engine_id}-{self.rank}", self._serve)
        if call.transfer_mode == "push":    # writes land here: progress the passive side
            self._start_poller(self._keep_push_done)

    def info(self) -> PDRankInfo:
        info = super().info()
        info.channel = self.channel.endpoint
        return info

    def _add_peer(self, name: str, agent: bytes) -> None:
        with self._agent_lock:
            self.transport.add_peer(name, agent)

    def _serve(self, request: RankRequest):
        """A RankRequest from the node (on the channel's thread)."""
        return getattr(self, request.handler)(request)

    # ---- pull ----------------------------------------------------------------------------

    def _plan(self, prefill: EngineLayout, call: ChooseStrategy | Pull,
              strategy: Strategy) -> tuple[TransferPlan, bool]:
        return self.plans.plan(prefill, self.layout, self.rank, RequestBlocks(*call.prefill_blocks),
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
        t0 = time.perf_counter()
        phases = PullPhases()
        plan: TransferPlan | None = None
        try:
            prefill = self._layout(call.prefill_layout)
            # The strategy chosen earlier (ChooseStrategy), which the prefill side prepared for.
            plan, phases.plan_cached = self._plan(prefill, call,
                                                  call.strategies.get(self.rank, call.strategy))
            t1 = time.perf_counter()
            phases.plan_s = 0.0 if phases.plan_cached else t1 - t0
            if _needs_prepare(plan, call.scratch_bases, self.rank):
                return PullResult(self.rank, False, f"{plan.strategy.value} needs the prefill "
                                  f"ranks to prepare first", plan.strategy.value,
                                  plan.source_ranks(), needs_prepare=True,
                                  seconds=time.perf_counter() - t0, phases=phases)
            sources = plan.source_ranks()
            # Exactly the prefill ranks this plan reads from, each fetched once per engine.
            self.directory.get_ranks(call.prefill_engine_id, sources, lambda r: call.endpoints[r])
            t2 = time.perf_counter()
            phases.peers_s = t2 - t1
            plan = _with_scratch_bases(plan, call.scratch_bases)
            self._read(call, plan, sources)
            t3 = time.perf_counter()
            phases.read_s = t3 - t2
            if call.checksums is not None:
                self._verify(call, prefill, plan)
            phases.verify_s = time.perf_counter() - t3
            result = PullResult(self.rank, True, "", plan.strategy.value, sources,
                                plan.total_nbytes, plan.num_descriptors)
        except Exception as e:
            result = PullResult(self.rank, False, f"{type(e).__name__}: {e}",
                                plan.strategy.value if plan else "",
                                plan.source_ranks() if plan else [])
        t4 = time.perf_counter()
        self._notify_sources(call, result)
        phases.notify_s = time.perf_counter() - t4
        result.phases = phases
        result.seconds = time.perf_counter() - t0
        return result

    def _read(self, call: Pull, plan: TransferPlan, sources: list[int]) -> None:
        peers = {r: peer_name(call.prefill_engine_id, r) for r in sources}
        self.leases.start(call.request_id, [call.endpoints[r] for r in sources],
                          call.renew_every_s)
        try:
            with self._agent_lock:
                execute_plan(self.transport, plan, peers, self.caches.region_buffers,
                             self.scratch, call.timeout_s)
        finally:
            self.leases.stop(call.request_id)

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
                with self._agent_lock:
                    self.transport.notify(peer_name(call.prefill_engine_id, r), msg)
            except Exception:
                pass        # the prefill rank is gone; its lease expiry frees the blocks

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
        self.leases.close()
        super().close()


def _needs_prepare(plan: TransferPlan, bases: dict[int, dict[int, int]], decode_rank: int) -> bool:
    """The plan reads a prefill rank's scratch that no prefill rank has prepared for it."""
    ranks = np.unique(plan.src_rank[plan.src_region == SCRATCH]).tolist()
    return any(decode_rank not in bases.get(r, {}) for r in ranks)


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
