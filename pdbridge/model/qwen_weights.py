"""Qwen3.5 (text) and Qwen3-Next checkpoint names -> canonical names, and TP cuts of the delta net.

Canonical delta-net names: layers.{i}.gdn.{in_proj_qkv, in_proj_z, in_proj_b, in_proj_a,
out_proj}.weight, layers.{i}.gdn.{conv_weight (C, K), dt_bias, A_log, norm_weight}.
Qwen3-Next's in_proj_qkvz / in_proj_ba are interleaved per k-head group (transformers'
`fix_query_key_value_ordering`): for each k-head, [q (dk) | k (dk) | v (r*dv) | z (r*dv)] rows and
[b (r) | a (r)] rows, r = Hv / Hk. Regrouped here into Qwen3.5's separate projections, so one
module serves both. Qwen3.5 checkpoints of the multimodal `qwen3_5` keep the text model under
`model.language_model.` (hf_names strips it; the vision tower is not loaded).
"""
from __future__ import annotations

import re

import torch

from pdbridge.spec import FfnKind, GatedDeltaNetSpec, MixerKind

from .gdn_shard import GdnShard
from .weight_error import WeightError


class QwenWeightError(WeightError):
    """A Qwen checkpoint tensor pdbridge cannot place; the message names it."""


_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(up|down|gate)_proj\.weight$")
_PREFIX = {"input_layernorm.": "mixer_norm.", "post_attention_layernorm.": "ffn_norm.",
           "self_attn.": "attn."}
_GDN = {"in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight",
        "dt_bias", "A_log", "out_proj.weight"}


def qwen_names(spec, i: int, rest: str, t: torch.Tensor, experts) -> list[tuple[str, torch.Tensor]]:
    for a, b in _PREFIX.items():
        if rest.startswith(a):
            return [(b + rest[len(a):], t)]
    if rest.startswith("linear_attn."):
        return _gdn_names(spec.layers[i].mixer(MixerKind.GATED_DELTA_NET), i,
                          rest[len("linear_attn."):], t)
    if spec.layers[i].ffn is FfnKind.MLP and rest.startswith("mlp."):
        return [("ffn." + rest[len("mlp."):], t)]
    m = _EXPERT.match(rest)
    if m:
        experts.setdefault((i, m.group(2)), {})[int(m.group(1))] = t
        return []
    if rest == "mlp.experts.gate_up_proj":                  # (E, 2I, D): [gate | up]
        gate, up = t.chunk(2, dim=1)
        return [("ffn.experts_gate", gate), ("ffn.experts_up", up)]
    moe = {"mlp.experts.down_proj": "ffn.experts_down", "mlp.gate.weight": "ffn.router_weight",
           "mlp.shared_expert_gate.weight": "ffn.shared_gate.weight"}
    if rest in moe:
        return [(moe[rest], t)]
    if rest.startswith("mlp.shared_expert."):
        return [("ffn.shared." + rest[len("mlp.shared_expert."):], t)]
    raise QwenWeightError(f"unexpected {spec.model_type} tensor layers.{i}.{rest}")


def _gdn_names(g: GatedDeltaNetSpec | None, i: int, leaf: str, t: torch.Tensor):
    if g is None:
        raise QwenWeightError(f"layers.{i}.linear_attn.{leaf}: layer {i} is not a delta-net layer")
    if leaf in _GDN:
        return [("gdn." + leaf, t)]
    if leaf == "conv1d.weight":
        return [("gdn.conv_weight", t.reshape(t.shape[0], -1))]      # (C, 1, K) -> (C, K)
    if leaf == "norm.weight":
        return [("gdn.norm_weight", t)]
    if leaf == "in_proj_qkvz.weight":
        qkv, z = split_qkvz(g, t)
        return [("gdn.in_proj_qkv.weight", qkv), ("gdn.in_proj_z.weight", z)]
    if leaf == "in_proj_ba.weight":
        b, a = split_ba(g, t)
        return [("gdn.in_proj_b.weight", b), ("gdn.in_proj_a.weight", a)]
    raise QwenWeightError(f"unexpected delta-net tensor layers.{i}.linear_attn.{leaf}")


def split_qkvz(g: GatedDeltaNetSpec, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hk * (2dk + 2r*dv), D) interleaved per k-head -> [q | k | v] rows (conv order) and z."""
    r = g.num_v_heads // g.num_k_heads
    dk, dv = g.head_k_dim, g.head_v_dim
    _check_rows("in_proj_qkvz", w, g.num_k_heads * (2 * dk + 2 * r * dv))
    per = w.view(g.num_k_heads, 2 * dk + 2 * r * dv, -1)
    q, k, v, z = per.split([dk, dk, r * dv, r * dv], dim=1)
    flat = lambda x: x.reshape(-1, w.shape[-1])             # k-head major: v-head kh * r + j
    return torch.cat([flat(q), flat(k), flat(v)]), flat(z)


def split_ba(g: GatedDeltaNetSpec, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hk * 2r, D) interleaved per k-head -> b (Hv, D), a (Hv, D)."""
    r = g.num_v_heads // g.num_k_heads
    _check_rows("in_proj_ba", w, 2 * g.num_v_heads)
    b, a = w.view(g.num_k_heads, 2 * r, -1).split([r, r], dim=1)
    return b.reshape(-1, w.shape[-1]), a.reshape(-1, w.shape[-1])


def _check_rows(name: str, w: torch.Tensor, rows: int) -> None:
    """An interleaved tensor is regrouped before the shape check sees it: check it here."""
    if w.dim() != 2 or w.shape[0] != rows:
        raise QwenWeightError(f"linear_attn.{name}.weight: shape {tuple(w.shape)}, but config.json "
                              f"implies ({rows}, hidden_size)")


def shard_gdn(sh: GdnShard, leaf: str, t: torch.Tensor) -> torch.Tensor:
    """Rank `sh`'s share of one canonical delta-net tensor."""
    rows = sh.rows()
    if leaf in ("in_proj_qkv.weight", "conv_weight"):
        return t.index_select(0, rows["qkv"])
    if leaf == "in_proj_z.weight":
        return t.index_select(0, rows["value"])
    if leaf in ("in_proj_b.weight", "in_proj_a.weight", "dt_bias", "A_log"):
        return t.index_select(0, rows["heads"])
    if leaf == "out_proj.weight":
        return t.index_select(1, rows["value"])
    if leaf == "norm_weight":
        return t                                # per head_v_dim, shared by every head
    raise QwenWeightError(f"unexpected delta-net parameter gdn.{leaf}")
