"""Jamba's Mamba1 mixer: in_proj -> x | z, causal depthwise conv (+ SiLU) over x with the conv
state, x_proj -> dt_r | B | C, RMSNorms of dt_r, B and C (Jamba's addition), dt = softplus(
dt_proj(dt_r)), the selective scan (selective_scan.py), + D x, * silu(z), row-parallel out_proj.

State per sequence: conv, the raw x of the last K-1 tokens (transformers keeps (I, K) with one
redundant column: ours == hf[..., 1:]); SSM (I, N).
TP: rank r holds the channels [c0, c1) of I (the spec's ShardRule, a plain split): the same
channels of x, z, the conv, dt_proj's rows, A, D and out_proj's columns. x_proj reduces over
I, so it is row-parallel: each rank's partial dt_r | B | C is summed over ranks (one
all-reduce of (T, R + 2N)) before the norms, and every rank then holds all of dt_r, B, C.

Scan implementations as in mamba2.py (`scan`; `use_scan1(model, impl)`): CHUNKED runs each
prefill chunk through selective_scan.chunked_scan and every decode step of the batch in one
decode_step; RECURRENT is the per-sequence, per-token oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdbridge.spec import Mamba1Spec
from pdbridge.spec.state_tensors import ConvLayout, mamba1_tensors

from .batch import ForwardBatch
from .mamba2 import ScanImpl
from .mlp import activation
from .norm import RMSNorm
from .precision import upcast
from .selective_scan import DEFAULT_CHUNK_TOKENS, chunked_scan, decode_step, recurrent_scan


def mamba1_channels(m: Mamba1Spec, tp_size: int, rank: int) -> tuple[int, int]:
    """The global channels [c0, c1) of I that rank `rank` holds (conv and SSM state agree)."""
    conv, ssm = mamba1_tensors(0, m, ConvLayout.DS, "float32", "float32")
    c0, c1 = conv.segments[0].units(tp_size, rank)
    assert (c0, c1) == ssm.segments[0].units(tp_size, rank), "conv and SSM channels disagree"
    if c1 <= c0:
        raise ValueError(f"tp_size={tp_size} leaves rank {rank} without Mamba1 channels "
                         f"({m.intermediate} channels)")
    return c0, c1


class Mamba1(nn.Module):
    def __init__(self, m: Mamba1Spec, channels: tuple[int, int], hidden: int, layer: int,
                 eps: float, act: str, comm, in_bias: bool = False, out_bias: bool = False,
                 conv_bias: bool = True, scan: ScanImpl = ScanImpl.CHUNKED,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"Mamba1: chunk_tokens={chunk_tokens}; allowed: >= 1")
        self.layer, self.comm, self.scan, self.chunk_tokens = layer, comm, scan, chunk_tokens
        self.act = activation(act)
        n = channels[1] - channels[0]
        self.channels, self.dt_rank, self.d_state = n, m.dt_rank, m.d_state
        self.in_proj = nn.Linear(hidden, 2 * n, bias=in_bias)                # [x | z] local
        self.conv_weight = nn.Parameter(torch.empty(n, m.d_conv))            # (I_local, K)
        self.conv_bias = nn.Parameter(torch.zeros(n)) if conv_bias else None
        self.x_proj = nn.Linear(n, m.dt_rank + 2 * m.d_state, bias=False)    # row-parallel
        self.dt_norm = RMSNorm(m.dt_rank, eps)
        self.b_norm = RMSNorm(m.d_state, eps)
        self.c_norm = RMSNorm(m.d_state, eps)
        self.dt_proj = nn.Linear(m.dt_rank, n, bias=True)                    # column-parallel
        self.A_log = nn.Parameter(torch.empty(n, m.d_state))
        self.D = nn.Parameter(torch.empty(n))
        self.out_proj = nn.Linear(n, hidden, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(hidden)) if out_bias else None

    def forward(self, h: torch.Tensor, batch: ForwardBatch, caches) -> torch.Tensor:   # (T, D)
        x, z = self.in_proj(h).split(self.channels, dim=-1)
        conv_cache, ssm_cache = caches.conv(self.layer), caches.ssm(self.layer)
        fresh = batch.state_slots[batch.context_lens == 0]
        if fresh.numel():       # no context: zero state (the slot may hold an old request's)
            fresh = fresh.to(conv_cache.device)
            conv_cache.index_fill_(0, fresh, 0.0)
            ssm_cache.index_fill_(0, fresh, 0.0)
        spans, slots = batch.seq_spans(), batch.state_slots.tolist()
        steps = [i for i, (a, e) in enumerate(spans)
                 if self.scan is ScanImpl.CHUNKED and e - a == 1]
        batched = set(steps)
        rest = [i for i in range(len(spans)) if i not in batched]
        step_rows = torch.tensor([spans[i][0] for i in steps], dtype=torch.long, device=h.device)
        step_slots = torch.tensor([slots[i] for i in steps], dtype=torch.long,
                                  device=conv_cache.device)

        xc = torch.empty_like(x)                                             # conv + act
        for i in rest:
            a, e = spans[i]
            xc[a:e] = self._conv(x[a:e], conv_cache, slots[i])
        if steps:
            xc[step_rows] = self._conv_step(x[step_rows], conv_cache, step_slots)
        xc = self.act(xc)

        dt, bmat, cmat = self._ssm_inputs(xc)
        xs = upcast(xc)
        y = torch.empty_like(xs)
        for i in rest:
            a, e = spans[i]
            state = ssm_cache[slots[i]].to(xs.dtype)                         # (I_l, N)
            scan = (chunked_scan if self.scan is ScanImpl.CHUNKED else recurrent_scan)
            args = (xs[a:e], dt[a:e], self._a(), bmat[a:e], cmat[a:e], state)
            y[a:e], state = (scan(*args, self.chunk_tokens) if scan is chunked_scan
                             else scan(*args))
            ssm_cache[slots[i]].copy_(state.to(ssm_cache.dtype))
        if steps:
            y[step_rows], state = decode_step(xs[step_rows], dt[step_rows], self._a(),
                                              bmat[step_rows], cmat[step_rows],
                                              ssm_cache[step_slots].to(xs.dtype))
            ssm_cache.index_copy_(0, step_slots, state.to(ssm_cache.dtype))

        y = (y + upcast(self.D) * xs) * F.silu(upcast(z))
        out = self.out_proj(y.to(h.dtype))
        self.comm.all_reduce_(out)
        return out if self.out_bias is None else out + self.out_bias

    def _ssm_inputs(self, xc: torch.Tensor):
        """conv output (T, I_l) -> dt (T, I_l), B, C (T, N), upcast. x_proj's partial sums over
        this rank's channels are summed over ranks first."""
        dbc = self.x_proj(xc)
        self.comm.all_reduce_(dbc)
        dt_r, bmat, cmat = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(upcast(self.dt_proj(self.dt_norm(dt_r))))
        return dt, upcast(self.b_norm(bmat)), upcast(self.c_norm(cmat))

    def _conv(self, x: torch.Tensor, conv_cache: torch.Tensor, slot: int) -> torch.Tensor:
        """x: (n, I_l) raw -> conv (n, I_l), before the activation; the state becomes the raw x
        of the last K-1 tokens, oldest first."""
        state = conv_cache[slot]                                             # (I_l, K-1)
        seq = torch.cat([state.to(x.dtype), x.t()], dim=1)                   # (I_l, K-1+n)
        state.copy_(seq[:, seq.shape[1] - state.shape[1]:])
        return F.conv1d(seq[None], self.conv_weight[:, None, :], self.conv_bias,
                        groups=seq.shape[0])[0].t()

    def _conv_step(self, x: torch.Tensor, conv_cache: torch.Tensor,
                   slots: torch.Tensor) -> torch.Tensor:
        """x: (S, I_l), one token per sequence -> conv (S, I_l); shifts each slot's state."""
        window = torch.cat([conv_cache[slots].to(x.dtype), x[:, :, None]], dim=2)   # (S, I_l, K)
        conv_cache.index_copy_(0, slots, window[:, :, 1:].to(conv_cache.dtype))
        out = (window * self.conv_weight).sum(-1)
        return out if self.conv_bias is None else out + self.conv_bias

    def _a(self) -> torch.Tensor:                                            # (I_l, N)
        return -torch.exp(upcast(self.A_log))


def build_mamba1(m: Mamba1Spec, hidden: int, layer: int, eps: float, act: str, comm,
                 names: set[str]) -> Mamba1:
    pre = f"layers.{layer}.mamba1."
    return Mamba1(m, mamba1_channels(m, comm.size, comm.rank), hidden, layer, eps, act, comm,
                  in_bias=pre + "in_proj.bias" in names, out_bias=pre + "out_bias" in names,
                  conv_bias=pre + "conv_bias" in names)


def shard_mamba1(m: Mamba1Spec, name: str, t: torch.Tensor, tp_size: int,
                 rank: int) -> torch.Tensor:
    """Rank `rank`'s cut of canonical tensor `layers.i.mamba1.<name>`."""
    c0, c1 = mamba1_channels(m, tp_size, rank)
    if name.startswith("in_proj."):                 # rows [x | z], each I channels
        rows = torch.cat([torch.arange(c0, c1), torch.arange(c0, c1) + m.intermediate])
        return t.index_select(0, rows)
    if name in ("conv_weight", "conv_bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D"):
        return t[c0:c1]
    if name in ("x_proj.weight", "out_proj.weight"):
        return t[:, c0:c1]
    return t                                        # norms, out_bias: replicated


def use_scan1(model: nn.Module, impl: ScanImpl, chunk_tokens: int | None = None) -> None:
    """Switch every Mamba1 mixer of `model` to `impl` (and chunk size, if given)."""
    for mod in model.modules():
        if isinstance(mod, Mamba1):
            mod.scan = impl
            if chunk_tokens is not None:
                mod.chunk_tokens = chunk_tokens
