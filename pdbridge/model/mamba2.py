"""Mamba2 mixer: in_proj -> z | x | B | C | dt, causal depthwise conv over [x | B | C] with the
conv state, per-head SSM recurrence, gated RMSNorm, row-parallel out_proj.

Two implementations, chosen per module (`scan`, default ScanImpl.CHUNKED; `use_scan(model, impl)`
switches a whole model):
* CHUNKED, the fast path: each prefill chunk through the chunked SSD scan (ssd.chunked_scan), and
  all the batch's decode steps (one new token each) through one conv update and one SSM step
  for every such sequence at once (no Python loop over sequences or tokens);
* RECURRENT, the oracle: per sequence, the causal conv and the exact per-token recurrence
  (ssd.recurrent_scan). tests/model/test_ssd.py compares the two over parameter grids.
This rank holds heads [h0, h1) and the B/C groups [g0, g1) they use (shard.Mamba2Shard), so
its conv channels are [x_local | B_local | C_local]: exactly the cache's segment order.
"""
from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ArchConfig
from .batch import ForwardBatch
from .mlp import activation
from .norm import GatedRMSNorm
from .precision import upcast
from .shard import Mamba2Shard
from .ssd import DEFAULT_CHUNK_TOKENS, chunked_scan, decode_step, recurrent_scan


class ScanImpl(Enum):
    CHUNKED = "chunked"         # SSD prefill + batched decode (fast)
    RECURRENT = "recurrent"     # per-sequence, per-token recurrence (the oracle)


class Mamba2(nn.Module):
    def __init__(self, shard: Mamba2Shard, hidden: int, layer: int, arch: ArchConfig,
                 norm_reduce: bool, comm, in_bias: bool = False, out_bias: bool = False,
                 conv_bias: bool = True, scan: ScanImpl = ScanImpl.CHUNKED,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"Mamba2: chunk_tokens={chunk_tokens}; allowed: >= 1")
        self.scan, self.chunk_tokens = scan, chunk_tokens
        m = shard.spec
        self.layer, self.comm, self.shard = layer, comm, shard
        self.act = activation(arch.mamba_act)
        self.dt_min, self.dt_max = arch.dt_limit
        i_l, c_l, h_l = shard.intermediate, shard.conv_dim, shard.num_heads
        self.in_proj = nn.Linear(hidden, i_l + c_l + h_l, bias=in_bias)
        self.conv_weight = nn.Parameter(torch.empty(c_l, m.d_conv))          # (C_local, K)
        self.conv_bias = nn.Parameter(torch.zeros(c_l)) if conv_bias else None
        self.dt_bias = nn.Parameter(torch.empty(h_l))
        self.A_log = nn.Parameter(torch.empty(h_l))
        self.D = nn.Parameter(torch.empty(h_l))
        self.norm = (GatedRMSNorm(i_l, shard.h0 * m.head_dim, shard.norm_group_size(), m.n_groups,
                                  arch.eps, arch.norm_before_gate, norm_reduce, comm)
                     if arch.mamba_norm else None)
        self.out_proj = nn.Linear(i_l, hidden, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(hidden)) if out_bias else None
        self.register_buffer("group_of_head", torch.tensor(shard.group_of_head()), persistent=False)

    def forward(self, h: torch.Tensor, batch: ForwardBatch, caches) -> torch.Tensor:   # (T, D)
        sh = self.shard
        z, xbc, dt = self.in_proj(h).split([sh.intermediate, sh.conv_dim, sh.num_heads], dim=-1)
        conv_cache, ssm_cache = caches.conv(self.layer), caches.ssm(self.layer)
        _zero_fresh_slots(batch, conv_cache, ssm_cache)
        y = torch.empty(h.shape[0], sh.intermediate, dtype=h.dtype, device=h.device)
        spans, slots = batch.seq_spans(), batch.state_slots.tolist()
        # Fast path: every one-token sequence (a decode step) of the batch in one _decode call.
        steps = [i for i, (a, b) in enumerate(spans)
                 if self.scan is ScanImpl.CHUNKED and b - a == 1]
        batched = set(steps)
        for i, (a, b) in enumerate(spans):
            if i not in batched:
                y[a:b] = self._prefill(xbc[a:b], dt[a:b], conv_cache, ssm_cache, slots[i])
        if steps:
            rows = torch.tensor([spans[i][0] for i in steps], device=h.device)   # their tokens
            y[rows] = self._decode(xbc[rows], dt[rows], conv_cache, ssm_cache,
                                   torch.tensor([slots[i] for i in steps], device=conv_cache.device))
        if self.norm is not None:
            y = self.norm(y, z)
        else:
            y = y * F.silu(z)
        out = self.out_proj(y)
        self.comm.all_reduce_(out)
        return out if self.out_bias is None else out + self.out_bias

    def _prefill(self, xbc: torch.Tensor, dt_raw: torch.Tensor, conv_cache: torch.Tensor,
                 ssm_cache: torch.Tensor, slot: int) -> torch.Tensor:
        """One sequence's n new tokens, continuing the slot's state. -> (n, I_local)."""
        x, dt, b, c = self._ssm_inputs(self._conv(xbc, conv_cache, slot), dt_raw)
        state = ssm_cache[slot].to(x.dtype)                                  # (H_l, P, N)
        if self.scan is ScanImpl.CHUNKED:
            y, state = chunked_scan(x, dt, self._a(), b, c, state, self.chunk_tokens)
        else:
            y, state = recurrent_scan(x, dt, self._a(), b, c, state)
        ssm_cache[slot].copy_(state.to(ssm_cache.dtype))
        return self._skip(y, x, xbc.dtype)

    def _decode(self, xbc: torch.Tensor, dt_raw: torch.Tensor, conv_cache: torch.Tensor,
                ssm_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One new token for each of S sequences (row s in `slots[s]`). -> (S, I_local)."""
        x, dt, b, c = self._ssm_inputs(self._conv_step(xbc, conv_cache, slots), dt_raw)
        y, state = decode_step(x, dt, self._a(), b, c, ssm_cache[slots].to(x.dtype))
        ssm_cache.index_copy_(0, slots, state.to(ssm_cache.dtype))
        return self._skip(y, x, xbc.dtype)

    def _conv(self, xbc: torch.Tensor, conv_cache: torch.Tensor, slot: int) -> torch.Tensor:
        """xbc: (n, C_local) raw projections -> conv + activation, (n, C_local); updates the state
        to the raw xbc of the last K-1 tokens, oldest first."""
        state = conv_cache[slot]                                            # (C_local, K-1)
        seq = torch.cat([state.to(xbc.dtype), xbc.t()], dim=1)             # (C_local, K-1+n)
        state.copy_(seq[:, seq.shape[1] - state.shape[1]:])
        out = F.conv1d(seq[None], self.conv_weight[:, None, :], self.conv_bias,
                       groups=seq.shape[0])[0]                              # (C_local, n)
        return self.act(out.t())

    def _conv_step(self, xbc: torch.Tensor, conv_cache: torch.Tensor,
                   slots: torch.Tensor) -> torch.Tensor:
        """xbc: (S, C_local), one token per sequence -> conv + activation, (S, C_local); shifts
        each slot's state by that token."""
        window = torch.cat([conv_cache[slots].to(xbc.dtype), xbc[:, :, None]], dim=2)  # (S, C, K)
        conv_cache.index_copy_(0, slots, window[:, :, 1:].to(conv_cache.dtype))
        out = (window * self.conv_weight).sum(-1)
        return self.act(out if self.conv_bias is None else out + self.conv_bias)

    def _ssm_inputs(self, xbc: torch.Tensor, dt_raw: torch.Tensor):
        """conv output (n, C_local), raw dt (n, H_l) -> x (n, H_l, P), dt (n, H_l), B and C
        expanded from groups to heads (n, H_l, N); all upcast (precision.py)."""
        sh, m = self.shard, self.shard.spec
        n, ns = xbc.shape[0], m.d_state
        x, bmat, cmat = xbc.split([sh.intermediate, sh.num_groups * ns, sh.num_groups * ns], -1)
        x = upcast(x).view(n, sh.num_heads, m.head_dim)
        bmat = upcast(bmat).view(n, sh.num_groups, ns)[:, self.group_of_head]
        cmat = upcast(cmat).view(n, sh.num_groups, ns)[:, self.group_of_head]
        dt = F.softplus(upcast(dt_raw) + upcast(self.dt_bias))
        # HF clamps dt to the limit in prefill only; we clamp always (identical unless it fires).
        if self.dt_min > 0.0 or not math.isinf(self.dt_max):
            dt = dt.clamp(self.dt_min, self.dt_max)
        return x, dt, bmat, cmat

    def _a(self) -> torch.Tensor:                                            # (H_l,)
        return -torch.exp(upcast(self.A_log))

    def _skip(self, y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y + D x, (n, H_l, P) -> (n, I_local) in the model's dtype."""
        y = y + upcast(self.D)[None, :, None] * x
        return y.reshape(y.shape[0], -1).to(dtype)


def _zero_fresh_slots(batch: ForwardBatch, conv_cache: torch.Tensor,
                      ssm_cache: torch.Tensor) -> None:
    """A sequence with no context starts from zero state: its slot may hold an old request's."""
    fresh = batch.state_slots[batch.context_lens == 0]
    if fresh.numel():
        fresh = fresh.to(conv_cache.device)
        conv_cache.index_fill_(0, fresh, 0.0)
        ssm_cache.index_fill_(0, fresh, 0.0)


def use_scan(model: nn.Module, impl: ScanImpl, chunk_tokens: int | None = None) -> None:
    """Switch every Mamba2 mixer of `model` to `impl` (and chunk size, if given)."""
    for mod in model.modules():
        if isinstance(mod, Mamba2):
            mod.scan = impl
            if chunk_tokens is not None:
                mod.chunk_tokens = chunk_tokens
