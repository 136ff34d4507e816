"""PlanCache against plan_transfer, its reference: a cached plan is the plan a fresh call
makes, for every strategy (auto under the concrete strategy it chose too), on random cases."""
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from plan_cases import cases
from pdbridge.plan import CopyList, PlanCache, RequestBlocks, Strategy, plan_transfer


def same_plan(a, b) -> bool:
    """Field by field: arrays element-wise, copy lists run by run."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            if not np.array_equal(x, y):
                return False
        elif isinstance(x, CopyList):
            if not same_copies(x, y):
                return False
        elif f.name == "prefill_reorder":
            if x.keys() != y.keys() or not all(same_copies(x[k], y[k]) for k in x):
                return False
        elif x != y:
            return False
    return True


def same_copies(x: CopyList, y: CopyList) -> bool:
    return all(np.array_equal(getattr(x, f.name), getattr(y, f.name))
               for f in dataclasses.fields(x))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cases())
def test_a_cached_plan_is_the_fresh_plan(case):
    cache = PlanCache()
    args = (case.prefill, case.decode, 0, case.prefill_blocks, case.decode_blocks)
    first, hit = cache.plan(*args, case.strategy)
    assert not hit
    again, hit = cache.plan(*args, case.strategy)
    assert hit and again is first
    fresh = plan_transfer(*args, case.strategy)
    assert same_plan(again, fresh)
    # What the pull asks after `auto` chose: the concrete strategy, served from the cache.
    concrete, hit = cache.plan(*args, fresh.strategy)
    assert hit == (case.strategy is Strategy.AUTO or case.strategy is fresh.strategy)
    assert same_plan(concrete, plan_transfer(*args, fresh.strategy))


def test_the_comparison_can_fail():
    """same_plan tells plans apart that differ in one offset."""
    from pdbridge.spec import CacheConfig, EngineLayout, get_preset
    layout = EngineLayout(get_preset("nemotron-h-8b"), 1, CacheConfig(num_blocks=4))
    blocks = RequestBlocks(8, (0,), 0)
    plan = plan_transfer(layout, layout, 0, blocks, blocks)
    moved = dataclasses.replace(plan, dst_offset=plan.dst_offset + 1)
    assert same_plan(plan, plan) and not same_plan(plan, moved)


def test_other_inputs_miss_and_old_plans_are_evicted():
    from pdbridge.spec import CacheConfig, EngineLayout, get_preset
    layout = EngineLayout(get_preset("nemotron-h-8b"), 1, CacheConfig(num_blocks=4))
    cache = PlanCache(max_plans=2)
    a, b, c = (RequestBlocks(8, (i,), i) for i in range(3))
    for blocks in (a, b):
        assert not cache.plan(layout, layout, 0, blocks, blocks, "direct")[1]
    assert cache.plan(layout, layout, 0, a, a, "direct")[1]          # a is now the newest
    assert not cache.plan(layout, layout, 0, a, b, "direct")[1]      # another decode table
    assert len(cache) == 2
    assert not cache.plan(layout, layout, 0, b, b, "direct")[1]      # b was evicted
    with pytest.raises(ValueError, match="max_plans"):
        PlanCache(max_plans=0)
    assert not cache.plan(layout, layout, 0, c, c, "staging")[1]


def _random_blocks(rng, layout, num_tokens: int) -> RequestBlocks:
    need = -(-num_tokens // layout.block_tokens)
    ids = rng.choice(layout.num_blocks, size=need + int(rng.integers(0, 2)), replace=False)
    if rng.random() < 0.4:                      # runs of consecutive ids, edges included
        start = int(rng.integers(0, layout.num_blocks - len(ids) + 1))
        ids = np.arange(start, start + len(ids))
    return RequestBlocks(num_tokens, tuple(int(b) for b in ids),
                         int(rng.integers(0, layout.num_blocks)))


@pytest.mark.parametrize("preset,p_tp,d_tp,cfg", [
    ("nemotron-h-8b", 1, 2, {}),
    ("nemotron-h-8b", 2, 1, {"attn_layout": "heads_across_blocks"}),
    ("nemotron-h-8b", 3, 2, {"kernel_block_tokens": 8, "block_tokens": 32}),
    ("granite-4.0-h-small", 2, 4, {"conv_layout": "SD"}),
    ("falcon-h1-7b", 2, 3, {}),
    ("jamba-mini-1.5", 1, 2, {"attn_layout": "heads_across_blocks"}),
    ("qwen3-next-80b-a3b", 1, 4, {"layer_interleave": True}),
    ("lfm2-1.2b", 2, 1, {}),
])
def test_assembled_plans_are_fresh_plans_across_requests(preset, p_tp, d_tp, cfg):
    """One cache serving many requests (token counts, block ids, edges, state blocks,
    strategies) assembles each plan from its one-block runs; every one equals a fresh
    plan_transfer, and none of them comes from the exact-input cache."""
    from pdbridge.spec import CacheConfig, EngineLayout, get_preset
    spec = get_preset(preset)
    prefill = EngineLayout(spec, p_tp, CacheConfig(num_blocks=12, **cfg))
    decode = EngineLayout(spec, d_tp, CacheConfig(
        num_blocks=9, **{**cfg, "conv_layout": "DS" if cfg.get("conv_layout") == "SD" else "SD"}))
    rng = np.random.default_rng(len(preset) * 10 + p_tp * 3 + d_tp)
    cache = PlanCache()
    bt = decode.block_tokens
    for i in range(24):
        n = int(rng.integers(1, 4 * bt + 1))
        pb, db = _random_blocks(rng, prefill, n), _random_blocks(rng, decode, n)
        rank = int(rng.integers(0, d_tp))
        strategy = [Strategy.DIRECT, Strategy.AUTO, Strategy.STAGING, Strategy.PERMUTE][i % 4]
        got, hit = cache.plan(prefill, decode, rank, pb, db, strategy)
        assert not hit
        assert same_plan(got, plan_transfer(prefill, decode, rank, pb, db, strategy)), (i, n, pb, db)
    assert cache.misses == 24 and len(cache._runs) <= d_tp


def test_assembly_needs_equal_block_sizes_and_refuses_like_the_planner():
    """Engines with other block sizes are planned fresh; bad requests raise what
    plan_transfer raises."""
    from pdbridge.spec import CacheConfig, EngineLayout, get_preset
    spec = get_preset("nemotron-h-8b")
    p = EngineLayout(spec, 1, CacheConfig(num_blocks=8, block_tokens=16))
    d = EngineLayout(spec, 2, CacheConfig(num_blocks=8, block_tokens=32))
    pb, db = RequestBlocks(40, (1, 2, 3), 0), RequestBlocks(40, (4, 5), 1)
    cache = PlanCache()
    assert same_plan(cache.plan(p, d, 1, pb, db, "direct")[0], plan_transfer(p, d, 1, pb, db))
    assert not cache._runs
    for bad in (RequestBlocks(40, (1, 2), 0), RequestBlocks(40, (1, 1, 2), 0),
                RequestBlocks(16, (1,), 8)):
        with pytest.raises(ValueError) as fresh:
            plan_transfer(p, p, 0, bad, bad)
        with pytest.raises(ValueError, match=str(fresh.value).split(":")[0]):
            cache.plan(p, p, 0, bad, bad, "direct")


@pytest.mark.parametrize("preset,p_tp,d_tp,cfg", [
    ("nemotron-h-8b", 1, 2, {}),
    ("nemotron-h-8b", 3, 2, {"kernel_block_tokens": 8, "block_tokens": 32}),
    ("jamba-mini-1.5", 1, 2, {"attn_layout": "heads_across_blocks"}),
    ("lfm2-1.2b", 2, 1, {}),
])
def test_moved_runs_are_the_assembled_runs(preset, p_tp, d_tp, cfg):
    """direct(): a token count's runs kept at block ids 0 and moved to each request's ids;
    direct_slow(), its reference, assembles them afresh: the same runs in the same order, the
    same groups, for every token count (tails, whole blocks) and any block ids; and the kept
    arrays cannot be written through a plan."""
    from pdbridge.plan.plan_cache import _BlockRuns
    from pdbridge.spec import CacheConfig, EngineLayout, get_preset
    spec = get_preset(preset)
    prefill = EngineLayout(spec, p_tp, CacheConfig(num_blocks=12, **cfg))
    decode = EngineLayout(spec, d_tp, CacheConfig(num_blocks=9, **cfg))
    rng = np.random.default_rng(p_tp * 7 + d_tp)
    runs = _BlockRuns(prefill, decode, d_tp - 1)
    bt = decode.block_tokens
    for n in [*range(1, 2 * bt + 2), 4 * bt, 4 * bt - 1] * 2:    # each count kept, then reused
        pb, db = _random_blocks(rng, prefill, n), _random_blocks(rng, decode, n)
        fast, slow = runs.direct(pb, db), runs.direct_slow(pb, db)
        for part in ("paged", "state"):
            a, b = getattr(fast, part), getattr(slow, part)
            for f in dataclasses.fields(a):
                assert np.array_equal(getattr(a, f.name), getattr(b, f.name)), (n, part, f.name)
        assert fast.groups == slow.groups and fast.minimal_nbytes == slow.minimal_nbytes
    kept = runs._whole[1].runs if len(runs.full) else runs._state_moves.runs
    with pytest.raises(ValueError, match="read-only"):
        kept.src_offset[0] += 1


# Layout pairs whose direct reads are assembled (test_block_table.py reads them too).
LAYOUT_PAIRS = [
    ("nemotron-h-8b", 1, 2, {}),
    ("nemotron-h-8b", 3, 2, {"kernel_block_tokens": 8, "block_tokens": 32}),
    ("granite-4.0-h-small", 2, 4, {"conv_layout": "SD"}),
    ("jamba-mini-1.5", 1, 2, {"attn_layout": "heads_across_blocks"}),
    ("qwen3-next-80b-a3b", 1, 4, {"layer_interleave": True}),
    ("lfm2-1.2b", 2, 1, {}),
]


@pytest.mark.parametrize("preset,p_tp,d_tp,cfg", LAYOUT_PAIRS)
def test_packed_direct_plans_are_the_assembled_direct_plans(preset, p_tp, d_tp, cfg):
    """direct_plan() (one matrix, the path a pull takes for `direct`) against its reference,
    plan_from_direct over direct()'s runs: the same plan for every token count (tails, whole
    blocks, one token) and any block ids, contiguous ones (long merged runs) included; and it
    never writes the kept runs."""
    from pdbridge.plan.plan_cache import _BlockRuns
    from pdbridge.plan.planner import plan_from_direct
    from pdbridge.spec import CacheConfig, EngineLayout, get_preset
    spec = get_preset(preset)
    prefill = EngineLayout(spec, p_tp, CacheConfig(num_blocks=12, **cfg))
    decode = EngineLayout(spec, d_tp, CacheConfig(num_blocks=9, **cfg))
    rng = np.random.default_rng(p_tp * 5 + d_tp)
    rank = d_tp - 1
    runs = _BlockRuns(prefill, decode, rank)
    bt = decode.block_tokens
    for i, n in enumerate([*range(1, 2 * bt + 2), 4 * bt, 4 * bt - 1] * 2):
        pb, db = _random_blocks(rng, prefill, n), _random_blocks(rng, decode, n)
        if i % 3 == 0:          # contiguous ids on both sides: runs merge across blocks
            nb = len(pb.attn_blocks)
            pb = RequestBlocks(n, tuple(range(nb)), pb.state_block)
            db = RequestBlocks(n, tuple(range(1, nb + 1)), db.state_block)
        fast = runs.direct_plan(pb, db)
        slow = plan_from_direct(runs.direct(pb, db), prefill, pb, rank, Strategy.DIRECT)
        assert same_plan(fast, slow), (n, pb, db)
        assert fast.src_rank.dtype == np.int32 and fast.src_offset.dtype == np.int64
    assert not runs._state_moves.packed.flags.writeable
