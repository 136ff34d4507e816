"""check_compatible: bridgeable pairs pass, every kind of geometry difference is named."""
from __future__ import annotations

import dataclasses

import pytest

from pdbridge.plan.transfer_plan import Strategy
from pdbridge.spec import SPLIT, StateTensor, groups_of_heads
from pdbridge.transport.compat import (PAIR_RULES, GeometryMismatch, PairRule,
                                       bridging_strategies, check_compatible, check_tensors)
from transport_layouts import tiny_config, tiny_layout

ALL = list(Strategy)


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("p_cache,d_cache", [
    ({}, {}),
    ({"conv_layout": "SD"}, {"conv_layout": "DS"}),
    ({"attn_layout": "tokens_outer"}, {"attn_layout": "heads_across_blocks"}),
    ({"block_tokens": 32, "kernel_block_tokens": 8}, {"block_tokens": 16}),
    ({"page_padding": True}, {"num_blocks": 9}),
])
def test_bridgeable_pairs_pass(strategy, p_cache, d_cache):
    # Different TP sizes, block sizes and physical layouts are what the planner bridges.
    check_compatible(tiny_layout(2, **p_cache), tiny_layout(1, **d_cache), strategy)
    check_compatible(tiny_layout(1, **p_cache), tiny_layout(4, **d_cache), strategy)


def _mismatch(p_cfg: dict, d_cfg: dict, strategy=Strategy.DIRECT, p_cache=None, d_cache=None):
    with pytest.raises(GeometryMismatch) as e:
        check_compatible(tiny_layout(1, tiny_config(**p_cfg), **(p_cache or {})),
                         tiny_layout(2, tiny_config(**d_cfg), **(d_cache or {})), strategy)
    return e.value


@pytest.mark.parametrize("p_cfg,d_cfg,field,pv,dv", [
    ({"model_type": "nemotron_h"}, {"model_type": "bamba", "num_hidden_layers": 4,
                                    "attn_layer_indices": [1], "mamba_n_heads": 4,
                                    "mamba_d_head": 8, "mamba_d_state": 8, "mamba_n_groups": 2,
                                    "mamba_d_conv": 4, "mamba_expand": 1},
     "model_type", "nemotron_h", "bamba"),
    ({}, {"hidden_size": 32}, "hidden_size", 64, 32),
    ({}, {"hybrid_override_pattern": "M-*M"}, "layers", "M*-M", "M-*M"),
    ({}, {"dtype": "bfloat16"}, "dtype", "float32", "bfloat16"),
    ({}, {"mamba_ssm_cache_dtype": "float16"}, "ssm_dtype", "float32", "float16"),
    # conv rows: d_conv 4 -> 3 rows of state, d_conv 3 -> 2 rows.
    ({}, {"conv_kernel": 3}, "tensors[0].dims.state_len", 3, 2),
    # B/C groups: the conv's x segment is unchanged, B is the first to differ.
    ({}, {"n_groups": 1}, "tensors[0].segments[1].unit_count", 2, 1),
    ({}, {"ssm_state_size": 4}, "tensors[0].segments[1].unit_size", 8, 4),
    ({}, {"mamba_head_dim": 4}, "tensors[0].segments[0].unit_count", 32, 16),
    ({}, {"head_dim": 8}, "tensors[2].dims.head_dim", 16, 8),
])
def test_model_field_mismatch_is_named(p_cfg, d_cfg, field, pv, dv):
    e = _mismatch(p_cfg, d_cfg)
    assert (e.field, e.prefill_value, e.decode_value) == (field, pv, dv)
    assert field in str(e) and repr(pv) in str(e) and repr(dv) in str(e)


def test_kv_packing_is_refused_by_every_strategy():
    for s in ALL:
        e = _mismatch({}, {}, s, {"kv_packed": True}, {"kv_packed": False})
        assert (e.field, e.prefill_value, e.decode_value) == ("cache.kv_packed", True, False)


def test_ssm_dtype_override_in_cache_config_is_checked():
    e = _mismatch({}, {}, p_cache={"ssm_dtype": "float32"}, d_cache={"ssm_dtype": "bfloat16"})
    assert e.field == "ssm_dtype"


def test_pair_rules_are_data():
    # A rule restricting permute to equal conv layouts refuses only permute, and only there.
    permute_same_conv = PairRule("cache.conv_layout", frozenset({Strategy.PERMUTE}),
                                 lambda p, d: p == d, "test rule")
    rules = PAIR_RULES + (permute_same_conv,)
    p, d = tiny_layout(1, conv_layout="SD"), tiny_layout(2, conv_layout="DS")
    with pytest.raises(GeometryMismatch) as e:
        check_compatible(p, d, Strategy.PERMUTE, rules)
    assert (e.value.field, e.value.prefill_value, e.value.decode_value) == \
        ("cache.conv_layout", "SD", "DS")
    assert "permute" in str(e.value)
    for s in (Strategy.DIRECT, Strategy.STAGING, Strategy.AUTO):
        check_compatible(p, d, s, rules)
    assert bridging_strategies(p, d, rules) == [Strategy.DIRECT, Strategy.STAGING]
    check_compatible(p, tiny_layout(2, conv_layout="SD"), Strategy.PERMUTE, rules)


def test_auto_is_refused_only_when_no_strategy_bridges():
    never = PairRule("cache.attn_layout", frozenset(Strategy) - {Strategy.AUTO},
                     lambda p, d: p == d, "test rule")
    p = tiny_layout(1, attn_layout="heads_outer")
    d = tiny_layout(1, attn_layout="tokens_outer")
    assert bridging_strategies(p, d, (never,)) == []
    with pytest.raises(GeometryMismatch) as e:
        check_compatible(p, d, Strategy.AUTO, (never,))
    assert e.value.field == "cache.attn_layout"


def test_kernel_block_rule():
    # EngineLayout refuses this at construction; a layout from elsewhere is checked again.
    p, d = tiny_layout(1, block_tokens=32, kernel_block_tokens=16), tiny_layout(2)
    p.__dict__["block_tokens"] = 24     # cached_property storage: simulate a bad peer layout
    with pytest.raises(GeometryMismatch) as e:
        check_compatible(p, d)
    assert e.value.field == "kernel_block_tokens" and "block_tokens=24" in str(e.value)


# ---- tensor fields built by hand (rules no config can make differ alone) ----------------

def _conv(rule_b=None, dims=None, dtype="float32", name="conv") -> StateTensor:
    from pdbridge.spec import BLOCK, Dim, Segment
    dims = dims or (Dim(BLOCK, 0), Dim("channels", 0), Dim("state_len", 3))
    return StateTensor(name, 0, dims, "channels", (
        Segment("x", 32, 1, SPLIT), Segment("B", 2, 8, rule_b or groups_of_heads(4))), dtype)


def _tensor_mismatch(p: StateTensor, d: StateTensor) -> GeometryMismatch:
    with pytest.raises(GeometryMismatch) as e:
        check_tensors([p], [d])
    return e.value


def test_rule_kind_and_parameters():
    from pdbridge.spec import REPLICATE_WHEN_FEWER
    e = _tensor_mismatch(_conv(), _conv(REPLICATE_WHEN_FEWER))
    assert (e.field, e.prefill_value, e.decode_value) == \
        ("tensors[0].segments[1].rule.kind", "groups_of_heads", "replicate_when_fewer")
    e = _tensor_mismatch(_conv(), _conv(groups_of_heads(8)))
    assert (e.field, e.prefill_value, e.decode_value) == \
        ("tensors[0].segments[1].rule.num_heads", 4, 8)


def test_dims_compared_by_name_not_order():
    from pdbridge.spec import BLOCK, Dim
    sd = (Dim(BLOCK, 0), Dim("state_len", 3), Dim("channels", 0))
    check_tensors([_conv()], [_conv(dims=sd)])       # SD vs DS: same dims
    other = (Dim(BLOCK, 0), Dim("channels", 0), Dim("rows", 3))
    e = _tensor_mismatch(_conv(), _conv(dims=other))
    assert e.field == "tensors[0].dims" and "state_len" in e.prefill_value


def test_tensor_dtype_name_and_count():
    e = _tensor_mismatch(_conv(), _conv(dtype="bfloat16"))
    assert (e.field, e.prefill_value, e.decode_value) == ("tensors[0].dtype", "float32", "bfloat16")
    e = _tensor_mismatch(_conv(), _conv(name="ssm"))
    assert e.field == "tensors[0].name"
    with pytest.raises(GeometryMismatch) as e:
        check_tensors([_conv(), _conv()], [_conv()])
    assert (e.value.field, e.value.prefill_value, e.value.decode_value) == ("tensors.count", 2, 1)


def test_first_difference_wins():
    # Both dtype and conv rows differ: the model-wide field comes first.
    e = _mismatch({}, {"dtype": "bfloat16", "conv_kernel": 3})
    assert e.field == "dtype"
    seg = dataclasses.replace(_conv().segments[1], unit_size=4)
    d = dataclasses.replace(_conv(dtype="bfloat16"), segments=(_conv().segments[0], seg))
    assert _tensor_mismatch(_conv(), d).field == "tensors[0].dtype"
