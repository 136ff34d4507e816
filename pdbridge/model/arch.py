"""The arithmetic an architecture adds to the shared modules: epsilons, activations, RoPE,
muP-style multipliers, MoE routing. Read once from `ModelSpec.config` (the HF config.json).

Geometry (heads, groups, layer kinds) comes from the ModelSpec; everything here is the rest.
Sources: transformers 5.x modeling files of each architecture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from pdbridge.spec import ModelSpec

SUPPORTED = ("nemotron_h", "bamba", "granitemoehybrid", "falcon_h1", "zamba2", "qwen3_5_text",
             "qwen3_next", "lfm2", "jamba")


def _float(v: Any) -> float:
    if isinstance(v, dict) and "__float__" in v:      # transformers' JSON spelling of inf
        return float(v["__float__"])
    return float(v)


@dataclass(frozen=True)
class Rope:
    theta: float
    rotary_dim: int             # leading head_dim channels rotated (partial rotary)


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    router: str                 # "sigmoid_group" (NemotronH) | "softmax_topk" (Granite)
                                # | "softmax" (Qwen3-Next: softmax over all, then top-k)
    gated: bool                 # experts are act(gate) * up (Granite) or act(up) (NemotronH)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    shared_gate: bool = False   # Qwen3-Next: shared expert * sigmoid(shared_expert_gate . x)


@dataclass(frozen=True)
class SharedBlocks:
    """Zamba2: `num_blocks` shared transformer blocks, applied at the hybrid layers in rotation
    (hybrid layer j uses block j % num_blocks), each hybrid layer with its own low-rank adapters
    (MLP always; q/k/v when `attention_adapter`) of rank `adapter_rank`."""
    num_blocks: int
    hybrid_layers: tuple[int, ...]
    attention_adapter: bool
    adapter_rank: int

    def __post_init__(self):
        if self.num_blocks < 1 or self.adapter_rank < 1:
            raise ValueError(f"SharedBlocks: num_blocks={self.num_blocks} and "
                             f"adapter_rank={self.adapter_rank} must be >= 1")

    def block_of(self, layer: int) -> int:
        """The shared block a hybrid layer runs."""
        return self.hybrid_layers.index(layer) % self.num_blocks


@dataclass(frozen=True)
class ArchConfig:
    model_type: str
    eps: float                          # every RMSNorm, gated norm included
    mlp_act: str                        # "relu2" | "silu" | "gelu"
    mlp_gated: bool                     # SwiGLU-style gate * up
    mamba_act: str = "silu"
    dt_limit: tuple[float, float] = (0.0, math.inf)
    mamba_norm: bool = True             # gated RMSNorm after the scan (FalconH1: optional)
    norm_before_gate: bool = False      # FalconH1: y -> norm -> * silu(z)
    rope: Rope | None = None
    attn_scale: float | None = None     # None: head_dim ** -0.5
    embedding_multiplier: float = 1.0
    logits_multiplier: float = 1.0      # Granite divides by logits_scaling; FalconH1 multiplies
    residual_multiplier: float = 1.0    # Granite: residual + out * m
    attn_in_multiplier: float = 1.0     # FalconH1
    attn_out_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    key_multiplier: float = 1.0
    mlp_gate_multiplier: float = 1.0
    mlp_down_multiplier: float = 1.0
    zxbcdt_multipliers: tuple[float, ...] = (1.0,) * 5   # folded into in_proj at load time
    ssm_in_multiplier: float = 1.0
    moe: MoeConfig | None = None
    tie_word_embeddings: bool = False
    mamba_norm_eps: float | None = None  # the gated norm's own eps (Zamba2: 1e-5); None: eps
    shared: SharedBlocks | None = None   # Zamba2's shared transformer blocks
    norm_offset: float = 0.0            # 1.0: zero-centred RMSNorms, x_normed * (1 + w) (Qwen)
    gated_attention: bool = False       # Qwen: q_proj gives q | gate per head, q/k norms
    qk_norm: bool = False               # LFM2: RMSNorm (eps) of each q and k head before RoPE
    extra: Mapping[str, Any] = field(default_factory=dict)


def _rope(cfg: Mapping[str, Any], head_dim: int) -> Rope:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise NotImplementedError(f"rope_type={kind!r}; supported: 'default'")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return Rope(float(theta), int(head_dim * partial))


def _head_dim(spec: ModelSpec) -> int:
    from pdbridge.spec import MixerKind
    for layer in spec.layers:
        a = layer.mixer(MixerKind.ATTENTION)
        if a is not None:
            return a.head_dim
    return 0


def arch_config(spec: ModelSpec) -> ArchConfig:
    cfg, mt = spec.config, spec.model_type
    if mt not in SUPPORTED:
        raise NotImplementedError(f"pdbridge.model: model_type {mt!r} is not supported; "
                                  f"supported: {', '.join(SUPPORTED)}")
    return _BUILDERS[mt](cfg, spec)


def _nemotron_h(cfg, spec) -> ArchConfig:
    if cfg.get("moe_latent_size") is not None:
        raise NotImplementedError("nemotron_h: moe_latent_size is not supported")
    moe = MoeConfig(num_experts=int(cfg.get("n_routed_experts", 8)),
                    top_k=int(cfg.get("num_experts_per_tok", 2)), router="sigmoid_group",
                    gated=False, n_group=int(cfg.get("n_group", 1)),
                    topk_group=int(cfg.get("topk_group", 1)),
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                    routed_scaling_factor=_float(cfg.get("routed_scaling_factor", 1.0)))
    # NemotronH hard-codes (time_step_min, inf) as the dt clamp, whatever time_step_limit says.
    return ArchConfig(spec.model_type, eps=_float(cfg.get("layer_norm_epsilon", 1e-5)),
                      mlp_act=cfg.get("mlp_hidden_act", "relu2"), mlp_gated=False,
                      mamba_act=cfg.get("mamba_hidden_act", "silu"),
                      dt_limit=(_float(cfg.get("time_step_min", 0.001)), math.inf),
                      rope=None, moe=moe,
                      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _dt_limit(cfg) -> tuple[float, float]:
    lim = cfg.get("time_step_limit") or (0.0, math.inf)
    return _float(lim[0]), _float(lim[1])


def _bamba(cfg, spec) -> ArchConfig:
    return ArchConfig(spec.model_type, eps=_float(cfg.get("rms_norm_eps", 1e-5)),
                      mlp_act=cfg.get("hidden_act", "silu"), mlp_gated=True,
                      mamba_act=cfg.get("hidden_act", "silu"), dt_limit=_dt_limit(cfg),
                      rope=_rope(cfg, _head_dim(spec)),
                      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _granitemoehybrid(cfg, spec) -> ArchConfig:
    experts = int(cfg.get("num_local_experts") or 0)
    moe = MoeConfig(num_experts=experts, top_k=int(cfg.get("num_experts_per_tok", 2)),
                    router="softmax_topk", gated=True) if experts else None
    rope = _rope(cfg, _head_dim(spec)) if cfg.get("position_embedding_type") == "rope" else None
    return ArchConfig(spec.model_type, eps=_float(cfg.get("rms_norm_eps", 1e-6)),
                      mlp_act=cfg.get("hidden_act", "silu"), mlp_gated=True,
                      mamba_act=cfg.get("hidden_act", "silu"), dt_limit=_dt_limit(cfg), rope=rope,
                      attn_scale=_float(cfg.get("attention_multiplier", 1.0)),
                      embedding_multiplier=_float(cfg.get("embedding_multiplier", 1.0)),
                      logits_multiplier=1.0 / _float(cfg.get("logits_scaling", 1.0)),
                      residual_multiplier=_float(cfg.get("residual_multiplier", 1.0)), moe=moe,
                      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _falcon_h1(cfg, spec) -> ArchConfig:
    gate_m, down_m = (cfg.get("mlp_multipliers") or [1.0, 1.0])
    return ArchConfig(spec.model_type, eps=_float(cfg.get("rms_norm_eps", 1e-5)),
                      mlp_act=cfg.get("hidden_act", "silu"), mlp_gated=True,
                      mamba_act=cfg.get("hidden_act", "silu"), dt_limit=_dt_limit(cfg),
                      mamba_norm=bool(cfg.get("mamba_rms_norm", False)),
                      norm_before_gate=bool(cfg.get("mamba_norm_before_gate", True)),
                      rope=_rope(cfg, _head_dim(spec)),
                      embedding_multiplier=_float(cfg.get("embedding_multiplier", 1.0)),
                      logits_multiplier=_float(cfg.get("lm_head_multiplier", 1.0)),
                      attn_in_multiplier=_float(cfg.get("attention_in_multiplier", 1.0)),
                      attn_out_multiplier=_float(cfg.get("attention_out_multiplier", 1.0)),
                      ssm_out_multiplier=_float(cfg.get("ssm_out_multiplier", 1.0)),
                      key_multiplier=_float(cfg.get("key_multiplier", 1.0)),
                      mlp_gate_multiplier=_float(gate_m), mlp_down_multiplier=_float(down_m),
                      zxbcdt_multipliers=tuple(_float(v) for v in
                                               (cfg.get("ssm_multipliers") or [1.0] * 5)),
                      ssm_in_multiplier=_float(cfg.get("ssm_in_multiplier", 1.0)),
                      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _zamba2(cfg, spec) -> ArchConfig:
    from pdbridge.spec import MixerKind
    hybrid = tuple(l.index for l in spec.layers if l.mixer(MixerKind.ATTENTION) is not None)
    shared = SharedBlocks(int(cfg.get("num_mem_blocks", 1)), hybrid,
                          bool(cfg.get("use_shared_attention_adapter", False)),
                          int(cfg.get("adapter_rank", 128)))
    head_dim = _head_dim(spec)
    # Zamba2Attention scales by (head_dim / 2) ** -0.5: its heads see [h | embeddings], 2 x wide.
    # Its Mamba2 clamps dt to (time_step_min, inf) in prefill; its gated norm hard-codes 1e-5.
    return ArchConfig(spec.model_type, eps=_float(cfg.get("rms_norm_eps", 1e-5)),
                      mlp_act=cfg.get("hidden_act", "gelu"), mlp_gated=True,
                      dt_limit=(_float(cfg.get("time_step_min", 0.001)), math.inf),
                      rope=_rope(cfg, head_dim) if cfg.get("use_mem_rope") else None,
                      attn_scale=(head_dim / 2) ** -0.5, mamba_norm_eps=1e-5, shared=shared,
                      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _qwen_gdn(cfg, spec) -> ArchConfig:
    """Qwen3.5 (text) and Qwen3-Next: zero-centred RMSNorms (the delta net's gated norm is not),
    gated attention with partial rotary, SwiGLU MLP; Qwen3-Next's sparse MoE layers route by a
    softmax over all experts and gate the shared expert. Text positions are the same on the
    three mRoPE sections of Qwen3.5, so its rotary is the default one on `rotary_dim` channels."""
    experts = int(cfg.get("num_experts") or 0)
    moe = MoeConfig(num_experts=experts, top_k=int(cfg.get("num_experts_per_tok", 1)),
                    router="softmax", gated=True,
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                    shared_gate=True) if experts else None
    act = cfg.get("hidden_act", "silu")
    return ArchConfig(spec.model_type, eps=_float(cfg.get("rms_norm_eps", 1e-6)), mlp_act=act,
                      mlp_gated=True, mamba_act=act, rope=_rope(cfg, _head_dim(spec)), moe=moe,
                      norm_offset=1.0, gated_attention=True,
                      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _lfm2(cfg, spec) -> ArchConfig:
    """LFM2: SwiGLU MLP (its width: lfm2_weights.lfm2_mlp_intermediate), q/k norms, RoPE,
    tied embeddings by default; Lfm2Config has no MoE (lfm2_moe is another model type)."""
    return ArchConfig(spec.model_type, eps=_float(cfg.get("norm_eps", 1e-5)), mlp_act="silu",
                      mlp_gated=True, rope=_rope(cfg, _head_dim(spec)), qk_norm=True,
                      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _jamba(cfg, spec) -> ArchConfig:
    """Jamba: no RoPE; SwiGLU MLP, and on its expert layers a router that softmaxes over all
    experts and keeps the top-k weights unnormalised (JambaTopKRouter); Mamba1's dt/B/C norms
    use rms_norm_eps like every other norm."""
    experts = int(cfg.get("num_experts") or 1)
    moe = MoeConfig(num_experts=experts, top_k=int(cfg.get("num_experts_per_tok", 2)),
                    router="softmax", gated=True, norm_topk_prob=False) if experts > 1 else None
    act = cfg.get("hidden_act", "silu")
    return ArchConfig(spec.model_type, eps=_float(cfg.get("rms_norm_eps", 1e-6)), mlp_act=act,
                      mlp_gated=True, mamba_act=act, rope=None, moe=moe,
                      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


_BUILDERS = {"nemotron_h": _nemotron_h, "bamba": _bamba, "granitemoehybrid": _granitemoehybrid,
             "falcon_h1": _falcon_h1, "zamba2": _zamba2, "qwen3_5_text": _qwen_gdn,
             "qwen3_next": _qwen_gdn, "lfm2": _lfm2, "jamba": _jamba}
