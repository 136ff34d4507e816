"""Disaggregation fidelity: prefill at TP=p + transfer + decode at TP=d produces the monolithic
engine's tokens exactly (fp32), across TP pairs, conv layouts, strategies and architectures."""
import itertools

import pytest
import torch

from pd_harness import PROMPTS, STRATEGIES, granite_moe_dir, monolithic, run_pd
from pdbridge.model import default_model

torch.set_num_threads(1)
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def default_dir():
    return str(default_model.model_dir())


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory):
    return granite_moe_dir(tmp_path_factory.mktemp("granite"))


def check(model_dir, prefill_tp, decode_tps, strategies, prefill_conv="DS", decode_conv="DS",
          prompts=PROMPTS, prefill_interleave=False, transfer_mode="pull"):
    want = monolithic(model_dir, prompts, MAX_TOKENS)
    got, held = run_pd(model_dir, prefill_tp, decode_tps, strategies, prompts, MAX_TOKENS,
                       prefill_conv, decode_conv, prefill_interleave=prefill_interleave,
                       transfer_mode=transfer_mode)
    assert held == 0, "the prefill engine still holds blocks of finished transfers"
    assert set(got) == {(d, s) for d in decode_tps for s in strategies}
    for (d, s), outs in got.items():
        for index, tokens in outs:
            assert len(tokens) == MAX_TOKENS
            assert tokens == want[index], \
                f"{transfer_mode} P={prefill_tp} D={d} {s}: prompt {index} differs"


def test_one_prefill_feeds_decode_tp_1_and_4(default_dir):
    """P=2 feeding D=1 and D=4 at the same time, every strategy (embedded model: n_groups 2);
    the prefill engine interleaves layers in its regions, the decode engines do not."""
    check(default_dir, 2, [1, 4], STRATEGIES, prefill_interleave=True)


def test_uneven_tp_pairs_and_mixed_conv_layouts(default_dir):
    """3 -> 2 with SD prefill / DS decode, and 2 -> 3 the other way round."""
    check(default_dir, 3, [2], ["direct", "permute"], prefill_conv="SD", decode_conv="DS")
    check(default_dir, 2, [3], ["staging", "auto"], prefill_conv="DS", decode_conv="SD")


def test_n_groups_1_with_moe(granite_dir):
    """GraniteMoeHybrid: B/C replicated on every rank (n_groups = 1), MoE feed-forward."""
    check(granite_dir, 1, [2], STRATEGIES, decode_conv="SD")
    check(granite_dir, 4, [2], ["direct", "permute"])


def test_push_one_prefill_feeds_decode_tp_1_and_4(default_dir):
    """Push: P=2 writes layer by layer into D=1 and D=4 (one region per layer: a batch of
    writes after every layer)."""
    check(default_dir, 2, [1, 4], ["direct"], transfer_mode="push")


def test_push_n_groups_1_interleaved_prefill(granite_dir):
    """Push from a layer-interleaved prefill (runs go after each stack's last layer), 4 -> 2,
    SD decode, B/C replicated; `auto` is `direct` in push mode."""
    check(granite_dir, 4, [2], ["auto"], decode_conv="SD", prefill_interleave=True,
          transfer_mode="push")


@pytest.mark.slow
@pytest.mark.parametrize("conv", ["SD", "DS"])
@pytest.mark.parametrize("prefill_tp", [1, 2, 3, 4])
def test_push_full_sweep_default_model(default_dir, prefill_tp, conv):
    decode_tps = [d for p, d in PAIRS if p == prefill_tp]
    check(default_dir, prefill_tp, decode_tps, ["direct"], conv, conv,
          prefill_interleave=conv == "SD", transfer_mode="push")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["nemotron_h", "bamba", "granitemoehybrid", "falcon_h1", "zamba2",
                                  "qwen3_5_text", "qwen3_next", "lfm2", "jamba"])
def test_push_every_architecture(arch, tmp_path):
    from pd_harness import hf_arch_dir
    model_dir = hf_arch_dir(arch, tmp_path / arch)
    prompts = [[t % 96 for t in p] for p in PROMPTS]
    check(model_dir, 2, [1, 4], ["direct"], prefill_conv="SD", prompts=prompts,
          transfer_mode="push")


PAIRS = sorted(set(itertools.product([1, 2, 4], [1, 2, 4])) | {(3, 2), (2, 3)})


@pytest.mark.slow
@pytest.mark.parametrize("conv", ["SD", "DS"])
@pytest.mark.parametrize("prefill_tp", [1, 2, 3, 4])
def test_full_sweep_default_model(default_dir, prefill_tp, conv):
    decode_tps = [d for p, d in PAIRS if p == prefill_tp]
    check(default_dir, prefill_tp, decode_tps, STRATEGIES, conv, conv,
          prefill_interleave=conv == "SD")


@pytest.mark.slow
@pytest.mark.parametrize("conv", ["SD", "DS"])
@pytest.mark.parametrize("prefill_tp", [1, 2, 4])
def test_full_sweep_granite(granite_dir, prefill_tp, conv):
    check(granite_dir, prefill_tp, [1, 2, 4], STRATEGIES, conv, conv)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["nemotron_h", "bamba", "granitemoehybrid", "falcon_h1", "zamba2",
                                  "qwen3_5_text", "qwen3_next", "lfm2", "jamba"])
def test_every_architecture(arch, tmp_path):
    """Each supported architecture's tiny HF checkpoint through 1 -> 2 and 2 -> 4 (and 4 -> 1)."""
    from pd_harness import hf_arch_dir
    model_dir = hf_arch_dir(arch, tmp_path / arch)
    prompts = [[t % 96 for t in p] for p in PROMPTS]        # the tiny configs' vocabulary
    check(model_dir, 1, [2], ["direct", "permute"], prefill_conv="SD", prompts=prompts)
    check(model_dir, 4, [1, 2], ["staging", "auto"], prompts=prompts)


# The newer state kinds, each in its own tiny HF checkpoint:
# * gated delta nets (qwen3_5_text, qwen3_next): conv state [q | k | v] (k-heads cut by the
#   v-heads that use them, so 1 -> 2 reads three runs per block), recurrent state (Hv, dk, dv)
#   by v-heads, gated attention KV;
# * short conv (lfm2, lfm2_l4): the state of Bx (last L-1 tokens, one channel segment; D = 32
#   splits 10/11/11 at TP 3), q/k-normed attention KV -- no other engine moves it between TP
#   sizes (REFERENCE.md);
# * Mamba1 (jamba, jamba_bias): conv state of raw x and SSM state (I, N) by channels (I = 64
#   splits 21/21/22), attention without RoPE, MoE layers.
NEW_STATE_KINDS = ["qwen3_5_text", "qwen3_next", "lfm2", "jamba"]
NEW_STATE_KINDS_SLOW = NEW_STATE_KINDS + ["lfm2_l4", "jamba_bias"]


@pytest.mark.parametrize("arch", NEW_STATE_KINDS)
def test_new_state_kinds_1_to_2_and_2_to_1(arch, tmp_path):
    """SD prefill into DS decode one way, DS both ways the other."""
    from pd_harness import hf_arch_dir
    model_dir = hf_arch_dir(arch, tmp_path / arch)
    prompts = [[t % 96 for t in p] for p in PROMPTS]        # the tiny configs' vocabulary
    check(model_dir, 1, [2], ["direct", "staging"], prefill_conv="SD", prompts=prompts)
    check(model_dir, 2, [1], ["permute", "auto"], prompts=prompts)


@pytest.mark.slow
@pytest.mark.parametrize("arch", NEW_STATE_KINDS_SLOW)
def test_new_state_kinds_sweep(arch, tmp_path):
    """Every pair of TP 1, 2, 4 plus the uneven 3 -> 2 and 2 -> 3, both conv layouts; push too."""
    from pd_harness import hf_arch_dir
    model_dir = hf_arch_dir(arch, tmp_path / arch)
    prompts = [[t % 96 for t in p] for p in PROMPTS]
    for p in (1, 2, 3, 4):
        decode_tps = [d for q, d in PAIRS if q == p]
        check(model_dir, p, decode_tps, STRATEGIES, "SD", "DS", prompts=prompts)
    check(model_dir, 4, [2], STRATEGIES, "DS", "SD", prompts=prompts)
    check(model_dir, 1, [4], ["direct"], prompts=prompts, transfer_mode="push")
