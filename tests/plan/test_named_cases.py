"""Named planner cases: real model geometries and the tricky TP pairs."""
from __future__ import annotations

import pytest

from pdbridge.plan import CostModel, RequestBlocks, Strategy, plan_transfer
from pdbridge.spec import (AttentionSpec, CacheConfig, EngineLayout, FfnKind, LayerSpec,
                           Mamba2Spec, MixerKind, ModelSpec, get_preset)

from plan_harness import check_all_ranks


def _layouts(spec, p, d, num_blocks=8, **cache):
    cfg = CacheConfig(num_blocks=num_blocks, **cache)
    return EngineLayout(spec, p, cfg), EngineLayout(spec, d, cfg)


def _blocks(layout, num_tokens, first=0):
    n = -(-num_tokens // layout.block_tokens)
    return RequestBlocks(num_tokens, tuple(range(first, first + n)), first)


def _reads_into(plan, region):
    return [(int(o), int(n)) for r, o, n in zip(plan.dst_region, plan.dst_offset, plan.nbytes)
            if r == region]


def test_nemotron_h_8b_p1_d4_ds_direct():
    spec = get_preset("nemotron-h-8b")
    prefill, decode = _layouts(spec, 1, 4, conv_layout="DS")
    pb, db = _blocks(prefill, 64), _blocks(decode, 64, first=2)
    mamba = [l.index for l in spec.layers_with(MixerKind.MAMBA2)]
    for j in range(4):
        plan = plan_transfer(prefill, decode, j, pb, db, "direct")
        assert plan.total_nbytes == plan.minimal_nbytes
        for layer in mamba:
            conv, ssm = decode.rank(j).tensor(layer, "conv"), decode.rank(j).tensor(layer, "ssm")
            page = db.state_block * conv.axis("block").stride
            reads = [o - page for o, _ in _reads_into(plan, conv.region)]
            assert sum(o < ssm.base for o in reads) == 3          # x, B, C: one run each
            assert sum(o >= ssm.base for o in reads) == 1         # the SSM heads: one run
            x = [g for g in plan.groups if g.layer == layer and g.segment == "x"]
            assert [g.global_range for g in x] == [(2048 * j, 2048 * (j + 1))]


@pytest.mark.parametrize("p", [1, 4])
def test_granite_single_group_reaches_every_decode_rank(p):
    spec = get_preset("granite-4.0-h-small")                         # n_groups = 1
    m = spec.layers_with(MixerKind.MAMBA2)[0].mixer(MixerKind.MAMBA2)
    prefill, decode = _layouts(spec, p, 2)
    pb, db = _blocks(prefill, 40), _blocks(decode, 40, first=3)
    layer = spec.layers_with(MixerKind.MAMBA2)[0].index
    for j in range(2):
        plan = plan_transfer(prefill, decode, j, pb, db, "direct")
        assert plan.total_nbytes == plan.minimal_nbytes
        got = {}
        for g in plan.groups:
            if g.layer == layer:
                got.setdefault((g.tensor, g.segment), []).append(g.global_range)
        half = m.intermediate // 2
        assert _union(got[("conv", "x")]) == (half * j, half * (j + 1))
        assert got[("conv", "B")] == [(0, 1)] and got[("conv", "C")] == [(0, 1)]
        assert _union(got[("ssm", "heads")]) == (64 * j, 64 * (j + 1))
        for seg in ("B", "C"):      # the bytes land where the decode rank keeps that group
            _assert_read(plan, prefill, decode, j, layer, seg, pb, db)


def _union(ranges):
    ranges = sorted(ranges)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    return ranges[0][0], ranges[-1][1]


def _assert_read(plan, prefill, decode, j, layer, seg, pb, db):
    """The read landing on unit 0 / element 0 of `seg` comes from that element on its source."""
    dst = decode.offset(j, layer, "conv", db.state_block, seg, 0)
    src_rank = next(g.prefill_rank for g in plan.groups if g.layer == layer and g.segment == seg)
    src = prefill.offset(src_rank, layer, "conv", pb.state_block, seg, 0)
    hits = [(int(sr), int(so) + dst[1] - int(do)) for sr, sreg, so, dreg, do, n in
            zip(plan.src_rank, plan.src_region, plan.src_offset, plan.dst_region, plan.dst_offset,
                plan.nbytes) if dreg == dst[0] and do <= dst[1] < do + n]
    assert len(hits) == 1 and hits[0] == (src_rank, src[1])


def _attn_mamba_spec(num_q, num_kv, mamba_heads=12):
    layers = (LayerSpec(0, (AttentionSpec(num_q, num_kv, 2),), FfnKind.MLP),
              LayerSpec(1, (Mamba2Spec(mamba_heads, 1, 2, 3, 3),), FfnKind.MLP))
    return ModelSpec("tiny", 8, 16, layers)


@pytest.mark.parametrize("strategy", ["direct", "staging", "permute", "auto"])
@pytest.mark.parametrize("p,d", [(3, 2), (2, 3)])
def test_twelve_kv_heads_non_divisible(p, d, strategy):
    prefill, decode = _layouts(_attn_mamba_spec(12, 12), p, d, num_blocks=6,
                               block_tokens=4, kernel_block_tokens=2)
    check_all_ranks(prefill, decode, RequestBlocks(10, (5, 1, 3), 2),
                    RequestBlocks(10, (0, 4, 2, 5), 1), strategy)


@pytest.mark.parametrize("strategy", ["direct", "permute"])
@pytest.mark.parametrize("p,d", [(3, 1), (1, 3), (3, 2), (2, 3), (3, 3), (3, 4)])
def test_eight_kv_heads_at_tp3(p, d, strategy):
    # 16 query heads at TP 3: rank 1 holds queries [5, 10), i.e. KV heads 2..4 (2 shared).
    spec = _attn_mamba_spec(16, 8)
    layout = EngineLayout(spec, 3)
    assert layout.rank(0).tensor(0, "kv").seg_units == ((0, 3),)
    assert layout.rank(1).tensor(0, "kv").seg_units == ((2, 5),)
    prefill, decode = _layouts(spec, p, d, num_blocks=5, block_tokens=3, kernel_block_tokens=3)
    check_all_ranks(prefill, decode, RequestBlocks(7, (4, 0, 2), 3),
                    RequestBlocks(7, (1, 3, 0), 0), strategy)


@pytest.mark.parametrize("tp", [1, 2])
def test_homogeneous_reads_whole_pages_merged_across_blocks(tp):
    spec = get_preset("nemotron-h-8b")
    prefill, decode = _layouts(spec, tp, tp, num_blocks=12)
    n = 6 * prefill.block_tokens                      # six full blocks, consecutive ids
    pb, db = RequestBlocks(n, tuple(range(2, 8)), 9), RequestBlocks(n, tuple(range(5, 11)), 4)
    for j in range(tp):
        plan = plan_transfer(prefill, decode, j, pb, db, "direct")
        assert plan.source_ranks() == [j]
        # One read per region: all attention pages of the request, each state page whole.
        assert plan.num_descriptors == len(decode.rank(j).regions)
        assert plan.total_nbytes == plan.minimal_nbytes


def test_homogeneous_tiny_through_oracle():
    spec = _attn_mamba_spec(12, 4)
    prefill, decode = _layouts(spec, 2, 2, num_blocks=6, block_tokens=4, kernel_block_tokens=2)
    plans = check_all_ranks(prefill, decode, RequestBlocks(8, (1, 2), 3),
                            RequestBlocks(8, (3, 4), 0), "direct")
    assert [p.source_ranks() for p in plans] == [[0], [1]]


def test_staging_and_permute_descriptor_counts():
    spec = get_preset("nemotron-h-8b")
    prefill, decode = _layouts(spec, 1, 4)
    pb, db = _blocks(prefill, 64), _blocks(decode, 64, first=2)
    n_mamba = len(spec.layers_with(MixerKind.MAMBA2))
    direct = plan_transfer(prefill, decode, 1, pb, db, "direct")
    staging = plan_transfer(prefill, decode, 1, pb, db, "staging")
    permute = plan_transfer(prefill, decode, 1, pb, db, "permute")
    kv = direct.num_descriptors - 4 * n_mamba               # 3 conv runs + 1 SSM run a layer
    # The small conv runs are rewritten; each layer's 1 MiB SSM run stays one direct read.
    assert staging.num_descriptors == kv + 2 * n_mamba      # one conv span + SSM per layer
    assert permute.num_descriptors == kv + 1 + n_mamba      # one read for all conv state + SSM
    assert permute.total_nbytes == direct.total_nbytes < staging.total_nbytes
    assert len(permute.decode_restore) == n_mamba           # [x|B|C] contiguous on decode
    assert permute.prefill_scratch_nbytes == {0: permute.staging_nbytes}


def test_auto_picks_the_cheapest():
    spec = get_preset("nemotron-h-8b")
    prefill, decode = _layouts(spec, 2, 4)
    pb, db = _blocks(prefill, 32), _blocks(decode, 32, first=1)
    for model in (CostModel(), CostModel(descriptor_us=1000.0), CostModel(copy_us=1e6),
                  CostModel(prepare_us=0.0)):
        auto = plan_transfer(prefill, decode, 0, pb, db, Strategy.AUTO, model)
        costs = {s: model.plan_us(plan_transfer(prefill, decode, 0, pb, db, s))
                 for s in ("direct", "staging", "permute")}
        assert model.plan_us(auto) == min(costs.values())
    assert plan_transfer(prefill, decode, 0, pb, db, "auto",
                         CostModel(descriptor_us=1000.0)).strategy is Strategy.PERMUTE
    assert plan_transfer(prefill, decode, 0, pb, db, "auto",
                         CostModel(copy_us=1e6)).strategy is Strategy.DIRECT


def test_the_prefill_round_trip_decides_between_permute_and_direct():
    """Permute saves descriptors but needs the prefill side to gather first: with that round
    trip free it wins where each descriptor is dear; at a round trip dearer than the
    descriptors it saves, auto reads directly."""
    spec = get_preset("nemotron-h-8b")
    prefill, decode = _layouts(spec, 2, 4)
    pb, db = _blocks(prefill, 32), _blocks(decode, 32, first=1)
    plans = {s: plan_transfer(prefill, decode, 0, pb, db, s) for s in ("direct", "permute")}
    saved = plans["direct"].num_descriptors - plans["permute"].num_descriptors
    assert saved > 0
    cheap = CostModel(descriptor_us=1000.0, prepare_us=0.0, copy_us=0.0)
    dear = CostModel(descriptor_us=1000.0, prepare_us=1000.0 * saved + 1e6, copy_us=0.0)
    assert dear.plan_us(plans["permute"]) - cheap.plan_us(plans["permute"]) == 1000.0 * saved + 1e6
    assert plan_transfer(prefill, decode, 0, pb, db, "auto", cheap).strategy is Strategy.PERMUTE
    assert plan_transfer(prefill, decode, 0, pb, db, "auto", dear).strategy is not Strategy.PERMUTE
