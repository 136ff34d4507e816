"""Sharding rules and EngineLayout: ranges per rank, byte offsets, padding, errors."""
import itertools

import pytest
from hypothesis import given, settings, strategies as st

from pdbridge.spec import (BLOCK, FULL, REPLICATE_WHEN_FEWER, SPLIT, TOKEN, AttnLayout,
                           CacheConfig, ConvLayout, EngineLayout, LayoutError, get_preset,
                           groups_of_heads, load_model_spec, split_by)


def test_split_covers_every_unit_once_for_any_tp():
    for n, t in itertools.product(range(1, 13), range(1, 13)):
        if t > n:
            continue
        ranges = [SPLIT.units(n, t, r) for r in range(t)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_split_by_whole_heads():
    assert [split_by(8).units(96, 3, r) for r in range(3)] == [(0, 32), (32, 64), (64, 96)]
    assert split_by(64).units(8192, 3, 1) == (42 * 64, 85 * 64)


def test_replicate_when_fewer():
    assert [REPLICATE_WHEN_FEWER.units(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert REPLICATE_WHEN_FEWER.units(8, 4, 3) == (6, 8)
    assert FULL.units(5, 3, 2) == (0, 5)


def test_groups_of_heads_rules():
    # REFERENCE.md: Q=6, K=2, t=3: rank 1 holds query heads 2 and 3, hence both KV heads.
    rule = groups_of_heads(6)
    assert [rule.units(2, 3, r) for r in range(3)] == [(0, 1), (0, 2), (1, 2)]
    # n_groups = 1: every rank holds the one group.
    assert all(groups_of_heads(128).units(1, 4, r) == (0, 1) for r in range(4))
    # Where t divides, it equals split / replicate_when_fewer.
    for n, t in [(8, 4), (8, 16), (2, 8)]:
        for r in range(t):
            assert groups_of_heads(32).units(n, t, r) == REPLICATE_WHEN_FEWER.units(n, t, r)


def test_impossible_tp_names_field_and_working_sizes():
    # 3 heads: TP 4 leaves a rank without a head.
    with pytest.raises(LayoutError, match=r"tp_size=4: rank \d would hold no x units.*"
                                          r"TP sizes that work: 1-3$"):
        _layout_with_mamba_heads(3, 4)


def _layout_with_mamba_heads(heads, tp):
    spec = load_model_spec(dict(model_type="bamba", hidden_size=64, num_hidden_layers=1,
                                num_attention_heads=3, num_key_value_heads=3,
                                mamba_n_heads=heads, mamba_d_head=4, mamba_d_state=4,
                                mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2))
    return EngineLayout(spec, tp)


def test_cache_config_errors_name_the_field():
    with pytest.raises(LayoutError, match="conv_layout='XY'; allowed: SD, DS"):
        CacheConfig(conv_layout="XY")
    with pytest.raises(LayoutError, match="num_blocks must be >= 1"):
        CacheConfig(num_blocks=0)
    with pytest.raises(LayoutError, match="kernel_block_tokens=12 must divide block_tokens=16"):
        EngineLayout(get_preset("nemotron-h-8b"), 2, CacheConfig(block_tokens=16, kernel_block_tokens=12))


def test_page_padding_derives_block_tokens():
    spec = get_preset("nemotron-h-8b")
    for tp in (1, 2, 4):
        layout = EngineLayout(spec, tp, CacheConfig(num_blocks=2, page_padding=True))
        rank = layout.rank(0)
        attn = next(r for r in rank.regions if r.paged)
        state = next(r for r in rank.regions if not r.paged)
        assert layout.block_tokens % layout.kernel_block_tokens == 0
        # An attention page holds a state page; state pages are padded to it.
        assert attn.page_nbytes(2) >= state.page_nbytes(2)
        assert state.page_nbytes(2) == layout.state_page_nbytes
        smaller = EngineLayout(spec, tp, CacheConfig(num_blocks=2, page_padding=True,
                                                    block_tokens=layout.block_tokens))
        assert smaller.block_tokens == layout.block_tokens
    with pytest.raises(LayoutError, match="block_tokens=16 is too small with page_padding"):
        EngineLayout(spec, 1, CacheConfig(page_padding=True, block_tokens=16)).block_tokens


TINY = dict(model_type="falcon_h1", hidden_size=16, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=4, mamba_d_ssm=24, mamba_n_heads=6, mamba_d_head=4,
            mamba_d_state=3, mamba_n_groups=2, mamba_d_conv=3, mamba_expand=2, dtype="float32")


@settings(max_examples=40, deadline=None)
@given(tp=st.sampled_from([1, 2, 3, 6]), conv=st.sampled_from(list(ConvLayout)),
       attn=st.sampled_from(list(AttnLayout)), packed=st.booleans(), padding=st.booleans(),
       kbt=st.sampled_from([1, 2, 4]), interleave=st.booleans())
def test_offsets_are_distinct_and_inside_regions(tp, conv, attn, packed, padding, kbt, interleave):
    """Every element of every rank has its own bytes inside its region (no overlaps)."""
    layout = EngineLayout(load_model_spec(TINY), tp, CacheConfig(
        num_blocks=2, block_tokens=4, kernel_block_tokens=kbt, conv_layout=conv,
        attn_layout=attn, kv_packed=packed, page_padding=False, layer_interleave=interleave))
    for r in range(tp):
        rank = layout.rank(r)
        seen = set()
        for tl in rank.tensors:
            names = [d.name for d in tl.tensor.dims if d.name not in (BLOCK, TOKEN, tl.tensor.sharded_dim)]
            extents = [tl.axis(n).extent for n in names]
            tokens = range(layout.block_tokens) if tl.tensor.paged else [0]
            for s, seg in enumerate(tl.tensor.segments):
                u0, u1 = tl.seg_units[s]
                for block, token, unit, el, *inner in itertools.product(
                        range(2), tokens, range(u0, u1), range(seg.unit_size), *map(range, extents)):
                    region, off = layout.offset(r, tl.key[0], tl.key[1], block, seg.name, unit, el,
                                                token, dict(zip(names, inner)))
                    assert 0 <= off and off + tl.itemsize <= rank.regions[region].nbytes
                    assert (region, off) not in seen
                    seen.add((region, off))
        assert len(seen) * 4 <= rank.nbytes     # float32: every byte belongs to one element at most


def test_unheld_unit_has_no_offset():
    layout = EngineLayout(get_preset("nemotron-h-8b"), 4)
    assert layout.offset(1, 0, "conv", 0, "x", 0) is None
    assert layout.offset(1, 0, "conv", 0, "x", 2048) is not None


def test_layer_interleave_makes_one_run_per_segment_across_layers():
    """nemotron-h-8b, TP 1 -> 4: with layers interleaved a decode rank's SSM heads of all 24
    Mamba layers are one contiguous run on both sides (and each conv segment one run)."""
    from pdbridge.plan import RequestBlocks, plan_transfer
    spec = get_preset("nemotron-h-8b")
    cfg = CacheConfig(num_blocks=2, layer_interleave=True, attn_layout="heads_across_blocks")
    p, d = EngineLayout(spec, 1, cfg), EngineLayout(spec, 4, cfg)
    assert sum(not r.paged for r in p.rank(0).regions) == 1
    blocks = RequestBlocks(16, (0,), 1)
    plan = plan_transfer(p, d, 2, blocks, blocks, "direct")
    assert plan.total_nbytes == plan.minimal_nbytes
    # 3 conv segments + 1 SSM run; KV: per (K/V, kv head, layer) the request's block (the
    # pool's other block lies between two layers' rows).
    assert plan.num_descriptors == 3 + 1 + 2 * 2 * 4


@pytest.mark.parametrize("interleave", [False, True])
def test_zone_origins_start_every_slab_on_the_zone_grid(interleave):
    from pdbridge.spec.layout import ZONE_ALIGN
    cache = CacheConfig(num_blocks=3, attn_layout="heads_across_blocks", page_padding=True,
                        layer_interleave=interleave)
    rank = EngineLayout(get_preset("nemotron-h-8b"), 2, cache).rank(1)
    zones = rank.zone_origins
    assert len(zones) == len(rank.regions)
    for z, region in zip(zones, rank.regions):
        assert z[0] == 0 and (z % ZONE_ALIGN == 0).all() and (z[1:] > z[:-1]).all()
        assert z[-1] < region.nbytes
    for tl in rank.tensors:
        outer = tl.axes[:tl.tensor.dim_index(BLOCK)] or tl.axes[:1]     # dims outside the block
        for idx in itertools.product(*(range(a.extent) for a in outer)):
            start = tl.base + sum(i * a.stride for i, a in zip(idx, outer))
            assert start // ZONE_ALIGN * ZONE_ALIGN in zones[tl.region]
