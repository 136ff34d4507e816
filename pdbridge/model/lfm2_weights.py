"""LFM2 checkpoint names -> canonical names (hf_names.py calls `lfm2_names` per layer tensor).

transformers 5.x Lfm2ForCausalLM: `operator_norm` before the mixer, `ffn_norm` before the
SwiGLU `feed_forward` (w1 gate, w3 up, w2 down); a short-conv layer's `conv.{in_proj, conv,
out_proj}`, an attention layer's `self_attn.{q,k,v,out}_proj` and `{q,k}_layernorm`. The final
norm is `embedding_norm` (hf_names' top-level table).
"""
from __future__ import annotations

import torch

from .weight_error import WeightError



class Lfm2WeightError(WeightError):
    """An LFM2 checkpoint tensor that has no place; the message names it."""

_PLAIN = {
    "operator_norm.weight": "mixer_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn.gate_proj.weight",
    "feed_forward.w3.weight": "ffn.up_proj.weight",
    "feed_forward.w2.weight": "ffn.down_proj.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.out_proj.weight": "attn.o_proj.weight",
    "self_attn.q_layernorm.weight": "attn.q_norm.weight",
    "self_attn.k_layernorm.weight": "attn.k_norm.weight",
    "conv.in_proj.weight": "conv.in_proj.weight",
    "conv.in_proj.bias": "conv.in_proj.bias",
    "conv.out_proj.weight": "conv.out_proj.weight",
    "conv.out_proj.bias": "conv.out_bias",          # row-parallel: added after the sum
    "conv.conv.bias": "conv.conv_bias",
}


def lfm2_names(spec, i: int, rest: str, t: torch.Tensor, experts) -> list[tuple[str, torch.Tensor]]:
    if rest == "conv.conv.weight":
        return [("conv.conv_weight", t.reshape(t.shape[0], -1))]         # (D, 1, L) -> (D, L)
    if rest in _PLAIN:
        return [(_PLAIN[rest], t)]
    raise Lfm2WeightError(f"unexpected lfm2 tensor layers.{i}.{rest}")


def lfm2_mlp_intermediate(cfg) -> int:
    """Lfm2MLP's width: with block_auto_adjust_ff_dim, 2/3 of intermediate_size, times
    block_ffn_dim_multiplier, rounded up to a multiple of block_multiple_of."""
    inter = int(cfg["intermediate_size"])
    if not cfg.get("block_auto_adjust_ff_dim", True):
        return inter
    inter = int(2 * inter / 3)
    mult = cfg.get("block_ffn_dim_multiplier", 1.0)
    if mult is not None:
        inter = int(mult * inter)
        of = int(cfg.get("block_multiple_of", 256))
        inter = of * ((inter + of - 1) // of)
    return inter
