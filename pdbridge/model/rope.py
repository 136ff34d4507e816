"""Rotary position embedding (the HF "default" type), optionally on the leading channels only."""
from __future__ import annotations

import torch

from .arch import Rope


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x: (T, heads, head_dim); positions: (T,). Rotates the first rope.rotary_dim channels."""
    rd = rope.rotary_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rd, 2, dtype=torch.float,
                                                   device=x.device) / rd))
    freqs = positions.float()[:, None] * inv_freq[None, :]            # (T, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
