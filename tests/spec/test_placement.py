"""Placement: another engine's caches (vLLM's) described as data inside EngineLayout.

A placement that restates our own layout must give exactly our TensorLayouts; a vLLM-like
one (layers of different kinds sharing one buffer, heads outside K/V, packed state pages)
must plan reads the brute-force oracle agrees with; bad placements refuse naming the field.
"""
import os
import sys

import pytest

from pdbridge.plan import RequestBlocks
from pdbridge.spec import (BLOCK, TOKEN, CacheConfig, EngineLayout, LayoutError, PlacedGroup,
                           Placement, load_model_spec)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "plan"))
from plan_harness import check_all_ranks  # noqa: E402


def _nemotron(n_groups: int) -> dict:
    return {"model_type": "nemotron_h", "vocab_size": 32, "hidden_size": 16,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
            "intermediate_size": 8, "ssm_state_size": 4, "mamba_num_heads": 4,
            "mamba_head_dim": 2, "n_groups": n_groups, "conv_kernel": 3,
            "layers_block_type": ["mamba", "attention", "mamba", "attention"]}


def test_a_placement_restating_our_layout_gives_our_tensor_layouts():
    """Page padding gives every region of ours one page size, which a placement can say."""
    spec = load_model_spec(_nemotron(2))
    for tp in (1, 2):
        ours = EngineLayout(spec, tp, CacheConfig(num_blocks=4, page_padding=True))
        r0 = ours.rank(0)
        pages = {r.nbytes // 4 for r in r0.regions}
        assert len(pages) == 1
        groups = tuple(PlacedGroup(g[0].layer, tuple(t.name for t in g),
                                   r0.tensor(g[0].layer, g[0].name).region, 0)
                       for g in ours.tensor_groups)
        placement = Placement(tuple((r.name, r.nbytes) for r in r0.regions), pages.pop(),
                              groups, pack_align=64)
        placed = EngineLayout(spec, tp, CacheConfig(
            num_blocks=4, block_tokens=ours.block_tokens,
            kernel_block_tokens=ours.kernel_block_tokens, placement=placement))
        for r in range(tp):
            assert placed.rank(r).tensors == ours.rank(r).tensors
            assert [x.nbytes for x in placed.rank(r).regions] == [x.nbytes for x in ours.rank(r).regions]


def vllm_like(config: dict, tp: int, conv_layout: str, num_blocks: int = 6, bt: int = 4):
    """Shaped like vLLM 0.32's CPU memory: one buffer, slot i shared by the i-th Mamba and
    the i-th attention layer, one page per block id; attention per block (heads, kv, token,
    head_dim); a Mamba page is conv then ssm with no padding between them."""
    spec = load_model_spec(config)
    plain = EngineLayout(spec, tp, CacheConfig(num_blocks=num_blocks, block_tokens=bt,
                                               kernel_block_tokens=bt, conv_layout=conv_layout))
    r0 = plain.rank(0)
    page = 0
    for g in plain.tensor_groups:
        page = max(page, sum(r0.tensor(t.layer, t.name).block_nbytes for t in g))
    page = -(-page // 64) * 64
    slot = page * num_blocks
    attn = [g for g in plain.tensor_groups if g[0].paged]
    state = [g for g in plain.tensor_groups if not g[0].paged]
    groups = []
    for i, g in enumerate(state):
        groups.append(PlacedGroup(g[0].layer, tuple(t.name for t in g), 0, i * slot))
    order = (BLOCK, "heads", "kv", TOKEN, "head_dim")
    for i, g in enumerate(attn):
        groups.append(PlacedGroup(g[0].layer, ("kv",), 0, i * slot, (order,)))
    placement = Placement((("vllm.kv", slot * max(len(attn), len(state))),), page, tuple(groups))
    return EngineLayout(spec, tp, CacheConfig(num_blocks=num_blocks, block_tokens=bt,
                                              kernel_block_tokens=bt, conv_layout=conv_layout,
                                              placement=placement))


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
@pytest.mark.parametrize("p_tp,d_tp", [(1, 2), (2, 1), (2, 2)])
def test_vllm_like_placements_plan_what_the_oracle_says(n_groups, conv_layout, p_tp, d_tp):
    cfg = _nemotron(n_groups)
    prefill = vllm_like(cfg, p_tp, conv_layout)
    decode = vllm_like(cfg, d_tp, conv_layout)
    pb = RequestBlocks(7, (3, 1), 5)
    db = RequestBlocks(7, (0, 4), 2)
    check_all_ranks(prefill, decode, pb, db, "direct")


def test_a_placed_attention_tensor_has_heads_outside_k_and_v():
    layout = vllm_like(_nemotron(1), 1, "SD")
    tl = layout.rank(0).tensor(1, "kv")
    s = {a.name: a.stride for a in tl.axes}
    i = tl.itemsize     # head_dim 4, 4 tokens a block
    assert (s["head_dim"], s[TOKEN], s["kv"], s["heads"]) == (i, 4 * i, 16 * i, 2 * 16 * i)
    # Layer 3 shares the buffer with layer 2's Mamba state, one slot further on.
    assert layout.rank(0).tensor(3, "kv").base == layout.rank(0).tensor(2, "conv").base > 0
    ssm, conv = layout.rank(0).tensor(0, "ssm"), layout.rank(0).tensor(0, "conv")
    assert ssm.base == conv.base + conv.block_nbytes      # packed, pack_align 1


def test_placed_layouts_travel_and_keep_their_digest():
    layout = vllm_like(_nemotron(1), 2, "DS")
    again = EngineLayout.from_dict(layout.to_dict())
    assert again.digest == layout.digest
    assert again.rank(1).tensors == layout.rank(1).tensors
    other = vllm_like(_nemotron(1), 2, "DS", num_blocks=7)
    assert other.digest != layout.digest


def _with(layout, **changes):
    p = layout.cache.placement
    import dataclasses
    return EngineLayout(layout.model, layout.tp_size, dataclasses.replace(
        layout.cache, placement=dataclasses.replace(p, **changes)))


def test_bad_placements_refuse_naming_what_is_wrong():
    layout = vllm_like(_nemotron(1), 1, "SD")
    p = layout.cache.placement
    with pytest.raises(LayoutError, match="no group for layer 2 conv/ssm"):
        _with(layout, groups=tuple(g for g in p.groups if g.layer != 2)).rank(0)
    with pytest.raises(LayoutError, match="needs .* bytes a block .* more than page_nbytes"):
        _with(layout, page_nbytes=64).rank(0)
    with pytest.raises(LayoutError, match="past region"):
        _with(layout, regions=(("vllm.kv", 1000),)).rank(0)
    with pytest.raises(LayoutError, match="region 3 outside the 1 regions"):
        _with(layout, groups=(PlacedGroup(0, ("conv", "ssm"), 3, 0),))
    bad = tuple(PlacedGroup(g.layer, g.tensors, g.region, g.base, (("heads", "kv"),))
                if g.tensors == ("kv",) else g for g in p.groups)
    with pytest.raises(LayoutError, match="order .* allowed: a permutation of"):
        _with(layout, groups=bad).rank(0)
