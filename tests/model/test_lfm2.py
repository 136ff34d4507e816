"""LFM2 against transformers on tiny random models (fp32): short conv layers (B | C | x, a state
of Bx), attention with q/k norms and RoPE, SwiGLU MLP of adjusted width; and TP = 2, 3, 4
against TP = 1 (D = 32 channels split 10/11/11 at TP = 3, 4 query heads 1/1/2).

`lfm2`: conv_L_cache 3, biases on in_proj / conv / out_proj, tied embeddings.
`lfm2_l4`: conv_L_cache 4, no biases, untied embeddings, norm eps 1e-3.
"""
import pytest
import torch

from hf_tiny import (LFM2, PROMPT, assert_greedy_matches_hf, hf_config, hf_model, hf_prompt,
                     prefill_states, save, tp_job)
from numerics import HF_ULPS, REORDER_ULPS, assert_close, measured_ulps
from pdbridge.model import DenseCaches, ForwardBatch, SingleComm, build_model, load_model, read_safetensors
from pdbridge.model.arch import arch_config
from pdbridge.model.attention import kv_slots
from pdbridge.model.hf_names import canonical_weights
from pdbridge.model.lfm2_weights import Lfm2WeightError
from pdbridge.model.short_conv import short_conv_channels
from pdbridge.spec import MixerKind, load_model_spec
from tp_runner import run_tp

NAMES = list(LFM2)


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory):
    root = tmp_path_factory.mktemp("lfm2")
    out = {}
    for name in NAMES:
        hf = hf_model(hf_config(name))
        out[name] = (save(hf, root / name), hf)
    return out


def _conv_layers(spec):
    return [l.index for l in spec.layers_with(MixerKind.SHORT_CONV)]


@pytest.mark.parametrize("name", NAMES)
def test_prompt_logits_and_conv_states_match_hf(lfm2, name):
    d, hf = lfm2[name]
    ours = load_model(d)
    ref_logits, pkv = hf_prompt(hf, PROMPT)
    logits, states = prefill_states(ours, PROMPT)
    assert_close(logits, ref_logits, ulps=HF_ULPS, what="prompt logits")
    assert sorted(states) == _conv_layers(ours.spec) == [0, 2, 3, 5]
    for layer, (conv, ssm) in states.items():
        assert ssm is None
        hf_conv = pkv.get_conv_state(layer, state_idx=0)[0]        # (D, L): one redundant column
        assert conv.shape == (32, hf_conv.shape[1] - 1)
        assert_close(conv, hf_conv[:, 1:], ulps=HF_ULPS, what=f"layer {layer} conv state")


@pytest.mark.parametrize("name", NAMES)
def test_attention_kv_matches_hf(lfm2, name):
    """K after the k-norm and RoPE, V as projected: HF's cache rows of each attention layer."""
    d, hf = lfm2[name]
    ours = load_model(d)
    _, pkv = hf_prompt(hf, PROMPT)
    caches = DenseCaches(ours.spec, num_blocks=6, block_tokens=8, kernel_block_tokens=4)
    table = torch.tensor([3, 0, 5])
    ours(ForwardBatch.build([PROMPT], [0], [table.tolist()], [1]), caches)
    kb, row = kv_slots(table, torch.arange(len(PROMPT)), 8, 4)
    for layer in (1, 4):
        k, v = caches.kv(layer)
        hf_k, hf_v = pkv.layers[layer].keys[0], pkv.layers[layer].values[0]   # (KV, T, hd)
        assert_close(k[kb, :, row].transpose(0, 1), hf_k, ulps=HF_ULPS, what=f"layer {layer} K")
        assert_close(v[kb, :, row].transpose(0, 1), hf_v, ulps=HF_ULPS, what=f"layer {layer} V")


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_hf_generate(lfm2, name):
    assert_greedy_matches_hf(*lfm2[name])


def test_short_prompt_zero_pads_conv_state(lfm2):
    d, hf = lfm2["lfm2_l4"]
    _, pkv = hf_prompt(hf, PROMPT[:2])
    _, states = prefill_states(load_model(d), PROMPT[:2])
    conv, _ = states[0]
    assert_close(conv, pkv.get_conv_state(0, state_idx=0)[0][:, 1:], ulps=HF_ULPS, what="conv")
    assert torch.all(conv[:, 0] == 0) and not torch.all(conv[:, 1] == 0), \
        "L-1 = 3 state columns, 2 tokens: the oldest is padding"


def _mutated(d, fn):
    spec = load_model_spec(d)
    w = {k: fn(k, v) for k, v in read_safetensors(d).items()}
    return spec, build_model(spec, w)


@pytest.mark.parametrize("mutation", ["swap_b_c", "swap_b_x", "drop_qk_norm", "flip_kernel"])
def test_the_parity_test_can_fail(lfm2, mutation):
    """Reading the projections in another order, skipping the q/k norms, or running the conv
    kernel the wrong way round moves the logits far beyond the budget."""
    d, hf = lfm2["lfm2"]
    ref_logits, _ = hf_prompt(hf, PROMPT)

    def fn(k, v):
        if mutation.startswith("swap") and k.endswith("conv.in_proj.weight"):
            b, c, x = v.chunk(3)
            return torch.cat([c, b, x] if mutation == "swap_b_c" else [x, c, b])
        if mutation == "drop_qk_norm" and "_layernorm" in k:
            return torch.ones_like(v)
        if mutation == "flip_kernel" and k.endswith("conv.conv.weight"):
            return v.flip(-1)
        return v
    spec, model = _mutated(d, fn)
    logits, _ = prefill_states(model, PROMPT)
    assert measured_ulps(logits, ref_logits) > 1e3 * HF_ULPS


def test_unknown_tensor_is_named(lfm2):
    d, _ = lfm2["lfm2"]
    spec = load_model_spec(d)
    bad = dict(read_safetensors(d))
    bad["model.layers.0.conv.gate.weight"] = torch.zeros(1)
    with pytest.raises(Lfm2WeightError, match="conv.gate.weight"):
        canonical_weights(spec, arch_config(spec), bad)


def test_mlp_width_follows_block_auto_adjust(lfm2):
    d, _ = lfm2["lfm2"]
    model = load_model(d)
    assert model.layers[0].ffn.up_proj.weight.shape == (48, 32)       # 2/3 of 64 -> 42 -> 48


def assert_conv_states_cut(spec, size, rank, states, ref_states):
    """Each short-conv layer's state on `rank` of `size` is TP=1's, channels [c0, c1) of the
    spec's ShardRule, up to rounding."""
    for layer, (conv, _) in states.items():
        s = spec.layers[layer].mixer(MixerKind.SHORT_CONV)
        c0, c1 = short_conv_channels(s, size, rank)
        ref = ref_states[layer][0]
        assert_close(conv, ref[c0:c1], ulps=REORDER_ULPS, scale=ref.abs().max(),
                     what=f"conv state, layer {layer}, TP={size} rank {rank}")


N_NEW = 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tp_2_3_4_match_tp1(lfm2, dtype):
    """Greedy tokens equal TP=1's and every rank's conv states are TP=1's cut by the ShardRule.
    TP=3 does not divide D = 32 (10/11/11 channels) nor the 4 query heads; TP=4 replicates
    the 2 KV heads."""
    dirs = {name: d for name, (d, _) in lfm2.items()}
    ref = tp_job(SingleComm(), dirs, PROMPT, N_NEW, dtype)
    sizes = (2, 3, 4) if dtype == torch.float32 else (3,)
    for size in sizes:
        for rank, res in enumerate(run_tp(tp_job, size, dirs, PROMPT, N_NEW, dtype)):
            for name, (tokens, states) in res.items():
                ref_tokens, ref_states = ref[name]
                assert tokens == ref_tokens, f"{name} TP={size} rank {rank}"
                assert_conv_states_cut(load_model_spec(dirs[name]), size, rank, states,
                                       ref_states)


@pytest.mark.parametrize("name, shape", [("model.layers.0.conv.in_proj.weight", (97, 32)),
                                         ("model.layers.2.conv.conv.weight", (32, 1, 5))])
def test_misshaped_short_conv_tensor_is_named(lfm2, name, shape):
    """A short-conv tensor the config does not imply (one row too many: TP would cut B, C and x
    at the wrong places; another kernel length) is refused before loading, by name."""
    from pdbridge.model.checkpoint_check import check_shapes
    from pdbridge.model.hf_names import WeightError
    d, _ = lfm2["lfm2"]
    bad = dict(read_safetensors(d))
    bad[name] = torch.zeros(shape)
    layer = name.split(".")[2]
    with pytest.raises(WeightError, match=rf"layers\.{layer}\.conv\..*shape"):
        check_shapes(load_model_spec(d), bad)
