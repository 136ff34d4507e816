"""Gated delta net mixer (Qwen3-Next, Qwen3.5): in_proj_qkv -> [q | k | v], in_proj_z, in_proj_b,
in_proj_a; causal depthwise conv (no bias) + activation over [q | k | v] with the conv state;
l2-normalised q, k repeated from k-heads to v-heads; the gated delta rule with
g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b); per-head RMSNorm then * silu(z);
row-parallel out_proj. (Qwen3-Next's interleaved in_proj_qkvz / in_proj_ba are split into
these four at load time: qwen_weights.py.)

Two implementations, switched like Mamba2's (`rule`, default ScanImpl.CHUNKED; `use_rule`):
CHUNKED runs each prefill chunk through gdn_chunked.chunked_rule and all of a batch's decode
steps through one conv update and one decode_step; RECURRENT is the per-sequence, per-token
oracle. tests/model/test_gdn_rule.py compares them over parameter grids.
This rank holds v-heads [v0, v1) and the k-heads [k0, k1) they use (gdn_shard.GdnShard): its
conv channels are [q_local | k_local | v_local], the cache's segment order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batch import ForwardBatch
from .gdn_chunked import DEFAULT_CHUNK_TOKENS, chunked_rule, decode_step, recurrent_rule
from .gdn_shard import GdnShard
from .mamba2 import ScanImpl
from .mlp import activation
from .precision import upcast

L2_EPS = 1e-6       # transformers' (and FLA's) l2norm epsilon


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


class GatedDeltaNet(nn.Module):
    def __init__(self, shard: GdnShard, hidden: int, layer: int, act: str, eps: float, comm,
                 rule: ScanImpl = ScanImpl.CHUNKED, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"GatedDeltaNet: chunk_tokens={chunk_tokens}; allowed: >= 1")
        g = shard.spec
        self.shard, self.layer, self.comm, self.eps = shard, layer, comm, eps
        self.rule, self.chunk_tokens = rule, chunk_tokens
        self.act = activation(act)
        self.in_proj_qkv = nn.Linear(hidden, shard.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, shard.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, shard.num_v, bias=False)
        self.in_proj_a = nn.Linear(hidden, shard.num_v, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(shard.conv_dim, g.d_conv))     # (C_local, K)
        self.dt_bias = nn.Parameter(torch.empty(shard.num_v))
        self.A_log = nn.Parameter(torch.empty(shard.num_v))
        self.norm_weight = nn.Parameter(torch.ones(g.head_v_dim))                 # shared by heads
        self.out_proj = nn.Linear(shard.value_dim, hidden, bias=False)
        self.register_buffer("k_of_v", torch.tensor(shard.k_of_v()), persistent=False)

    def forward(self, h: torch.Tensor, batch: ForwardBatch, caches) -> torch.Tensor:   # (T, D)
        sh = self.shard
        qkv, z = self.in_proj_qkv(h), self.in_proj_z(h)
        b, a = self.in_proj_b(h), self.in_proj_a(h)
        conv_cache, rec_cache = caches.conv(self.layer), caches.ssm(self.layer)
        _zero_fresh_slots(batch, conv_cache, rec_cache)
        o = torch.empty(h.shape[0], sh.num_v, sh.spec.head_v_dim, dtype=h.dtype, device=h.device)
        spans, slots = batch.seq_spans(), batch.state_slots.tolist()
        steps = [i for i, (s, e) in enumerate(spans)
                 if self.rule is ScanImpl.CHUNKED and e - s == 1]
        batched = set(steps)
        for i, (s, e) in enumerate(spans):
            if i not in batched:
                o[s:e] = self._prefill(qkv[s:e], b[s:e], a[s:e], conv_cache, rec_cache, slots[i])
        if steps:
            rows = torch.tensor([spans[i][0] for i in steps], device=h.device)
            o[rows] = self._decode(qkv[rows], b[rows], a[rows], conv_cache, rec_cache,
                                   torch.tensor([slots[i] for i in steps], device=conv_cache.device))
        out = self.out_proj(self._gated_norm(o, z).reshape(h.shape[0], sh.value_dim))
        self.comm.all_reduce_(out)
        return out

    def _prefill(self, qkv, b, a, conv_cache, rec_cache, slot: int) -> torch.Tensor:
        """One sequence's n new tokens, continuing the slot's state. -> (n, Hv_local, dv)."""
        q, k, v, g, beta = self._rule_inputs(self._conv(qkv, conv_cache, slot), b, a)
        state = rec_cache[slot].to(v.dtype)                                 # (Hv_l, dk, dv)
        if self.rule is ScanImpl.CHUNKED:
            o, state = chunked_rule(q, k, v, g, beta, state, self.chunk_tokens)
        else:
            o, state = recurrent_rule(q, k, v, g, beta, state)
        rec_cache[slot].copy_(state.to(rec_cache.dtype))
        return o.to(qkv.dtype)

    def _decode(self, qkv, b, a, conv_cache, rec_cache, slots: torch.Tensor) -> torch.Tensor:
        """One new token for each of S sequences (row s in `slots[s]`). -> (S, Hv_local, dv)."""
        q, k, v, g, beta = self._rule_inputs(self._conv_step(qkv, conv_cache, slots), b, a)
        o, state = decode_step(q, k, v, g, beta, rec_cache[slots].to(v.dtype))
        rec_cache.index_copy_(0, slots, state.to(rec_cache.dtype))
        return o.to(qkv.dtype)

    def _conv(self, x: torch.Tensor, conv_cache: torch.Tensor, slot: int) -> torch.Tensor:
        """x: (n, C_local) raw [q|k|v] -> conv + activation, (n, C_local); the state becomes the
        raw x of the last K-1 tokens, oldest first."""
        state = conv_cache[slot]                                            # (C_local, K-1)
        seq = torch.cat([state.to(x.dtype), x.t()], dim=1)                  # (C_local, K-1+n)
        state.copy_(seq[:, seq.shape[1] - state.shape[1]:])
        out = F.conv1d(seq[None], self.conv_weight[:, None, :], groups=seq.shape[0])[0]
        return self.act(out.t())

    def _conv_step(self, x: torch.Tensor, conv_cache: torch.Tensor,
                   slots: torch.Tensor) -> torch.Tensor:
        """x: (S, C_local), one token per sequence -> (S, C_local); shifts each slot's state."""
        window = torch.cat([conv_cache[slots].to(x.dtype), x[:, :, None]], dim=2)   # (S, C, K)
        conv_cache.index_copy_(0, slots, window[:, :, 1:].to(conv_cache.dtype))
        return self.act((window * self.conv_weight).sum(-1))

    def _rule_inputs(self, qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor):
        """conv output (n, C_local), b and a (n, Hv_l) -> q, k (n, Hv_l, dk) l2-normalised and
        repeated to v-heads, q scaled by dk ** -0.5; v (n, Hv_l, dv); g, beta (n, Hv_l); upcast."""
        sh, g = self.shard, self.shard.spec
        n = qkv.shape[0]
        q, k, v = upcast(qkv).split([sh.key_dim, sh.key_dim, sh.value_dim], dim=-1)
        q = l2norm(q.reshape(n, sh.num_k, g.head_k_dim))[:, self.k_of_v] * g.head_k_dim ** -0.5
        k = l2norm(k.reshape(n, sh.num_k, g.head_k_dim))[:, self.k_of_v]
        v = v.reshape(n, sh.num_v, g.head_v_dim)
        beta = upcast(torch.sigmoid(b))             # sigmoid in the model's dtype, as HF
        decay = -torch.exp(upcast(self.A_log)) * F.softplus(upcast(a) + upcast(self.dt_bias))
        return q, k, v, decay, beta

    def _gated_norm(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMSNorm over each head's dv channels, times the weight, then * silu(z).
        o: (T, Hv_l, dv); z: (T, Hv_l * dv). Per head, so no TP reduction is needed."""
        of = upcast(o)
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.norm_weight * of.to(o.dtype)
        y = upcast(y) * F.silu(upcast(z).view(o.shape))
        return y.to(o.dtype)


def _zero_fresh_slots(batch: ForwardBatch, conv_cache: torch.Tensor,
                      rec_cache: torch.Tensor) -> None:
    """A sequence with no context starts from zero state: its slot may hold an old request's."""
    fresh = batch.state_slots[batch.context_lens == 0]
    if fresh.numel():
        fresh = fresh.to(conv_cache.device)
        conv_cache.index_fill_(0, fresh, 0.0)
        rec_cache.index_fill_(0, fresh, 0.0)


def use_rule(model: nn.Module, impl: ScanImpl, chunk_tokens: int | None = None) -> None:
    """Switch every gated delta net of `model` to `impl` (and chunk size, if given)."""
    for mod in model.modules():
        if isinstance(mod, GatedDeltaNet):
            mod.rule = impl
            if chunk_tokens is not None:
                mod.chunk_tokens = chunk_tokens
