"""Tiny layouts for the transport tests (a hybrid NemotronH: Mamba2, attention, MLP)."""
from __future__ import annotations

from pdbridge.spec import CacheConfig, EngineLayout, load_model_spec


def tiny_config(**overrides) -> dict:
    cfg = dict(model_type="nemotron_h", hidden_size=64, vocab_size=128,
               hybrid_override_pattern="M*-M", num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
               conv_kernel=4, dtype="float32")
    cfg.update(overrides)
    return cfg


def tiny_layout(tp_size: int = 1, config: dict | None = None, **cache) -> EngineLayout:
    cache.setdefault("num_blocks", 4)
    return EngineLayout(load_model_spec(config or tiny_config()), tp_size, CacheConfig(**cache))
