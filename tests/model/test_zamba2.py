"""Zamba2 against transformers on tiny random models (fp32): shared transformer blocks in rotation,
per-layer adapters, attention over [h | embeddings], tied embeddings; and TP=2, 4 against TP=1.

`zamba2`: 2 shared blocks over 3 hybrid layers (1, 3, 4), q/k/v + MLP adapters, RoPE, G = 2.
`zamba2_gqa`: 1 block, 2 KV heads for 4 query heads, biases, G = 1 (TP splits the norm group).
"""
import pytest
import torch

from hf_tiny import (PROMPT, ZAMBA2, assert_greedy_matches_hf, assert_rank_states_match,
                     hf_config, hf_model, hf_prompt, prefill_states, save, tp_job)
from numerics import HF_ULPS, assert_close
from pdbridge.model import (DenseCaches, ForwardBatch, SingleComm, build_model,
                            load_model, read_safetensors)
from pdbridge.model.arch import arch_config
from pdbridge.model.attention import kv_slots
from pdbridge.model.hf_names import canonical_weights
from pdbridge.model.zamba2 import build_zamba2_layers
from pdbridge.model.zamba2_weights import Zamba2WeightError
from pdbridge.spec import load_model_spec
from tp_runner import run_tp

NAMES = list(ZAMBA2)


@pytest.fixture(scope="module")
def zamba(tmp_path_factory):
    root = tmp_path_factory.mktemp("zamba2")
    out = {}
    for name in NAMES:
        hf = hf_model(hf_config(name))
        out[name] = (save(hf, root / name), hf)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_prompt_logits_and_states_match_hf(zamba, name):
    d, hf = zamba[name]
    ours = load_model(d)
    ref_logits, pkv = hf_prompt(hf, PROMPT)
    logits, states = prefill_states(ours, PROMPT)
    assert_close(logits, ref_logits, ulps=HF_ULPS, what="prompt logits")
    assert sorted(states) == list(range(len(ours.spec.layers))), "every layer has a Mamba2"
    for layer, (conv, ssm) in states.items():
        hf_conv = pkv.get_conv_state(layer, state_idx=0)[0]        # (C, K): one redundant column
        hf_ssm = pkv.get_recurrent_state(layer, state_idx=0)[0]    # (H, P, N)
        assert_close(conv, hf_conv[:, 1:], ulps=HF_ULPS, what=f"layer {layer} conv state")
        assert_close(ssm, hf_ssm.float(), ulps=HF_ULPS, what=f"layer {layer} SSM state")


@pytest.mark.parametrize("name", NAMES)
def test_hybrid_layer_kv_is_cached_at_its_own_index(zamba, name):
    """The shared block's K/V of hybrid layer i land in caches.kv(i), as HF's cache layer i."""
    d, hf = zamba[name]
    ours = load_model(d)
    _, pkv = hf_prompt(hf, PROMPT)
    caches = DenseCaches(ours.spec, num_blocks=6, block_tokens=8, kernel_block_tokens=4)
    table = torch.tensor([3, 0, 5])
    ours(ForwardBatch.build([PROMPT], [0], [table.tolist()], [1]), caches)
    hybrid = arch_config(ours.spec).shared.hybrid_layers
    assert sorted(caches._kv) == list(hybrid)
    kb, row = kv_slots(table, torch.arange(len(PROMPT)), 8, 4)
    for layer in hybrid:
        k, v = caches.kv(layer)
        hf_k, hf_v = pkv.layers[layer].keys[0], pkv.layers[layer].values[0]   # (KV, T, hd)
        assert_close(k[kb, :, row].transpose(0, 1), hf_k, ulps=HF_ULPS, what=f"layer {layer} K")
        assert_close(v[kb, :, row].transpose(0, 1), hf_v, ulps=HF_ULPS, what=f"layer {layer} V")


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_hf_generate(zamba, name):
    assert_greedy_matches_hf(*zamba[name])


def test_every_tied_copy_in_the_checkpoint_loads_the_same(zamba):
    """save_pretrained stores a shared block once; the in-memory state dict has every copy."""
    d, hf = zamba["zamba2"]
    spec = load_model_spec(d)
    every = {k: v.detach() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.layers.4.shared_transformer.") for k in every)
    a, b = build_model(spec, read_safetensors(d)), build_model(spec, every)
    batch = ForwardBatch.build([PROMPT], [0], [[0, 1]], [0])
    fresh = lambda: DenseCaches(spec, num_blocks=2, block_tokens=8)
    torch.testing.assert_close(a(batch, fresh()), b(batch, fresh()), atol=0, rtol=0)


def test_adapters_and_block_rotation_matter(zamba):
    """The parity tests can fail: dropping hybrid layer 4's adapters, or running shared block 1
    where block 0 belongs, moves the logits far beyond the 1e-4 tolerance."""
    d, _ = zamba["zamba2"]
    spec = load_model_spec(d)
    weights = read_safetensors(d)
    batch = ForwardBatch.build([PROMPT], [0], [[0, 1]], [0])
    run = lambda model: model(batch, DenseCaches(spec, num_blocks=2, block_tokens=8))
    base = run(build_model(spec, weights))
    no_adapter = build_model(spec, {k: (torch.zeros_like(v) if "adapter_list.2." in k else v)
                                    for k, v in weights.items()})
    one_block = build_model(spec, weights)
    one_block.shared[0].load_state_dict(one_block.shared[1].state_dict())
    assert (run(no_adapter) - base).abs().max().item() > 1e-3
    assert (run(one_block) - base).abs().max().item() > 1e-3


def test_unknown_tensor_is_named(zamba):
    d, _ = zamba["zamba2"]
    spec = load_model_spec(d)
    bad = dict(read_safetensors(d))
    bad["model.layers.1.shared_transformer.self_attn.gate.weight"] = torch.zeros(1)
    with pytest.raises(Zamba2WeightError, match="self_attn.gate.weight"):
        canonical_weights(spec, arch_config(spec), bad)


def test_attention_adapters_need_kv_equal_q():
    cfg = dict(ZAMBA2["zamba2"], num_key_value_heads=2, model_type="zamba2")
    cfg["num_hidden_layers"] = len(cfg["layers_block_type"])
    spec = load_model_spec(cfg)
    with pytest.raises(NotImplementedError, match="num_key_value_heads"):
        build_zamba2_layers(spec, arch_config(spec), SingleComm(), set())


N_NEW = 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tp_2_and_4_match_tp1(zamba, dtype):
    """Greedy tokens equal TP=1's, and each rank's states equal TP=1's cut by the ShardRules.
    TP=4 replicates zamba2_gqa's 2 KV heads and splits its single B/C group (norm all-reduce).
    float64 holds the same ulps budget as fp32, so it checks the states 5e8 times closer."""
    dirs = {name: d for name, (d, _) in zamba.items()}
    ref = tp_job(SingleComm(), dirs, PROMPT, N_NEW, dtype)
    for size in (2, 4):
        for rank, res in enumerate(run_tp(tp_job, size, dirs, PROMPT, N_NEW, dtype)):
            for name, (tokens, states) in res.items():
                ref_tokens, ref_states = ref[name]
                assert tokens == ref_tokens, f"{name} TP={size} rank {rank}"
                assert_rank_states_match(load_model_spec(dirs[name]), size, rank, states,
                                         ref_states)
