"""push_batches: a pull plan cut into what each prefill rank writes after each layer."""
import numpy as np
import pytest

from pdbridge.plan import RequestBlocks, Strategy, plan_transfer, push_batches
from pdbridge.spec import CacheConfig, EngineLayout, get_preset


def _layouts(p: int, d: int, interleave: bool):
    spec = get_preset("nemotron-h-8b")
    cache = CacheConfig(num_blocks=8, conv_layout="DS", attn_layout="heads_across_blocks",
                        page_padding=True, layer_interleave=interleave)
    return EngineLayout(spec, p, cache), EngineLayout(spec, d, cache)


def _blocks(layout: EngineLayout, tokens: int) -> RequestBlocks:
    n = -(-tokens // layout.block_tokens)
    return RequestBlocks(tokens, tuple(range(n)), layout.num_blocks - 1)


@pytest.mark.parametrize("p,d", [(2, 4), (4, 2), (1, 1), (3, 2)])
@pytest.mark.parametrize("interleave", [False, True])
def test_batches_partition_each_ranks_runs_by_final_layer(p, d, interleave):
    pl, dl = _layouts(p, d, interleave)
    tokens = pl.block_tokens + 5
    for j in range(d):
        plan = plan_transfer(pl, dl, j, _blocks(pl, tokens), _blocks(dl, tokens), "direct")
        for r in range(p):
            batches = push_batches(plan, pl, r)
            got = np.concatenate([b.runs for b in batches]) if batches else np.zeros(0, int)
            assert sorted(got.tolist()) == plan.reads_from(r).tolist()     # each run once
            layers = [b.after_layer for b in batches]
            assert layers == sorted(set(layers))
            rank = pl.rank(r)
            for b in batches:
                for region in plan.src_region[b.runs].tolist():
                    held = {tl.tensor.layer for tl in rank.tensors if tl.region == region}
                    assert b.after_layer == max(held)       # final once its last layer ran
                    if not interleave:
                        assert held == {b.after_layer} == {rank.regions[region].layer}


def test_interleaved_layers_wait_for_their_stack():
    """One region per tensor shape: a stack's runs go after its last layer, so a push over
    layer-interleaved regions writes in a few batches (one per stack), not one per layer."""
    pl, dl = _layouts(2, 4, True)
    per_layer = _layouts(2, 4, False)
    tokens = pl.block_tokens + 5
    for (p_, d_), bound in ((per_layer, None), ((pl, dl), len(pl.rank(0).regions))):
        plan = plan_transfer(p_, d_, 0, _blocks(p_, tokens), _blocks(d_, tokens), "direct")
        n = len(push_batches(plan, p_, 0))
        if bound is None:
            assert n > 8            # one batch per layer with state or KV
        else:
            assert n <= bound


@pytest.mark.parametrize("strategy", ["staging", "permute"])
def test_push_refuses_other_strategies(strategy):
    pl, dl = _layouts(2, 4, False)
    plan = plan_transfer(pl, dl, 0, _blocks(pl, 10), _blocks(dl, 10), strategy)
    if plan.strategy is Strategy.DIRECT:
        pytest.skip("the strategy degenerated to direct for this pair")
    with pytest.raises(ValueError, match=f"strategy='{strategy}' with transfer_mode='push'; "
                                         f"allowed: direct"):
        push_batches(plan, pl, 0)
