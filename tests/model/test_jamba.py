"""Jamba against transformers on tiny random models (fp32): Mamba1 layers (x_proj row-parallel,
dt/B/C norms), attention without RoPE, MoE (softmax over all experts, unnormalised top-k) every
`expert_layer_period`; and TP = 2, 3, 4 against TP = 1 (I = 64 channels split 21/21/22 at 3).

`jamba`: MoE on layers 0 and 2, conv bias, K = 4. `jamba_bias`: in/out projection biases, no conv
bias, K = 3, MoE on layer 2 only, eps 1e-3.
"""
import pytest
import torch

from hf_tiny import (JAMBA, PROMPT, assert_greedy_matches_hf, hf_config, hf_model, hf_prompt,
                     prefill_states, save, tp_job)
from numerics import HF_ULPS, REORDER_ULPS, assert_close, measured_ulps
from pdbridge.model import DenseCaches, ForwardBatch, SingleComm, build_model, load_model, read_safetensors
from pdbridge.model.arch import arch_config
from pdbridge.model.attention import kv_slots
from pdbridge.model.hf_names import canonical_weights
from pdbridge.model.jamba_weights import JambaWeightError
from pdbridge.model.mamba1 import mamba1_channels
from pdbridge.model.moe import MoE
from pdbridge.spec import FfnKind, MixerKind, load_model_spec
from tp_runner import run_tp

NAMES = list(JAMBA)


@pytest.fixture(scope="module")
def jamba(tmp_path_factory):
    root = tmp_path_factory.mktemp("jamba")
    out = {}
    for name in NAMES:
        hf = hf_model(hf_config(name))
        out[name] = (save(hf, root / name), hf)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_prompt_logits_and_states_match_hf(jamba, name):
    d, hf = jamba[name]
    ours = load_model(d)
    ref_logits, pkv = hf_prompt(hf, PROMPT)
    logits, states = prefill_states(ours, PROMPT)
    assert_close(logits, ref_logits, ulps=HF_ULPS, what="prompt logits")
    assert sorted(states) == [0, 2]
    for layer, (conv, ssm) in states.items():
        hf_conv = pkv.get_conv_state(layer, state_idx=0)[0]        # (I, K): one redundant column
        hf_ssm = pkv.get_recurrent_state(layer, state_idx=0)[0]    # (I, N)
        assert conv.shape == (64, hf_conv.shape[1] - 1) and ssm.shape == (64, 8)
        assert_close(conv, hf_conv[:, 1:], ulps=HF_ULPS, what=f"layer {layer} conv state")
        assert_close(ssm, hf_ssm.float(), ulps=HF_ULPS, what=f"layer {layer} SSM state")


@pytest.mark.parametrize("name", NAMES)
def test_attention_kv_matches_hf(jamba, name):
    d, hf = jamba[name]
    ours = load_model(d)
    _, pkv = hf_prompt(hf, PROMPT)
    caches = DenseCaches(ours.spec, num_blocks=6, block_tokens=8, kernel_block_tokens=4)
    table = torch.tensor([3, 0, 5])
    ours(ForwardBatch.build([PROMPT], [0], [table.tolist()], [1]), caches)
    kb, row = kv_slots(table, torch.arange(len(PROMPT)), 8, 4)
    for layer in (1, 3):
        k, v = caches.kv(layer)
        hf_k, hf_v = pkv.layers[layer].keys[0], pkv.layers[layer].values[0]   # (KV, T, hd)
        assert_close(k[kb, :, row].transpose(0, 1), hf_k, ulps=HF_ULPS, what=f"layer {layer} K")
        assert_close(v[kb, :, row].transpose(0, 1), hf_v, ulps=HF_ULPS, what=f"layer {layer} V")


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_hf_generate(jamba, name):
    assert_greedy_matches_hf(*jamba[name])


def test_expert_layers_follow_the_period(jamba):
    for name, moe_layers in (("jamba", {0, 2}), ("jamba_bias", {2})):
        model = load_model(jamba[name][0])
        assert {i for i, l in enumerate(model.spec.layers) if l.ffn is FfnKind.MOE} == moe_layers
        assert {i for i, b in enumerate(model.layers) if isinstance(b.ffn, MoE)} == moe_layers


def test_stacked_in_memory_experts_load_the_same(jamba):
    """transformers holds experts stacked (gate_up_proj), save_pretrained writes one per expert."""
    d, hf = jamba["jamba"]
    spec = load_model_spec(d)
    every = {k: v.detach() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in every)
    a, b = build_model(spec, read_safetensors(d)), build_model(spec, every)
    batch = ForwardBatch.build([PROMPT], [0], [[0, 1]], [0])
    fresh = lambda: DenseCaches(spec, num_blocks=2, block_tokens=8)
    torch.testing.assert_close(a(batch, fresh()), b(batch, fresh()), atol=0, rtol=0)


@pytest.mark.parametrize("mutation", ["swap_x_z", "drop_b_norm", "normalise_router", "flip_kernel"])
def test_the_parity_test_can_fail(jamba, mutation):
    """Reading z where x belongs, skipping the B norm, renormalising the top-k router weights, or
    running the conv kernel backwards moves the logits far beyond the budget."""
    d, hf = jamba["jamba"]
    ref_logits, _ = hf_prompt(hf, PROMPT)
    spec = load_model_spec(d)
    w = read_safetensors(d)
    for k, v in list(w.items()):
        if mutation == "swap_x_z" and k.endswith("mamba.in_proj.weight"):
            x, z = v.chunk(2)
            w[k] = torch.cat([z, x])
        if mutation == "drop_b_norm" and k.endswith("b_layernorm.weight"):
            w[k] = torch.ones_like(v)
        if mutation == "flip_kernel" and k.endswith("conv1d.weight"):
            w[k] = v.flip(-1)
    model = build_model(spec, w)
    if mutation == "normalise_router":
        for b in model.layers:
            if isinstance(b.ffn, MoE):
                b.ffn.cfg = type(b.ffn.cfg)(**{**b.ffn.cfg.__dict__, "norm_topk_prob": True})
    logits, _ = prefill_states(model, PROMPT)
    assert measured_ulps(logits, ref_logits) > 1e3 * HF_ULPS


def test_unknown_tensor_is_named(jamba):
    d, _ = jamba["jamba"]
    spec = load_model_spec(d)
    bad = dict(read_safetensors(d))
    bad["model.layers.0.mamba.z_proj.weight"] = torch.zeros(1)
    with pytest.raises(JambaWeightError, match="mamba.z_proj.weight"):
        canonical_weights(spec, arch_config(spec), bad)


def assert_mamba1_states_cut(spec, size, rank, states, ref_states):
    """Each Mamba1 layer's conv and SSM state on `rank` of `size` is TP=1's, channels [c0, c1)
    of the spec's ShardRule, up to rounding."""
    for layer, (conv, ssm) in states.items():
        c0, c1 = mamba1_channels(spec.layers[layer].mixer(MixerKind.MAMBA1), size, rank)
        ref_conv, ref_ssm = ref_states[layer]
        where = f"layer {layer}, TP={size} rank {rank}"
        assert_close(conv, ref_conv[c0:c1], ulps=REORDER_ULPS, scale=ref_conv.abs().max(),
                     what=f"conv state, {where}")
        assert_close(ssm, ref_ssm[c0:c1], ulps=REORDER_ULPS, scale=ref_ssm.abs().max(),
                     what=f"SSM state, {where}")


N_NEW = 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tp_2_3_4_match_tp1(jamba, dtype):
    """Greedy tokens equal TP=1's and every rank's states are TP=1's cut by the ShardRule. A
    missing all-reduce after x_proj would give each rank its own dt/B/C and fail here.
    TP=3 divides neither I = 64 nor the 4 query heads; TP=4 replicates the 2 KV heads."""
    dirs = {name: d for name, (d, _) in jamba.items()}
    ref = tp_job(SingleComm(), dirs, PROMPT, N_NEW, dtype)
    sizes = (2, 3, 4) if dtype == torch.float32 else (3,)
    for size in sizes:
        for rank, res in enumerate(run_tp(tp_job, size, dirs, PROMPT, N_NEW, dtype)):
            for name, (tokens, states) in res.items():
                ref_tokens, ref_states = ref[name]
                assert tokens == ref_tokens, f"{name} TP={size} rank {rank}"
                assert_mamba1_states_cut(load_model_spec(dirs[name]), size, rank, states,
                                         ref_states)


@pytest.mark.parametrize("name, shape", [("model.layers.0.mamba.x_proj.weight", (20, 65)),
                                         ("model.layers.2.mamba.A_log", (64, 9)),
                                         ("model.layers.0.feed_forward.experts.3.up_proj.weight",
                                          (41, 32))])
def test_misshaped_mamba1_or_expert_tensor_is_named(jamba, name, shape):
    """Tensors the config does not imply are refused before loading (TP would cut them
    silently): x_proj over 65 channels, A with 9 states, an expert one row too wide."""
    from pdbridge.model.checkpoint_check import check_shapes
    from pdbridge.model.hf_names import WeightError
    d, _ = jamba["jamba"]
    bad = dict(read_safetensors(d))
    bad[name] = torch.zeros(shape)
    with pytest.raises(WeightError, match="shape"):
        check_shapes(load_model_spec(d), bad)
