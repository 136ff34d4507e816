"""LFM2's short convolution mixer: in_proj -> B | C | x, Bx = B * x, a causal depthwise conv of
kernel L over Bx (with the conv state), y = C * conv(Bx), row-parallel out_proj.

The conv state of a sequence is Bx of its last L-1 tokens, oldest first, zeros for a shorter
prompt (transformers keeps (D, L) with one redundant column: ours == hf[..., 1:]).
TP: rank r holds the channels [c0, c1) of the spec's ShardRule (a plain split of D), the same
channels of B, C and x, so the whole mixer is channel-local until out_proj sums over ranks.

Two implementations, chosen per module (`impl`; `use_conv_impl(model, impl)` switches a model):
* VECTOR, the fast path: one conv1d over each prefill chunk, and one windowed product for all
  the batch's decode steps (one token each) together, no Python loop over sequences or tokens;
* RECURRENT, the oracle: per sequence and per token, shift the state and take the dot product.
tests/model/test_short_conv.py compares the two over parameter grids.
"""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from pdbridge.spec import ShortConvSpec
from pdbridge.spec.state_tensors import ConvLayout, short_conv_tensors

from .batch import ForwardBatch


class ConvImpl(Enum):
    VECTOR = "vector"           # conv1d per prefill chunk + batched decode (fast)
    RECURRENT = "recurrent"     # per-sequence, per-token shift register (the oracle)


def short_conv_channels(s: ShortConvSpec, tp_size: int, rank: int) -> tuple[int, int]:
    """The global channels [c0, c1) rank `rank` holds: the conv state tensor's own rule."""
    (conv,) = short_conv_tensors(0, s, ConvLayout.DS, "float32")
    c0, c1 = conv.segments[0].units(tp_size, rank)
    if c1 <= c0:
        raise ValueError(f"tp_size={tp_size} leaves rank {rank} without short-conv channels "
                         f"({s.hidden} channels)")
    return c0, c1


class ShortConv(nn.Module):
    def __init__(self, s: ShortConvSpec, channels: tuple[int, int], hidden: int, layer: int,
                 bias: bool, comm, impl: ConvImpl = ConvImpl.VECTOR):
        super().__init__()
        self.layer, self.comm, self.impl = layer, comm, impl
        n = channels[1] - channels[0]
        self.channels = n
        self.in_proj = nn.Linear(hidden, 3 * n, bias=bias)                   # [B | C | x] local
        self.conv_weight = nn.Parameter(torch.empty(n, s.l_cache))           # (C_local, L)
        self.conv_bias = nn.Parameter(torch.zeros(n)) if bias else None
        self.out_proj = nn.Linear(n, hidden, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(hidden)) if bias else None  # after the sum

    def forward(self, h: torch.Tensor, batch: ForwardBatch, caches) -> torch.Tensor:  # (T, D)
        b, c, x = self.in_proj(h).split(self.channels, dim=-1)
        bx = b * x                                                           # (T, C_local)
        cache = caches.conv(self.layer)                                      # (slots, C_l, L-1)
        fresh = batch.state_slots[batch.context_lens == 0]
        if fresh.numel():       # no context: start from zeros (the slot may hold old state)
            cache.index_fill_(0, fresh.to(cache.device), 0.0)
        y = torch.empty_like(bx)
        spans, slots = batch.seq_spans(), batch.state_slots.tolist()
        steps = [i for i, (a, e) in enumerate(spans)
                 if self.impl is ConvImpl.VECTOR and e - a == 1]
        batched = set(steps)
        for i, (a, e) in enumerate(spans):
            if i not in batched:
                run = self._prefill if self.impl is ConvImpl.VECTOR else self._recurrent
                y[a:e] = run(bx[a:e], cache, slots[i])
        if steps:
            rows = torch.tensor([spans[i][0] for i in steps], device=h.device)
            y[rows] = self._decode(bx[rows], cache,
                                   torch.tensor([slots[i] for i in steps], device=cache.device))
        out = self.out_proj(c * y)
        self.comm.all_reduce_(out)
        return out if self.out_bias is None else out + self.out_bias

    def _prefill(self, bx: torch.Tensor, cache: torch.Tensor, slot: int) -> torch.Tensor:
        """One sequence's n new tokens (n, C_l) after the slot's state -> conv output (n, C_l);
        the state becomes Bx of the last L-1 tokens."""
        state = cache[slot]                                                  # (C_l, L-1)
        seq = torch.cat([state.to(bx.dtype), bx.t()], dim=1)                 # (C_l, L-1+n)
        state.copy_(seq[:, seq.shape[1] - state.shape[1]:])
        out = F.conv1d(seq[None], self.conv_weight[:, None, :], self.conv_bias,
                       groups=seq.shape[0])[0]                               # (C_l, n)
        return out.t()

    def _decode(self, bx: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One token for each of S sequences, bx (S, C_l) -> (S, C_l); shifts their states."""
        window = torch.cat([cache[slots].to(bx.dtype), bx[:, :, None]], dim=2)   # (S, C_l, L)
        cache.index_copy_(0, slots, window[:, :, 1:].to(cache.dtype))
        out = (window * self.conv_weight).sum(-1)
        return out if self.conv_bias is None else out + self.conv_bias

    def _recurrent(self, bx: torch.Tensor, cache: torch.Tensor, slot: int) -> torch.Tensor:
        """The oracle: token by token, shift the state by one and take the kernel's dot product."""
        state = cache[slot].to(bx.dtype)                                     # (C_l, L-1)
        outs = []
        for j in range(bx.shape[0]):
            window = torch.cat([state, bx[j][:, None]], dim=1)               # (C_l, L)
            out = (window * self.conv_weight).sum(-1)
            outs.append(out if self.conv_bias is None else out + self.conv_bias)
            state = window[:, 1:]
        cache[slot].copy_(state)
        return torch.stack(outs)


def build_short_conv(s: ShortConvSpec, hidden: int, layer: int, comm, names: set[str]) -> ShortConv:
    bias = f"layers.{layer}.conv.in_proj.bias" in names
    return ShortConv(s, short_conv_channels(s, comm.size, comm.rank), hidden, layer, bias, comm)


def shard_short_conv(s: ShortConvSpec, name: str, t: torch.Tensor, tp_size: int,
                     rank: int) -> torch.Tensor:
    """Rank `rank`'s cut of canonical tensor `layers.i.conv.<name>`."""
    c0, c1 = short_conv_channels(s, tp_size, rank)
    if name.startswith("in_proj."):                 # rows [B | C | x], each D channels
        rows = torch.cat([torch.arange(c0, c1) + k * s.hidden for k in range(3)])
        return t.index_select(0, rows)
    if name in ("conv_weight", "conv_bias"):
        return t[c0:c1]
    if name == "out_proj.weight":
        return t[:, c0:c1]
    return t                                        # out_bias: added once, after the sum


def use_conv_impl(model: nn.Module, impl: ConvImpl) -> None:
    """Switch every short-conv mixer of `model` to `impl`."""
    for mod in model.modules():
        if isinstance(mod, ShortConv):
            mod.impl = impl
