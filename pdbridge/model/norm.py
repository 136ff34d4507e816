"""RMSNorm, and the gated RMSNorm after the Mamba2 scan (grouped, tensor-parallel aware)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .precision import upcast


class RMSNorm(nn.Module):
    """`offset` 1.0: the zero-centred RMSNorm of Qwen3-Next / Qwen3.5, x_normed * (1 + w)."""

    def __init__(self, hidden: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # (..., D)
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = upcast(self.weight)
        return ((w + self.offset if self.offset else w) * xf).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of `group_size` channels of y, gated by silu(z).

    Gate first (Mamba2 default): norm(y * silu(z)) * w; FalconH1 may ask norm(y) * w * silu(z).
    Under TP this rank holds the global channels [channel_start, channel_start + channels);
    when a norm group spans ranks (n_groups = 1 with TP > 1, or a split inside a group) the
    per-group sums of squares, a (T, n_groups) tensor, are all-reduced so every rank divides
    by the same statistics. `reduce` must be the same on every rank (decided from the spec).
    """

    def __init__(self, channels: int, channel_start: int, group_size: int, n_groups: int,
                 eps: float, norm_before_gate: bool, reduce: bool, comm):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps, self.group_size, self.n_groups = eps, group_size, n_groups
        self.norm_before_gate, self.reduce, self.comm = norm_before_gate, reduce, comm
        groups = (torch.arange(channels) + channel_start) // group_size
        self.register_buffer("group_of_channel", groups, persistent=False)   # global group ids

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:   # (T, I_local) each
        v = upcast(y)
        gate = F.silu(upcast(z))
        if not self.norm_before_gate:
            v = v * gate
        sums = torch.zeros(v.shape[0], self.n_groups, dtype=v.dtype, device=v.device)
        sums.index_add_(1, self.group_of_channel, v.pow(2))                  # (T, G)
        if self.reduce:
            self.comm.all_reduce_(sums)
        var = sums / self.group_size
        v = v * torch.rsqrt(var[:, self.group_of_channel] + self.eps)
        v = upcast(self.weight) * v
        if self.norm_before_gate:
            v = v * gate
        return v.to(y.dtype)


def group_spans_ranks(channels_per_rank: list[tuple[int, int]], group_size: int) -> bool:
    """True when some rank boundary falls inside a norm group (the sums need an all-reduce)."""
    if len(channels_per_rank) == 1:
        return False
    return any(a % group_size or b % group_size for a, b in channels_per_rank)
