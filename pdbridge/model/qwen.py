"""Qwen3-Next / Qwen3.5 pieces for Block: gated full attention, and the delta net builder.

Gated attention (transformers' Qwen3NextAttention / Qwen3_5Attention): q_proj emits, per query
head, [q (hd) | gate (hd)]; q and k pass a zero-centred RMSNorm over head_dim before the
(partial) rotary; the attention output is multiplied by sigmoid(gate) before o_proj. Per head,
so TP splits q_proj in whole 2*hd row blocks (tp.py) and needs no extra reduction.
"""
from __future__ import annotations

import torch
from torch import nn

from pdbridge.spec import AttentionSpec, GatedDeltaNetSpec

from .arch import ArchConfig
from .attention import Attention
from .batch import ForwardBatch
from .gdn import GatedDeltaNet
from .gdn_shard import gdn_shard
from .norm import RMSNorm
from .rope import apply_rope
from .shard import attention_shard


class GatedAttention(Attention):
    def __init__(self, a: AttentionSpec, hidden: int, layer: int, arch: ArchConfig, bias: bool,
                 comm):
        super().__init__(attention_shard(a, comm.size, comm.rank), hidden, layer, arch.rope,
                         None, 1.0, bias, comm)
        hd = a.head_dim
        self.q_proj = nn.Linear(hidden, self.num_q * 2 * hd, bias=bias)     # [q | gate] per head
        self.q_norm = RMSNorm(hd, arch.eps, arch.norm_offset)
        self.k_norm = RMSNorm(hd, arch.eps, arch.norm_offset)

    def forward(self, h: torch.Tensor, batch: ForwardBatch, caches) -> torch.Tensor:  # (T, D)
        t, hd = h.shape[0], self.head_dim
        q, gate = self.q_proj(h).view(t, self.num_q, 2 * hd).split([hd, hd], dim=-1)
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(h).view(t, self.num_kv, hd))
        v = self.v_proj(h).view(t, self.num_kv, hd)
        if self.rope is not None:
            q, k = apply_rope(q, batch.positions, self.rope), apply_rope(k, batch.positions, self.rope)
        out = self._cached_attention(q, k, v, batch, caches)              # (T, Hq, hd)
        out = out * torch.sigmoid(gate)
        y = self.o_proj(out.reshape(t, self.num_q * hd))
        self.comm.all_reduce_(y)
        return y if self.o_bias is None else y + self.o_bias


def build_gated_attention(a: AttentionSpec, hidden: int, layer: int, arch: ArchConfig, comm,
                          names: set[str]) -> GatedAttention:
    return GatedAttention(a, hidden, layer, arch, f"layers.{layer}.attn.q_proj.bias" in names, comm)


def build_gdn(g: GatedDeltaNetSpec, hidden: int, layer: int, arch: ArchConfig,
              comm) -> GatedDeltaNet:
    return GatedDeltaNet(gdn_shard(g, comm.size, comm.rank), hidden, layer, arch.mamba_act,
                         arch.eps, comm)
