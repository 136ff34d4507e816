"""Tensor parallelism as a transform of the loaded weights (gpt-fast style).

`shard_weights` cuts the canonical full tensors into rank r's share by the spec's ShardRules
(shard.py): Mamba2 z/x channels, heads (dt, A, D) by whole heads, B/C by the groups the local
heads use (any n_groups, 1 included); gated delta nets by v-heads, q/k by the k-heads those use
(gdn_shard.py, qwen_weights.shard_gdn); attention query heads split (gated attention's [q | gate]
rows as one unit per head), KV heads the ones the local query heads use; MLP / expert intermediate channels split; row-parallel weights (o_proj,
out_proj, down_proj) split along their input; embeddings, lm_head, norms, routers replicated.
Mamba1 (mamba1.shard_mamba1) and short conv (short_conv.shard_short_conv): plain channel splits,
x_proj / out_proj along their input.
"""
from __future__ import annotations

import re

import torch

from pdbridge.spec import MixerKind, ModelSpec

from .gdn_shard import gdn_shard
from .mamba1 import shard_mamba1
from .qwen_weights import shard_gdn
from .shard import AttentionShard, Mamba2Shard, attention_shard, mamba2_shard, split_units
from .short_conv import shard_short_conv

_NAME = re.compile(r"^layers\.(\d+)\.(attn|mamba|mamba1|conv|gdn|ffn)\.(.*)$")


def _rows(n0: int, n1: int, unit: int) -> torch.Tensor:
    return torch.arange(n0 * unit, n1 * unit)


def mamba_rows(sh: Mamba2Shard) -> dict[str, torch.Tensor]:
    """Global indices of this rank's rows of in_proj (z|x|B|C|dt) and of the conv ([x|B|C])."""
    m = sh.spec
    i_, gn = m.intermediate, m.n_groups * m.d_state
    x = _rows(sh.h0, sh.h1, m.head_dim)
    b = _rows(sh.g0, sh.g1, m.d_state)
    conv = torch.cat([x, i_ + b, i_ + gn + b])
    heads = torch.arange(sh.h0, sh.h1)
    return {"in_proj": torch.cat([x, i_ + conv, 2 * i_ + 2 * gn + heads]), "conv": conv,
            "heads": heads, "channels": x}


def _mamba(sh: Mamba2Shard, name: str, t: torch.Tensor) -> torch.Tensor:
    idx = mamba_rows(sh)
    if name.startswith("in_proj."):
        return t.index_select(0, idx["in_proj"])
    if name in ("conv_weight", "conv_bias"):
        return t.index_select(0, idx["conv"])
    if name in ("dt_bias", "A_log", "D"):
        return t.index_select(0, idx["heads"])
    if name == "norm.weight":
        return t.index_select(0, idx["channels"])
    if name == "out_proj.weight":
        return t.index_select(1, idx["channels"])
    return t                                    # out_bias: added once, after the sum


def _attention(sh: AttentionShard, name: str, t: torch.Tensor) -> torch.Tensor:
    hd = sh.spec.head_dim
    q, kv = _rows(sh.q0, sh.q1, hd), _rows(sh.kv0, sh.kv1, hd)
    if name.startswith("q_proj."):      # gated attention (Qwen): [q | gate] rows, 2 hd a head
        return t.index_select(0, _rows(sh.q0, sh.q1, t.shape[0] // sh.spec.num_q_heads))
    if name.startswith(("k_proj.", "v_proj.")):
        return t.index_select(0, kv)
    if name == "o_proj.weight":
        return t.index_select(1, q)
    return t


def _ffn(name: str, t: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    leaf = name.split(".", 1)[1] if name.startswith("shared.") else name
    if leaf in ("up_proj.weight", "gate_proj.weight", "up_proj.bias", "gate_proj.bias"):
        a, b = split_units(t.shape[0], size, rank)
        return t[a:b]
    if leaf == "down_proj.weight":
        a, b = split_units(t.shape[1], size, rank)
        return t[:, a:b]
    if leaf in ("experts_up", "experts_gate"):
        a, b = split_units(t.shape[1], size, rank)
        return t[:, a:b]
    if leaf == "experts_down":
        a, b = split_units(t.shape[2], size, rank)
        return t[:, :, a:b]
    return t                                    # router, biases added after the sum


def shard_weights(spec: ModelSpec, full: dict[str, torch.Tensor], rank: int, size: int
                  ) -> dict[str, torch.Tensor]:
    """Rank `rank` of `size`'s share of the canonical weights (the same names)."""
    if size == 1:
        return dict(full)
    out = {}
    for name, t in full.items():
        m = _NAME.match(name)
        if m is None:
            out[name] = t                       # embed, lm_head, norms: replicated
            continue
        layer, part, leaf = spec.layers[int(m.group(1))], m.group(2), m.group(3)
        if part == "mamba":
            out[name] = _mamba(mamba2_shard(layer.mixer(MixerKind.MAMBA2), size, rank), leaf, t)
        elif part == "gdn":
            out[name] = shard_gdn(gdn_shard(layer.mixer(MixerKind.GATED_DELTA_NET), size, rank),
                                  leaf, t)
        elif part == "mamba1":
            out[name] = shard_mamba1(layer.mixer(MixerKind.MAMBA1), leaf, t, size, rank)
        elif part == "conv":
            out[name] = shard_short_conv(layer.mixer(MixerKind.SHORT_CONV), leaf, t, size, rank)
        elif part == "attn":
            out[name] = _attention(attention_shard(layer.mixer(MixerKind.ATTENTION), size, rank),
                                   leaf, t)
        else:
            out[name] = _ffn(leaf, t, size, rank)
    return {k: v.contiguous() for k, v in out.items()}
