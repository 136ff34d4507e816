"""Mamba2 mixer: in_proj -> z | x | B | C | dt, causal depthwise conv over [x | B | C] with the
conv state, per-head SSM recurrence, gated RMSNorm, row-parallel out_proj.

Prefill runs the exact per-token recurrence (the oracle; tiny models), decode one step of it.
This rank holds heads [h0, h1) and the B/C groups [g0, g1) they use (shard.Mamba2Shard), so
its conv channels are [x_local | B_local | C_local]: exactly the cache's segment order.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ArchConfig
from .batch import ForwardBatch
from .mlp import activation
from .norm import GatedRMSNorm
from .precision import upcast
from .shard import Mamba2Shard


class Mamba2(nn.Module):
    def __init__(self, shard: Mamba2Shard, hidden: int, layer: int, arch: ArchConfig,
                 norm_reduce: bool, comm, in_bias: bool = False, out_bias: bool = False,
                 conv_bias: bool = True):
        super().__init__()
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
        sh, m = self.shard, self.shard.spec
        z, xbc, dt = self.in_proj(h).split([sh.intermediate, sh.conv_dim, sh.num_heads], dim=-1)
        conv_cache, ssm_cache = caches.conv(self.layer), caches.ssm(self.layer)
        y = torch.empty(h.shape[0], sh.intermediate, dtype=h.dtype, device=h.device)
        ctx_lens, slots = batch.context_lens.tolist(), batch.state_slots.tolist()
        for i, (a, b) in enumerate(batch.seq_spans()):
            slot = slots[i]
            if ctx_lens[i] == 0:                     # a fresh sequence: the slot may hold old data
                conv_cache[slot].zero_()
                ssm_cache[slot].zero_()
            xbc_seq = self._conv(xbc[a:b], conv_cache, slot)
            y[a:b] = self._scan(xbc_seq, dt[a:b], ssm_cache, slot)
        if self.norm is not None:
            y = self.norm(y, z)
        else:
            y = y * F.silu(z)
        out = self.out_proj(y)
        self.comm.all_reduce_(out)
        return out if self.out_bias is None else out + self.out_bias

    def _conv(self, xbc: torch.Tensor, conv_cache: torch.Tensor, slot: int) -> torch.Tensor:
        """xbc: (n, C_local) raw projections -> conv + activation, (n, C_local); updates the state
        to the raw xbc of the last K-1 tokens, oldest first."""
        state = conv_cache[slot]                                            # (C_local, K-1)
        seq = torch.cat([state.to(xbc.dtype), xbc.t()], dim=1)             # (C_local, K-1+n)
        state.copy_(seq[:, seq.shape[1] - state.shape[1]:])
        out = F.conv1d(seq[None], self.conv_weight[:, None, :], self.conv_bias,
                       groups=seq.shape[0])[0]                              # (C_local, n)
        return self.act(out.t())

    def _scan(self, xbc: torch.Tensor, dt_raw: torch.Tensor, ssm_cache: torch.Tensor,
              slot: int) -> torch.Tensor:
        """Per-token recurrence S = exp(dt*A) S + dt x B^T; y = S C + D x. -> (n, I_local)."""
        sh, m = self.shard, self.shard.spec
        n, hl, p, ns = xbc.shape[0], sh.num_heads, m.head_dim, m.d_state
        x, bmat, cmat = xbc.split([sh.intermediate, sh.num_groups * ns, sh.num_groups * ns], -1)
        x = upcast(x).view(n, hl, p)
        bmat = upcast(bmat).view(n, sh.num_groups, ns)[:, self.group_of_head]   # (n, H_l, N)
        cmat = upcast(cmat).view(n, sh.num_groups, ns)[:, self.group_of_head]
        dt = F.softplus(upcast(dt_raw) + upcast(self.dt_bias))
        # HF clamps dt to the limit in prefill only; we clamp always (identical unless it fires).
        if self.dt_min > 0.0 or not math.isinf(self.dt_max):
            dt = dt.clamp(self.dt_min, self.dt_max)
        a = -torch.exp(upcast(self.A_log))                                   # (H_l,)
        state = ssm_cache[slot].to(x.dtype)                                  # (H_l, P, N)
        ys = []
        for j in range(n):
            decay = torch.exp(dt[j] * a)[:, None, None]
            state = state * decay + (dt[j][:, None] * x[j])[..., None] * bmat[j][:, None, :]
            ys.append(state @ cmat[j][:, :, None])                           # (H_l, P, 1)
        ssm_cache[slot].copy_(state.to(ssm_cache.dtype))
        y = torch.stack(ys).squeeze(-1) + upcast(self.D)[None, :, None] * x
        return y.reshape(n, hl * p).to(xbc.dtype)
