"""The Mamba1 selective scan, per token (the oracle), chunked (the fast prefill path) and as one
batched decode step.

For one sequence of n tokens, channels I, state size N (Gu & Dao 2023, "Mamba", section 3.2):
    S_t = exp(dt_t[:, None] * A) * S_t-1 + (dt_t * x_t)[:, None] * B_t[None, :]     S: (I, N)
    y_t = S_t C_t                                   (without the D skip: the caller adds it)
The decay differs per (channel, state) element, so Mamba2's scalar-decay SSD form does not
apply; `chunked_scan` instead runs, per chunk of L tokens, a log-depth inclusive scan of the
linear recurrence (Hillis-Steele over the pairs (decay, input), combined as
(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)), with the entering state folded into the chunk's first
input; only the state passes from chunk to chunk. Work per chunk O(L log L I N) in log2(L)
vectorised steps instead of L Python steps; memory O(L I N).

Plain torch on whatever device the inputs live on (CUDA-ready: no host syncs, no Python loop over
tokens or sequences inside a chunk); inputs arrive already upcast (precision.upcast).
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK_TOKENS = 64       # speed only: any chunk size gives the same values up to rounding


def recurrent_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   c: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact per-token recurrence (reference). x, dt: (n, I); a: (I, N); b, c: (n, N);
    state: (I, N). -> y (n, I), final state (I, N)."""
    ys = []
    for j in range(x.shape[0]):
        state = torch.exp(dt[j][:, None] * a) * state + (dt[j] * x[j])[:, None] * b[j][None, :]
        ys.append(state @ c[j])
    if not ys:
        return x.new_zeros(x.shape), state
    return torch.stack(ys), state


def chunked_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 c: torch.Tensor, state: torch.Tensor,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as recurrent_scan, chunk by chunk with a parallel scan inside each."""
    if chunk_tokens < 1:
        raise ValueError(f"chunked_scan: chunk_tokens={chunk_tokens}; allowed: >= 1")
    ys = []
    for s in range(0, x.shape[0], chunk_tokens):
        e = min(s + chunk_tokens, x.shape[0])
        decay = torch.exp(dt[s:e, :, None] * a)                              # (l, I, N)
        inp = (dt[s:e] * x[s:e])[:, :, None] * b[s:e, None, :]              # (l, I, N)
        inp = torch.cat([(decay[0] * state + inp[0])[None], inp[1:]])        # fold S_in in
        states = _inclusive_scan(decay, inp)                                 # (l, I, N): S_t
        ys.append(torch.einsum("lin,ln->li", states, c[s:e]))
        state = states[-1]
    if not ys:
        return x.new_zeros(x.shape), state
    return torch.cat(ys), state


def _inclusive_scan(decay: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """h_t = decay_t * h_t-1 + inp_t along dim 0 from h_-1 = 0, in ceil(log2 l) steps: after the
    step of offset k, position t holds the combination of the 2k positions ending at t."""
    k = 1
    while k < inp.shape[0]:
        inp = torch.cat([inp[:k], decay[k:] * inp[:-k] + inp[k:]])
        decay = torch.cat([decay[:k], decay[k:] * decay[:-k]])
        k *= 2
    return inp


def decode_step(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                c: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for S sequences at once. x, dt: (S, I); a: (I, N); b, c: (S, N);
    state: (S, I, N). -> y (S, I), new state (S, I, N)."""
    state = torch.exp(dt[:, :, None] * a) * state + (dt * x)[:, :, None] * b[:, None, :]
    return torch.einsum("sin,sn->si", state, c), state
