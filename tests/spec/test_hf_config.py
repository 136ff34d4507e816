"""Model specs from Hugging Face configs: every supported model_type, both NemotronH pattern
spellings, Qwen3.5's text_config, and errors that name the field."""
import json

import pytest

from pdbridge.spec import ConfigError, MixerKind, load_model_spec
from pdbridge.spec.hf_config import BUILDERS

transformers = pytest.importorskip("transformers")

HF_CONFIGS = {
    "nemotron_h": lambda: transformers.NemotronHConfig(
        layers_block_type=["mamba", "attention", "mlp", "moe", "mamba"]),
    "bamba": lambda: transformers.BambaConfig(num_hidden_layers=4, attn_layer_indices=[2]),
    "granitemoehybrid": lambda: transformers.GraniteMoeHybridConfig(
        num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"]),
    "falcon_h1": lambda: transformers.FalconH1Config(num_hidden_layers=2),
    "jamba": lambda: transformers.JambaConfig(num_hidden_layers=8),
    "zamba2": lambda: transformers.Zamba2Config(
        num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "mamba"]),
    "qwen3_next": lambda: transformers.Qwen3NextConfig(num_hidden_layers=4),
    "qwen3_5_text": lambda: transformers.Qwen3_5TextConfig(num_hidden_layers=4),
    "lfm2": lambda: transformers.Lfm2Config(num_hidden_layers=4,
                                            layer_types=["conv", "full_attention", "conv", "conv"]),
    "llama": lambda: transformers.LlamaConfig(num_hidden_layers=2),
    "qwen3": lambda: transformers.Qwen3Config(num_hidden_layers=2),
}


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
def test_transformers_configs_parse(model_type, tmp_path):
    cfg = HF_CONFIGS[model_type]()
    cfg.save_pretrained(tmp_path)           # through a real config.json on disk
    spec = load_model_spec(tmp_path)
    assert spec.model_type == model_type
    assert spec.num_layers == cfg.num_hidden_layers
    d = json.loads((tmp_path / "config.json").read_text())
    assert spec.hidden_size == d["hidden_size"]
    for layer in spec.layers:
        for m in layer.mixers:
            if m.kind is MixerKind.ATTENTION:
                assert m.num_q_heads == d["num_attention_heads"]


def test_every_builder_is_exercised():
    assert set(BUILDERS) - {"qwen3_5", "mistral", "qwen2"} <= set(HF_CONFIGS)


def test_nemotron_pattern_spellings_agree():
    base = transformers.NemotronHConfig().to_dict()
    pattern = "M-M*-ME"
    legacy = dict(base, hybrid_override_pattern=pattern)
    legacy.pop("layers_block_type")
    names = {"M": "mamba", "-": "mlp", "*": "attention", "E": "moe"}
    modern = dict(base, layers_block_type=[names[c] for c in pattern])
    a, b = load_model_spec(legacy), load_model_spec(modern)
    assert a.layers == b.layers
    assert a.pattern() == pattern


def test_qwen3_5_text_config_is_unwrapped():
    outer = transformers.Qwen3_5Config().to_dict()
    spec = load_model_spec(outer)
    assert spec.model_type == "qwen3_5_text"
    gdn = spec.layers_with(MixerKind.GATED_DELTA_NET)[0].mixers[0]
    assert gdn.num_v_heads == outer["text_config"]["linear_num_value_heads"]


def test_unknown_model_type_lists_supported():
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'.*bamba.*nemotron_h"):
        load_model_spec({"model_type": "gpt2", "hidden_size": 8})


def test_bad_fields_are_named():
    cfg = transformers.BambaConfig(num_hidden_layers=2).to_dict()
    with pytest.raises(ConfigError, match="'mamba_n_heads'"):
        load_model_spec({k: v for k, v in cfg.items() if k != "mamba_n_heads"})
    with pytest.raises(ConfigError, match="'mamba_d_state' must be an integer"):
        load_model_spec(dict(cfg, mamba_d_state="big"))
    nem = dict(transformers.NemotronHConfig().to_dict(), layers_block_type=["mamba", "rnn"])
    with pytest.raises(ConfigError, match=r"layers_block_type\[1\] = 'rnn'; allowed"):
        load_model_spec(nem)
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_spec("/nonexistent/dir")
