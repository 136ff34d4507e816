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
from .norm import RMSNorm
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


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int, block_tokens: int,
              kernel_block_tokens: int) -> torch.Tensor:
    """Cache rows of positions 0..num_tokens-1, (Hkv, num_tokens, hd): whole kernel blocks
    gathered (one index per block, not per token), then cut to length."""
    starts = torch.arange(0, num_tokens, kernel_block_tokens, device=cache.device)
    kb, _ = kv_slots(block_table, starts, block_tokens, kernel_block_tokens)
    blocks = cache[kb].transpose(0, 1)                              # (Hkv, m, kbt, hd)
    return blocks.flatten(1, 2)[:, :num_tokens]


class Attention(nn.Module):
    def __init__(self, shard: AttentionShard, hidden: int, layer: int, rope: Rope | None,
                 scale: float | None, key_multiplier: float, bias: bool, comm,
                 qk_norm_eps: float | None = None):
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
        # LFM2: RMSNorm over head_dim of every query and key head, before RoPE (per head, so
        # replicated under TP).
        self.q_norm = RMSNorm(hd, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(hd, qk_norm_eps) if qk_norm_eps is not None else None
        self.register_buffer("kv_of_q", torch.tensor(shard.kv_of_q()), persistent=False)
        # SDPA's GQA broadcast (query head q reads KV head q // (Hq / Hkv)) covers this rank's
        # heads unless TP cut a KV head's group of query heads unevenly: then index KV per head.
        per = shard.num_q // shard.num_kv
        self.sdpa_gqa = (shard.num_q % shard.num_kv == 0 and
                         shard.kv_of_q() == [q // per for q in range(shard.num_q)])

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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = apply_rope(q, batch.positions, self.rope), apply_rope(k, batch.positions, self.rope)
        out = self._cached_attention(q, k, v, batch, caches, layer)
        y = self.o_proj(out.reshape(t, self.num_q * self.head_dim))
        self.comm.all_reduce_(y)
        return y if self.o_bias is None else y + self.o_bias

    def _cached_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          batch: ForwardBatch, caches, layer: int | None = None) -> torch.Tensor:
        """Write each sequence's new K/V into its blocks, attend over its whole context:
        q (T, Hq, hd), k and v (T, Hkv, hd) -> (T, Hq, hd)."""
        k_cache, v_cache = caches.kv(self.layer if layer is None else layer)
        out = torch.empty_like(q)
        bt, kbt = caches.block_tokens, caches.kernel_block_tokens
        ctx_lens = batch.context_lens.tolist()
        for i, (a, b) in enumerate(batch.seq_spans()):
            table, ctx = batch.block_tables[i], ctx_lens[i]
            kb, row = kv_slots(table, torch.arange(ctx, ctx + b - a, device=q.device), bt, kbt)
            k_cache[kb, :, row] = k[a:b].to(k_cache.dtype)
            v_cache[kb, :, row] = v[a:b].to(v_cache.dtype)
            n = ctx + b - a
            out[a:b] = self._attend(q[a:b], gather_kv(k_cache, table, n, bt, kbt).to(q.dtype),
                                    gather_kv(v_cache, table, n, bt, kbt).to(q.dtype), ctx)
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int) -> torch.Tensor:
        """q: (n, Hq, hd) at positions ctx..ctx+n-1; k, v: (Hkv, ctx + n, hd) -> (n, Hq, hd).
        SDPA: a fused kernel where one exists (no (Hq, n, S) score tensor in memory); its
        softmax accumulates in fp32 for half types, as precision.upcast would."""
        if not self.sdpa_gqa:
            k, v = k.index_select(0, self.kv_of_q), v.index_select(0, self.kv_of_q)  # (Hq, S, hd)
        # 4-D (1, H, n|S, hd): the CPU fused kernel takes 4-D inputs only (3-D runs the math path)
        q, k, v = q.transpose(0, 1)[None], k[None], v[None]
        n, s, dev = q.shape[2], k.shape[2], q.device
        mask = None                 # ctx = 0: is_causal; one query (a decode step) sees all keys
        if ctx > 0 and n > 1:
            mask = torch.arange(s, device=dev)[None, :] <= torch.arange(n, device=dev)[:, None] + ctx
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=ctx == 0 and n > 1,
                                             scale=self.scale, enable_gqa=self.sdpa_gqa)
        return out[0].transpose(0, 1)
