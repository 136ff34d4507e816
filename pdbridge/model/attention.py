"""GQA attention over the paged KV cache (SDPA on gathered K/V: correctness first).

Weights hold this rank's query heads and the KV heads they use (shard.AttentionShard);
o_proj is row-parallel, summed across ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Rope
from .batch import ForwardBatch
from .precision import upcast
from .rope import apply_rope
from .shard import AttentionShard


def kv_slots(block_table: torch.Tensor, positions: torch.Tensor, block_tokens: int,
             kernel_block_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel block, row) of each token position, per the model/engine contract."""
    per = block_tokens // kernel_block_tokens
    blocks = block_table[positions // block_tokens]
    if bool((blocks < 0).any()):
        raise IndexError("ForwardBatch.block_tables lacks a block for a token position")
    kb = blocks * per + (positions % block_tokens) // kernel_block_tokens
    return kb, positions % kernel_block_tokens


class Attention(nn.Module):
    def __init__(self, shard: AttentionShard, hidden: int, layer: int, rope: Rope | None,
                 scale: float | None, key_multiplier: float, bias: bool, comm):
        super().__init__()
        hd = shard.spec.head_dim
        self.layer, self.rope, self.comm, self.head_dim = layer, rope, comm, hd
        self.scale = hd ** -0.5 if scale is None else scale
        self.key_multiplier = key_multiplier
        self.num_q, self.num_kv = shard.num_q, shard.num_kv
        self.q_proj = nn.Linear(hidden, shard.num_q * hd, bias=bias)
        self.k_proj = nn.Linear(hidden, shard.num_kv * hd, bias=bias)
        self.v_proj = nn.Linear(hidden, shard.num_kv * hd, bias=bias)
        self.o_proj = nn.Linear(shard.num_q * hd, hidden, bias=False)
        self.o_bias = nn.Parameter(torch.zeros(hidden)) if bias else None   # added after the sum
        self.register_buffer("kv_of_q", torch.tensor(shard.kv_of_q()), persistent=False)

    def forward(self, h: torch.Tensor, batch: ForwardBatch, caches, layer: int | None = None,
                qkv_delta: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:   # (T, D)
        """`layer`: the cache layer when it is not this module's own (Zamba2's shared block
        serves several layers); `qkv_delta`: (T, q_local), (T, kv_local), (T, kv_local) channel
        terms added to the projections (Zamba2's per-layer LoRA-style adapters)."""
        t = h.shape[0]
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if qkv_delta is not None:
            q, k, v = q + qkv_delta[0], k + qkv_delta[1], v + qkv_delta[2]
        q = q.view(t, self.num_q, self.head_dim)
        k = k.view(t, self.num_kv, self.head_dim) * self.key_multiplier
        v = v.view(t, self.num_kv, self.head_dim)
        if self.rope is not None:
            q, k = apply_rope(q, batch.positions, self.rope), apply_rope(k, batch.positions, self.rope)
        k_cache, v_cache = caches.kv(self.layer if layer is None else layer)
        out = torch.empty(t, self.num_q, self.head_dim, dtype=h.dtype, device=h.device)
        bt, kbt = caches.block_tokens, caches.kernel_block_tokens
        ctx_lens = batch.context_lens.tolist()
        for i, (a, b) in enumerate(batch.seq_spans()):
            table, ctx = batch.block_tables[i], ctx_lens[i]
            kb, row = kv_slots(table, torch.arange(ctx, ctx + b - a, device=h.device), bt, kbt)
            k_cache[kb, :, row] = k[a:b].to(k_cache.dtype)
            v_cache[kb, :, row] = v[a:b].to(v_cache.dtype)
            kb, row = kv_slots(table, torch.arange(ctx + b - a, device=h.device), bt, kbt)
            out[a:b] = self._attend(q[a:b], k_cache[kb, :, row].to(h.dtype),
                                    v_cache[kb, :, row].to(h.dtype), ctx)
        y = self.o_proj(out.reshape(t, self.num_q * self.head_dim))
        self.comm.all_reduce_(y)
        return y if self.o_bias is None else y + self.o_bias

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int) -> torch.Tensor:
        """q: (n, Hq, hd) at positions ctx..ctx+n-1; k, v: (ctx + n, Hkv, hd) -> (n, Hq, hd)."""
        k, v = k[:, self.kv_of_q], v[:, self.kv_of_q]                 # (S, Hq, hd)
        n, s = q.shape[0], k.shape[0]
        # SDPA (a fused kernel where one exists: no (Hq, n, S) score tensor in memory); its
        # softmax accumulates in fp32 for half types, as the upcast did.
        # 4-D (1, H, n|S, hd): the CPU fused kernel takes 4-D inputs only (3-D runs the math path)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        if ctx == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            dev = q.device
            causal = torch.arange(s, device=dev)[None, :] <= (torch.arange(n, device=dev)[:, None]
                                                               + ctx)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=self.scale)
        return out[0].transpose(0, 1)
