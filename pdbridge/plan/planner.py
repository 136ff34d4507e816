"""plan_transfer: every read one decode rank makes for one request (DESIGN.md sections 2, 4).

direct runs (per tensor, segment, source) -> strategy rewrite of the state runs -> coalescing
of everything adjacent on both sides -> TransferPlan with per-group report.
"""
from __future__ import annotations

import numpy as np

from pdbridge.spec import EngineLayout

from .cost_model import CostModel
from .direct_reads import DirectReads, direct_reads
from .run_list import RunList
from .strategies import StateRewrite, permute, split_small, staging
from .transfer_plan import CopyList, ReadGroup, RequestBlocks, Strategy, TransferPlan
from .validation import check_geometry, check_request

CONCRETE = (Strategy.DIRECT, Strategy.STAGING, Strategy.PERMUTE)


def parse_strategy(strategy: Strategy | str) -> Strategy:
    if isinstance(strategy, Strategy):
        return strategy
    try:
        return Strategy(strategy)
    except ValueError:
        raise ValueError(f"strategy={strategy!r}; allowed: "
                         f"{', '.join(s.value for s in Strategy)}") from None


def plan_transfer(prefill_layout: EngineLayout, decode_layout: EngineLayout, decode_rank: int,
                  prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks,
                  strategy: Strategy | str = "direct",
                  cost_model: CostModel | None = None) -> TransferPlan:
    """The reads decode rank `decode_rank` makes to receive its shard of one request.

    With `auto` the returned plan's `strategy` is the concrete strategy the cost model chose.
    """
    strategy = parse_strategy(strategy)
    check_geometry(prefill_layout, decode_layout)
    check_request(prefill_layout, decode_layout, decode_rank, prefill_blocks, decode_blocks)
    direct = direct_reads(prefill_layout, decode_layout, decode_rank, prefill_blocks,
                          decode_blocks)
    return plan_from_direct(direct, prefill_layout, prefill_blocks, decode_rank, strategy,
                            cost_model)


def plan_from_direct(direct: DirectReads, prefill_layout: EngineLayout,
                     prefill_blocks: RequestBlocks, decode_rank: int, strategy: Strategy,
                     cost_model: CostModel | None = None) -> TransferPlan:
    """The plan from a request's direct runs (direct_reads, or the same runs assembled
    another way: plan_cache.py): the strategy's rewrite, coalescing, `auto`'s choice."""
    if strategy is not Strategy.AUTO:
        return _build(strategy, direct, prefill_layout, prefill_blocks, decode_rank)
    model = cost_model or CostModel()
    plans = [_build(s, direct, prefill_layout, prefill_blocks, decode_rank) for s in CONCRETE]
    return min(plans, key=model.plan_us)      # ties: the first, i.e. the simplest


def _build(strategy: Strategy, direct: DirectReads, prefill: EngineLayout,
           prefill_blocks: RequestBlocks, decode_rank: int) -> TransferPlan:
    if strategy is Strategy.DIRECT:
        rewrite, large = StateRewrite(direct.state, RunList.empty(), 0, {}, {}), RunList.empty()
    else:
        small, large = split_small(direct.state.coalesced())   # size runs as they will be read
        if strategy is Strategy.STAGING:
            rewrite = staging(small, lambda rank, region: prefill.rank(rank).zone_origins[region])
        else:
            rewrite = permute(small)
    reads = RunList.concat([direct.paged, large, rewrite.reads]).coalesced()
    restore = rewrite.restore.as_copy_list() if len(rewrite.restore) else CopyList.empty()
    return TransferPlan(
        decode_rank=decode_rank, strategy=strategy,
        src_rank=reads.src_rank, src_region=reads.src_region, src_offset=reads.src_offset,
        dst_region=reads.dst_region, dst_offset=reads.dst_offset, nbytes=reads.nbytes,
        staging_nbytes=rewrite.staging_nbytes,
        prefill_scratch_nbytes=dict(rewrite.scratch_nbytes),
        prefill_reorder=dict(rewrite.reorder), decode_restore=restore,
        groups=_groups(direct, reads), minimal_nbytes=direct.minimal_nbytes)


def _groups(direct: DirectReads, reads: RunList) -> tuple[ReadGroup, ...]:
    """A descriptor counts for the group of its first run (a merged descriptor may span
    several groups), so the groups' descriptors sum to the plan's."""
    counts = np.bincount(reads.group, minlength=len(direct.groups)) if len(reads) else \
        np.zeros(len(direct.groups), np.int64)
    return tuple(ReadGroup(*g, c) for g, c in zip(direct.groups, counts.tolist()))
