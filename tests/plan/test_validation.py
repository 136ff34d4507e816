"""plan_transfer rejects bad input with a ValueError naming the field."""
from __future__ import annotations

import pytest

from pdbridge.plan import RequestBlocks, plan_transfer
from pdbridge.spec import (AttentionSpec, CacheConfig, EngineLayout, FfnKind, LayerSpec,
                           Mamba2Spec, ModelSpec)


def _spec(d_state=2, num_kv=2):
    return ModelSpec("tiny", 8, 16, (
        LayerSpec(0, (AttentionSpec(4, num_kv, 2),), FfnKind.MLP),
        LayerSpec(1, (Mamba2Spec(4, 1, d_state, 2, 3),), FfnKind.MLP)))


def _layout(spec=None, tp=2, **cache):
    return EngineLayout(spec or _spec(), tp, CacheConfig(**{"num_blocks": 4, "block_tokens": 4,
                                                            **cache}))


OK = RequestBlocks(6, (0, 1), 2)


@pytest.mark.parametrize("decode,match", [
    (_layout(_spec(d_state=3)), "segments"),
    (_layout(_spec(num_kv=4)), "segments"),
    (_layout(dtype="float32"), "dtype"),
    (_layout(kv_packed=False), "kv_packed"),
])
def test_mismatched_geometry(decode, match):
    with pytest.raises(ValueError, match=match):
        plan_transfer(_layout(), decode, 0, OK, OK)


@pytest.mark.parametrize("pb,db,match", [
    (RequestBlocks(6, (0,), 2), OK, "prefill attn_blocks.*need 2"),
    (OK, RequestBlocks(6, (0, 4), 2), "decode attn_blocks: block id 4 >= num_blocks 4"),
    (OK, RequestBlocks(6, (1, 1), 2), "appears twice"),
    (OK, RequestBlocks(6, (0, 1), 7), "decode state_block=7"),
    (RequestBlocks(5, (0, 1), 2), OK, "num_tokens differs"),
])
def test_bad_blocks(pb, db, match):
    with pytest.raises(ValueError, match=match):
        plan_transfer(_layout(), _layout(), 0, pb, db)


def test_bad_rank_and_strategy():
    with pytest.raises(ValueError, match="decode_rank=2"):
        plan_transfer(_layout(), _layout(), 2, OK, OK)
    with pytest.raises(ValueError, match="strategy='fast'; allowed: direct, staging, permute, auto"):
        plan_transfer(_layout(), _layout(), 0, OK, OK, "fast")


def test_different_physical_orders_are_fine():
    """Dim order is a layout choice per engine: SD -> DS and any attention layouts plan."""
    plan = plan_transfer(_layout(conv_layout="SD", attn_layout="tokens_outer"),
                         _layout(tp=1, conv_layout="DS", attn_layout="heads_across_blocks"),
                         0, OK, OK)
    assert plan.total_nbytes == plan.minimal_nbytes
