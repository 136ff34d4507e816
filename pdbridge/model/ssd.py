"""The Mamba2 selective-state recurrence, per token (the oracle) and chunked (SSD, the fast path).

Both compute, for one sequence of n tokens, heads H, head dim P, state size N:
    S_t = exp(dt_t * a) S_t-1 + dt_t x_t B_t^T        S: (H, P, N)
    y_t = S_t C_t                                      (without the D skip: the caller adds it)
from a given S_0 (the cached state: a chunked prefill continues its sequence), returning y and S_n.

`chunked_scan` is the state-space-dual form of the Mamba2 paper (Dao & Gu 2024, section 6; the
"ssd_minimal" listing of state-spaces/mamba): within a chunk of L tokens the output is a masked
quadratic form C^T B weighted by segment-sum decays; across chunks only the states pass, in a
scan over chunks. Work per token is O(L) instead of a Python step per token.
`decode_step` is one step of the recurrence for many sequences at once (one per row).

Everything here is plain torch on whatever device the inputs live on (CUDA-ready: no host syncs
inside, no Python loop over tokens or sequences); inputs arrive already upcast (precision.upcast).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 64       # speed only: any chunk size gives the same values up to rounding


def recurrent_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   c: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact per-token recurrence (reference). x: (n, H, P); dt: (n, H); a: (H,);
    b, c: (n, H, N) (already expanded from groups to heads); state: (H, P, N).
    -> y (n, H, P), final state (H, P, N)."""
    ys = []
    for j in range(x.shape[0]):
        decay = torch.exp(dt[j] * a)[:, None, None]
        state = state * decay + (dt[j][:, None] * x[j])[..., None] * b[j][:, None, :]
        ys.append(state @ c[j][:, :, None])                              # (H, P, 1)
    if not ys:
        return x.new_zeros(x.shape), state
    return torch.stack(ys).squeeze(-1), state


def segsum(v: torch.Tensor) -> torch.Tensor:
    """v: (..., T) -> (..., T, T), out[i, j] = sum(v[j+1 .. i]) for j <= i, -inf above the
    diagonal. Summed by a masked cumsum, not as cumsum[i] - cumsum[j]: no cancellation of two
    large partial sums (ssd_minimal's `segsum`)."""
    t = v.shape[-1]
    rep = v[..., None, :].expand(*v.shape, t).transpose(-1, -2)          # rep[i, j] = v[i]
    below = torch.ones(t, t, dtype=torch.bool, device=v.device).tril(-1)
    out = torch.cumsum(rep.masked_fill(~below, 0.0), dim=-2)
    return out.masked_fill(~below.logical_or(torch.eye(t, dtype=torch.bool, device=v.device)),
                           float("-inf"))


def chunked_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 c: torch.Tensor, state: torch.Tensor,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as recurrent_scan, in chunks of `chunk_tokens` (SSD)."""
    n, h, p = x.shape
    L = chunk_tokens
    pad = (-n) % L
    if pad:     # dt = 0 on padding: decay exp(0) = 1 and no input, so S_n is unchanged
        x, dt, b, c = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (x, dt, b, c))
    k = (n + pad) // L
    # Heads outermost, (H, k, L, ...), contiguous once: every product below is a batched
    # matmul over (H, k) that would otherwise copy its permuted operands on each use.
    xs = (x * dt[..., None]).view(k, L, h, p).permute(2, 0, 1, 3).contiguous()  # dt-weighted
    b = b.view(k, L, h, -1).permute(2, 0, 1, 3).contiguous()            # (H, k, L, N)
    c = c.view(k, L, h, -1).permute(2, 0, 1, 3).contiguous()
    da = (dt * a).view(k, L, h).permute(2, 0, 1)                        # (H, k, L) log-decays
    cum = torch.cumsum(da, dim=-1)

    # 1. within each chunk: y[l] = sum_{s<=l} (C_l . B_s) exp(sum da(s+1..l)) xs[s]
    scores = (c @ b.transpose(-1, -2)) * torch.exp(segsum(da))          # (H, k, L, L)
    y = scores @ xs                                                     # (H, k, L, P)

    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(cum[..., -1:] - cum)[..., None]                  # (H, k, L, 1)
    chunk_states = (xs * to_end).transpose(-1, -2) @ b                  # (H, k, P, N)

    # 3. state passing: the state entering each chunk. A scan over the k chunks (k small
    # steps on (H, P, N)), not ssd_minimal's (k+1)^2 decay matrix: that costs k^2 H P N, which
    # at 8,192 tokens in chunks of 64 outweighs the whole intra-chunk part.
    chunk_decay = torch.exp(cum[..., -1])[..., None, None]             # (H, k, 1, 1)
    entering = []
    for j in range(k):
        entering.append(state)
        state = state * chunk_decay[:, j] + chunk_states[:, j]
    states = torch.stack(entering, dim=1)                               # (H, k, P, N)

    # 4. the entering state's share of each output: (exp(cum_l) C_l) . S_in
    y = y + (c * torch.exp(cum)[..., None]) @ states.transpose(-1, -2)
    return y.permute(1, 2, 0, 3).reshape(k * L, h, p)[:n], state


def decode_step(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                c: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step for S sequences at once. x: (S, H, P); dt: (S, H); a: (H,);
    b, c: (S, H, N); state: (S, H, P, N). -> y (S, H, P), new state (S, H, P, N)."""
    decay = torch.exp(dt * a)[..., None, None]                          # (S, H, 1, 1)
    state = state * decay + (dt[..., None] * x)[..., None] * b[:, :, None, :]
    y = torch.einsum("shpn,shn->shp", state, c)
    return y, state
