"""The gated delta rule, per token (the oracle) and chunked (the fast prefill path).

For one sequence of n tokens, value heads H (q and k already repeated from k-heads to v-heads,
l2-normalised, q scaled by dk ** -0.5), state S per head (dk, dv), from a given S_0:
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_t-1 + beta_t k_t v_t^T
    o_t = S_t^T q_t
(Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks", eq. 10; transformers'
`torch_recurrent_gated_delta_rule` computes the same thing step by step).

`chunked_rule` is the chunk-wise WY form (Yang et al. 2024, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length", section 3, with the gate folded in as in Gated Delta
Networks section 3.3). Inside a chunk of L tokens, with G_i = exp(sum of g over positions 1..i of
the chunk), the per-token corrections u_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i) solve the unit
lower-triangular system
    (I + A) U = beta V - diag(beta G) K S_0,    A_ij = beta_i (G_i / G_j) k_i . k_j  (j < i),
so U = W - Kd S_0 with W = T (beta V), Kd = T (beta G K), T = (I + A)^-1 (one triangular solve
per chunk, independent of S_0). Then
    o_i = G_i S_0^T q_i + sum_{j <= i} (G_i / G_j) (q_i . k_j) u_j
    S_L = G_L S_0 + sum_j (G_L / G_j) k_j u_j^T.
Everything but the state passing is batched over all chunks; the state passes in a scan over
chunks (k small steps), as in ssd.chunked_scan. `decode_step` is one step for many sequences.

Plain torch, no host syncs, no Python loop over tokens or sequences in the fast paths; inputs
arrive upcast (precision.upcast).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ssd import segsum

DEFAULT_CHUNK_TOKENS = 64       # speed only: any chunk size gives the same values up to rounding


def recurrent_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                   beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact per-token recurrence (reference). q, k: (n, H, dk); v: (n, H, dv);
    g (log decay, <= 0), beta: (n, H); state: (H, dk, dv). -> o (n, H, dv), final state."""
    outs = []
    for t in range(q.shape[0]):
        state = state * torch.exp(g[t])[:, None, None]
        predicted = torch.einsum("hk,hkv->hv", k[t], state)             # what S already says
        delta = (v[t] - predicted) * beta[t][:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        outs.append(torch.einsum("hk,hkv->hv", q[t], state))
    if not outs:
        return v.new_zeros(v.shape), state
    return torch.stack(outs), state


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for S sequences at once. q, k: (S, H, dk); v: (S, H, dv); g, beta: (S, H);
    state: (S, H, dk, dv). -> o (S, H, dv), new state (S, H, dk, dv)."""
    state = state * torch.exp(g)[..., None, None]
    predicted = torch.einsum("shk,shkv->shv", k, state)
    delta = (v - predicted) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return torch.einsum("shk,shkv->shv", q, state), state


def chunked_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                 beta: torch.Tensor, state: torch.Tensor,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as recurrent_rule, in chunks of `chunk_tokens` (WY form)."""
    n, h, dk = k.shape
    dv, L = v.shape[-1], chunk_tokens
    pad = (-n) % L
    if pad:     # g = 0, beta = 0, k = v = 0 on padding: no correction, no decay, S_n unchanged
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    c = (n + pad) // L
    # Heads outermost, (H, c, L, ...), contiguous once: every product is a batched matmul.
    q, k, v = (t.view(c, L, h, -1).permute(2, 0, 1, 3).contiguous() for t in (q, k, v))
    g, beta = (t.view(c, L, h).permute(2, 0, 1) for t in (g, beta))   # (H, c, L)
    cum = torch.cumsum(g, dim=-1)                                       # log G_i
    pair = torch.exp(segsum(g))                                         # G_i / G_j, j <= i; 0 above

    kk = k @ k.transpose(-1, -2)                                        # (H, c, L, L)
    a = (beta[..., None] * kk * pair).tril(-1)                          # strictly lower A
    eye = torch.eye(L, dtype=a.dtype, device=a.device)
    rhs = torch.cat([v * beta[..., None], k * (beta * torch.exp(cum))[..., None]], dim=-1)
    sol = torch.linalg.solve_triangular(a + eye, rhs, upper=False, unitriangular=True)
    w, kd = sol.split([dv, dk], dim=-1)                                 # T beta V, T beta G K

    scores = (q @ k.transpose(-1, -2)) * pair                           # (H, c, L, L), incl. diag
    q_in = q * torch.exp(cum)[..., None]                                # reads S_0: G_i q_i
    k_out = k * torch.exp(cum[..., -1:] - cum)[..., None]               # writes S_L: G_L / G_j
    chunk_decay = torch.exp(cum[..., -1])[..., None, None]              # (H, c, 1, 1)
    outs = []
    for j in range(c):      # the state passing: one small step per chunk
        u = w[:, j] - kd[:, j] @ state                                  # (H, L, dv)
        outs.append(q_in[:, j] @ state + scores[:, j] @ u)
        state = state * chunk_decay[:, j] + k_out[:, j].transpose(-1, -2) @ u
    o = torch.stack(outs, dim=1)                                        # (H, c, L, dv)
    return o.permute(1, 2, 0, 3).reshape(c * L, h, dv)[:n], state
