"""pdbridge.model at TP=1 against transformers on tiny random models (fp32)."""
import pytest
import torch

from hf_tiny import ARCHS, PROMPT, assert_greedy_matches_hf, hf_prompt, prefill_states
from numerics import HF_ULPS, assert_close
from pdbridge.model import load_model


@pytest.mark.parametrize("name", [*ARCHS, "unusual"])
def test_prompt_logits_and_states_match_hf(tiny, name):
    d, hf = tiny[name]
    ours = load_model(d)
    ref_logits, pkv = hf_prompt(hf, PROMPT)
    logits, states = prefill_states(ours, PROMPT)
    assert_close(logits, ref_logits, ulps=HF_ULPS, what="prompt logits")
    assert states, "every tiny model has Mamba2 layers"
    for layer, (conv, ssm) in states.items():
        hf_conv = pkv.get_conv_state(layer, state_idx=0)[0]        # (C, K): one redundant column
        hf_ssm = pkv.get_recurrent_state(layer, state_idx=0)[0]    # (H, P, N)
        assert_close(conv, hf_conv[:, 1:], ulps=HF_ULPS, what=f"layer {layer} conv state")
        assert_close(ssm, hf_ssm.float(), ulps=HF_ULPS, what=f"layer {layer} SSM state")


@pytest.mark.parametrize("name", [*ARCHS, "unusual"])
def test_greedy_tokens_match_hf_generate(tiny, name):
    assert_greedy_matches_hf(*tiny[name])


def test_short_prompt_zero_pads_conv_state(tiny):
    d, hf = tiny["bamba"]
    ours = load_model(d)
    _, pkv = hf_prompt(hf, PROMPT[:2])
    _, states = prefill_states(ours, PROMPT[:2])
    conv, _ = states[0]
    assert_close(conv, pkv.get_conv_state(0, state_idx=0)[0][:, 1:], ulps=HF_ULPS,
                 what="conv state")
    assert torch.all(conv[:, 0] == 0), "K-1 = 3 state columns, 2 tokens: the oldest is padding"


@pytest.mark.parametrize("over", [dict(mamba_rms_norm=False),
                                  dict(mamba_norm_before_gate=False, mamba_n_groups=2)])
def test_falcon_h1_norm_variants(tmp_path, over):
    from hf_tiny import hf_config, hf_model, save
    hf = hf_model(hf_config("falcon_h1", **over))
    ours = load_model(save(hf, tmp_path / "f"))
    ref_logits, _ = hf_prompt(hf, PROMPT)
    logits, _ = prefill_states(ours, PROMPT)
    assert_close(logits, ref_logits, ulps=HF_ULPS, what="prompt logits")
