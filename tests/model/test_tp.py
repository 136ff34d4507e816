"""The same model at TP = 2, 3, 4 against TP = 1: greedy tokens, and every rank's states equal
the TP=1 states cut by the ShardRules (conv channels [x_local | B_local | C_local], SSM heads)."""
import pytest
import torch

from hf_tiny import PROMPT, assert_rank_states_match, tp_job
from numerics import REORDER_ULPS, assert_close, measured_ulps
from pdbridge.model import SingleComm
from pdbridge.model.shard import mamba2_shard
from pdbridge.model.tp import mamba_rows
from pdbridge.spec import MixerKind, load_model_spec
from tp_runner import run_tp

N_NEW = 12


@pytest.fixture(scope="module")
def reference(tiny):
    dirs = {name: d for name, (d, _) in tiny.items()}
    return dirs, tp_job(SingleComm(), dirs, PROMPT, N_NEW)


@pytest.fixture(scope="module")
def reference64(tiny):
    dirs = {name: d for name, (d, _) in tiny.items()}
    return dirs, tp_job(SingleComm(), dirs, PROMPT, N_NEW, torch.float64)


def _check(dirs, reference, results, size):
    for name in results[0]:
        ref_tokens, ref_states = reference[name]
        spec = load_model_spec(dirs[name])
        for rank, res in enumerate(results):
            tokens, states = res[name]
            assert tokens == ref_tokens, f"{name} TP={size} rank {rank}"
            assert_rank_states_match(spec, size, rank, states, ref_states)


@pytest.mark.parametrize("size", [2, 4])
def test_tp_matches_tp1_all_architectures(reference, size):
    """TP=4 puts 2 KV heads on 4 ranks (replicated) and splits n_groups = 1 and 2 (norm sums
    all-reduced); `unusual` splits 6 heads / 3 groups unevenly at 4."""
    dirs, ref = reference
    _check(dirs, ref, run_tp(tp_job, size, dirs, PROMPT, N_NEW), size)


def test_tp4_matches_tp1_in_float64(reference64):
    """The same comparison in float64, where rounding is 5e8 times smaller and the ulps budget
    the same: any state difference beyond rounding, however small, fails here."""
    dirs, ref = reference64
    _check(dirs, ref, run_tp(tp_job, 4, dirs, PROMPT, N_NEW, torch.float64), 4)


def test_tp3_six_query_heads_two_kv_heads(reference):
    """Q=6, K=2 at TP=3: rank 1 holds query heads 2, 3, so both KV heads."""
    dirs, ref = reference
    sub = {k: dirs[k] for k in ("unusual", "bamba")}
    _check(dirs, ref, run_tp(tp_job, 3, sub, PROMPT, N_NEW), 3)


@pytest.mark.slow
@pytest.mark.parametrize("size", [3, 6])
def test_tp_matrix_slow(reference, size):
    dirs, ref = reference
    ok = {"unusual": dirs["unusual"]} if size == 6 else dirs     # 6 ranks need 6 heads
    _check(dirs, ref, run_tp(tp_job, size, ok, PROMPT, N_NEW), size)


def test_the_budget_catches_sharding_bugs(reference):
    """The rounding budget is far from what real mistakes do to the same states: B read where C
    belongs (the n_groups = 1 corruption of REFERENCE.md), or another rank's shard, move every
    layer's state by > 1e4 budgets (measured ulps ~1e6-1e7), so `assert_close` fails on them."""
    dirs, ref = reference
    spec = load_model_spec(dirs["granitemoehybrid"])                 # n_groups = 1
    _, states = ref["granitemoehybrid"]
    for layer, (conv, ssm) in states.items():
        m = spec.layers[layer].mixer(MixerKind.MAMBA2)
        shard = mamba2_shard(m, 2, 1)
        mine, other = mamba_rows(shard)["conv"], mamba_rows(mamba2_shard(m, 2, 0))
        x, b, c = mine.split([shard.intermediate, *(2 * [shard.num_groups * m.d_state])])
        heads = mamba_rows(shard)["heads"]
        for wrong, want, full in ((conv[torch.cat([x, c, b])], conv[mine], conv),
                                  (conv[other["conv"]], conv[mine], conv),
                                  (ssm[other["heads"]], ssm[heads], ssm)):
            assert measured_ulps(wrong, want, scale=full.abs().max()) > 1e4 * REORDER_ULPS
            with pytest.raises(AssertionError, match="ulps"):
                assert_close(wrong, want, ulps=REORDER_ULPS, scale=full.abs().max())
