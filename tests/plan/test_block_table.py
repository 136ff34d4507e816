"""BlockTable (block_table.py): a request's direct reads as index pairs into rows made once per
layout pair. Its reference is plan_transfer's DIRECT plan: the index pairs, expanded to runs
and coalesced, must be that plan's runs, for every token count and any block ids; and
PlanCache.block_reads must answer exactly where the plan it stands for is `direct`."""
from __future__ import annotations

import numpy as np
import pytest

from pdbridge.plan import PlanCache, RequestBlocks, Strategy, plan_transfer
from pdbridge.plan.block_table import COUNT, NBYTES, OFFSET, REGION, STRIDE
from pdbridge.spec import CacheConfig, EngineLayout, get_preset

from test_plan_cache import LAYOUT_PAIRS, _random_blocks

PAIRS = LAYOUT_PAIRS + [("falcon-h1-7b", 2, 2, {})]


def _plan_runs(plan):
    """A plan's reads as sortable rows (src rank, region, offset, dst region, offset, bytes)."""
    rows = np.stack([plan.src_rank, plan.src_region, plan.src_offset, plan.dst_region,
                     plan.dst_offset, plan.nbytes]).astype(np.int64)
    return rows[:, np.lexsort(rows[::-1])]


def _expanded(reads):
    """The index pairs expanded back to runs and coalesced as a plan's are."""
    runs = reads.runs().coalesced()
    rows = np.stack([runs.src_rank, runs.src_region, runs.src_offset, runs.dst_region,
                     runs.dst_offset, runs.nbytes]).astype(np.int64)
    return rows[:, np.lexsort(rows[::-1])]


@pytest.mark.parametrize("preset,p_tp,d_tp,cfg", PAIRS)
def test_block_reads_are_the_direct_plans_reads(preset, p_tp, d_tp, cfg):
    spec = get_preset(preset)
    prefill = EngineLayout(spec, p_tp, CacheConfig(num_blocks=12, **cfg))
    decode = EngineLayout(spec, d_tp, CacheConfig(num_blocks=9, **cfg))
    rng = np.random.default_rng(p_tp * 11 + d_tp)
    cache = PlanCache()
    bt = decode.block_tokens
    for rank in range(d_tp):
        for i, n in enumerate([*range(1, 2 * bt + 2), 4 * bt, 4 * bt - 1]):
            pb, db = _random_blocks(rng, prefill, n), _random_blocks(rng, decode, n)
            if i % 3 == 0:      # contiguous ids on both sides: runs merge across blocks
                nb = len(pb.attn_blocks)
                pb = RequestBlocks(n, tuple(range(nb)), pb.state_block)
                db = RequestBlocks(n, tuple(range(1, nb + 1)), db.state_block)
            reads = cache.block_reads(prefill, decode, rank, pb, db, Strategy.DIRECT)
            plan = plan_transfer(prefill, decode, rank, pb, db, Strategy.DIRECT)
            assert reads is not None
            assert np.array_equal(_expanded(reads), _plan_runs(plan)), (rank, n, pb, db)
            assert reads.total_nbytes == plan.total_nbytes
            assert reads.source_ranks() == plan.source_ranks()
            assert len(reads.bounds) == len(reads.reads)
            for (rows, idx, _), (lo, *hi) in zip(reads.reads, reads.bounds):
                assert idx.dtype == np.int32 and idx.shape[0] == 2
                assert lo == idx.min() and hi == idx.max(axis=1).tolist()   # the bounds made
                for side in (0, 1):
                    assert 0 <= idx[side].min() and idx[side].max() < rows.entries[side]


@pytest.mark.parametrize("preset,p_tp,d_tp,cfg", PAIRS[:4])
def test_block_reads_answer_where_auto_plans_direct(preset, p_tp, d_tp, cfg):
    """`auto`: the table answers exactly for the requests whose plan is `direct`; other
    strategies are never answered (they are planned)."""
    spec = get_preset(preset)
    prefill = EngineLayout(spec, p_tp, CacheConfig(num_blocks=12, **cfg))
    decode = EngineLayout(spec, d_tp, CacheConfig(num_blocks=9, **cfg))
    rng = np.random.default_rng(p_tp * 13 + d_tp)
    cache = PlanCache()
    for n in range(1, 3 * decode.block_tokens, 3):
        pb, db = _random_blocks(rng, prefill, n), _random_blocks(rng, decode, n)
        plan, _ = cache.plan(prefill, decode, 0, pb, db, Strategy.AUTO)
        reads = cache.block_reads(prefill, decode, 0, pb, db, Strategy.AUTO)
        assert (reads is not None) == (plan.strategy is Strategy.DIRECT), (n, plan.strategy)
        assert cache.block_reads(prefill, decode, 0, pb, db, Strategy.STAGING) is None


def test_rows_stay_inside_their_regions():
    """Every entry of every row (offset + k x stride, k < count) ends inside its region, on
    both sides: what the transport checks once before preparing them."""
    spec = get_preset("nemotron-h-8b")
    prefill = EngineLayout(spec, 1, CacheConfig(num_blocks=12))
    decode = EngineLayout(spec, 2, CacheConfig(num_blocks=9))
    cache = PlanCache()
    pb = RequestBlocks(20, (3, 4), 5)
    db = RequestBlocks(20, (1, 7), 2)
    reads = cache.block_reads(prefill, decode, 1, pb, db, Strategy.DIRECT)
    for rows, _, _ in reads.reads:
        for table, rank in ((rows.remote, prefill.rank(rows.prefill_rank)),
                            (decode_rows := rows.local, decode.rank(1))):
            sizes = np.array([r.nbytes for r in rank.regions])
            last = table[:, OFFSET] + (table[:, COUNT] - 1) * table[:, STRIDE] + table[:, NBYTES]
            assert (table[:, OFFSET] >= 0).all() and (last <= sizes[table[:, REGION]]).all()
    assert not decode_rows.flags.writeable


def test_bad_block_ids_are_refused_before_any_index():
    spec = get_preset("nemotron-h-8b")
    prefill = EngineLayout(spec, 1, CacheConfig(num_blocks=12))
    decode = EngineLayout(spec, 2, CacheConfig(num_blocks=9))
    cache = PlanCache()
    with pytest.raises(ValueError, match="block id 9 >= num_blocks 9"):
        cache.block_reads(prefill, decode, 0, RequestBlocks(20, (3, 4), 5),
                          RequestBlocks(20, (1, 9), 2), Strategy.DIRECT)
    with pytest.raises(ValueError, match="state_block=12"):
        cache.block_reads(prefill, decode, 0, RequestBlocks(20, (3, 4), 12),
                          RequestBlocks(20, (1, 2), 2), Strategy.DIRECT)
