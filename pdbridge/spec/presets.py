"""Real model shapes as config dicts, written from published numbers (REFERENCE.md).

Only geometry fields are given; these drive the planner, `pdbridge plan` and the transfer
benchmark. They carry no weights.
"""
from __future__ import annotations

import os
from typing import Any

from .hf_config import ConfigError, load_model_spec
from .model_spec import ModelSpec

_NEMOTRON_H_8B_PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
# 52 layers: 23 Mamba2, 23 MoE, 6 attention.
_NANO_30B_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
_LFM2_1_2B_TYPES = ["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv",
                    "conv", "full_attention", "conv", "full_attention", "conv", "full_attention",
                    "conv", "full_attention", "conv"]

PRESETS: dict[str, dict[str, Any]] = {
    "nemotron-h-8b": dict(
        model_type="nemotron_h", hidden_size=4096, vocab_size=131072,
        hybrid_override_pattern=_NEMOTRON_H_8B_PATTERN, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, mamba_num_heads=128, mamba_head_dim=64,
        ssm_state_size=128, n_groups=8, conv_kernel=4, dtype="bfloat16"),
    "nemotron-3-nano-30b-a3b": dict(
        model_type="nemotron_h", hidden_size=2688, vocab_size=131072,
        hybrid_override_pattern=_NANO_30B_PATTERN, num_attention_heads=32,
        num_key_value_heads=2, head_dim=128, mamba_num_heads=64, mamba_head_dim=64,
        ssm_state_size=128, n_groups=8, conv_kernel=4, dtype="bfloat16"),
    "granite-4.0-h-small": dict(
        model_type="granitemoehybrid", hidden_size=4096, vocab_size=100352, num_hidden_layers=40,
        layer_types=["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)],
        num_attention_heads=32, num_key_value_heads=8, mamba_n_heads=128, mamba_d_head=64,
        mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2,
        num_local_experts=72, dtype="bfloat16"),
    "falcon-h1-7b": dict(
        model_type="falcon_h1", hidden_size=3072, vocab_size=130049, num_hidden_layers=44,
        num_attention_heads=12, num_key_value_heads=2, head_dim=128, mamba_d_ssm=3072,
        mamba_n_heads=24, mamba_d_head=128, mamba_d_state=256, mamba_n_groups=1,
        mamba_d_conv=4, mamba_expand=2, dtype="bfloat16"),
    "qwen3-next-80b-a3b": dict(
        model_type="qwen3_next", hidden_size=2048, vocab_size=151936, num_hidden_layers=48,
        full_attention_interval=4, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512, dtype="bfloat16"),
    "jamba-mini-1.5": dict(
        model_type="jamba", hidden_size=4096, vocab_size=65536, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4,
        expert_layer_period=2, expert_layer_offset=1, num_experts=16, mamba_d_state=16,
        mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256, dtype="bfloat16"),
    "lfm2-1.2b": dict(
        model_type="lfm2", hidden_size=2048, vocab_size=65536, num_hidden_layers=16,
        layer_types=_LFM2_1_2B_TYPES, num_attention_heads=32, num_key_value_heads=8,
        conv_L_cache=3, dtype="bfloat16"),
}


def get_preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return load_model_spec({**PRESETS[name], "_name_or_path": name})


def resolve_model(name_or_path: str) -> ModelSpec:
    """A preset id, a directory holding config.json, or a config.json path."""
    if name_or_path in PRESETS:
        return get_preset(name_or_path)
    if os.path.exists(name_or_path):
        return load_model_spec(name_or_path)
    raise ConfigError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
                      f"nor a path to a config.json or a model directory")
