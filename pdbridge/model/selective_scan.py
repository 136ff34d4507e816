"""The Mamba1 selective scan, per token (the oracle), chunked (the fast prefill path) and as one
batched decode step.

For one sequence of n tokens, channels I, state size N (Gu & Dao 2023, "Mamba", section 3.2):
    S_t = exp(dt_t[:, None] * A) * S_t-1 + (dt_t * x_t)[:, None] * B_t[None, :]     S: (I, N)
    y_t = S_t C_t                                   (without the D skip: the caller adds it)
The decay differs per (channel, state) element, so Mamba2's scalar-decay SSD form (a matmul per
chunk) does not apply, and a log-depth parallel scan costs log2(L) times the recurrence's work,
which a CPU pays in full. `chunked_scan` keeps the recurrence's O(n I N) work and cuts the Python
steps from n to about L + n/L: the tokens are cut into k chunks of L; (1) the recurrence runs
over the L positions of every chunk at once, each chunk from a zero state (L steps on (k, I, N));
(2) the state entering each chunk passes from chunk to chunk (k steps on (I, N)); (3) each
position adds the entering state times its decay since the chunk start, exp(cumsum log-decay).
Memory O(16 L I N): long prompts go through in blocks of 16 chunks.
Decays below exp(-80) are taken as exp(-80) (both implementations): the difference is under
1e-34 of the state, far below rounding, and it keeps fp32 products out of the subnormal range,
where a CPU runs them ~100x slower.

Plain torch on whatever device the inputs live on (CUDA-ready: no host syncs, no Python loop over
tokens or sequences inside a chunk); inputs arrive already upcast (precision.upcast).
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK_TOKENS = 8        # speed only: any chunk size gives the same values up to rounding
BLOCK_CHUNKS = 16               # chunks per block: bounds memory at 16 * chunk_tokens * I * N
_MIN_LOG_DECAY = -80.0          # exp(-80) = 1.8e-35: still a normal fp32 number


def recurrent_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   c: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact per-token recurrence (reference). x, dt: (n, I); a: (I, N); b, c: (n, N);
    state: (I, N). -> y (n, I), final state (I, N)."""
    ys = []
    for j in range(x.shape[0]):
        state = torch.exp(_log_decay(dt[j], a)) * state + (dt[j] * x[j])[:, None] * b[j][None, :]
        ys.append(state @ c[j])
    if not ys:
        return x.new_zeros(x.shape), state
    return torch.stack(ys), state


def chunked_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 c: torch.Tensor, state: torch.Tensor,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as recurrent_scan, in chunks of `chunk_tokens` (see the module docstring)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunked_scan: chunk_tokens={chunk_tokens}; allowed: >= 1")
    block = BLOCK_CHUNKS * chunk_tokens
    ys = []
    for s in range(0, x.shape[0], block):
        e = min(s + block, x.shape[0])
        y, state = _scan_block(x[s:e], dt[s:e], a, b[s:e], c[s:e], state, chunk_tokens)
        ys.append(y)
    if not ys:
        return x.new_zeros(x.shape), state
    return torch.cat(ys), state


def _scan_block(x, dt, a, b, c, state, L: int):
    n, i = x.shape
    ns = a.shape[1]
    pad = (-n) % L
    if pad:     # dt = 0 on padding: decay exp(0) = 1 and no input, so the state passes unchanged
        x, dt, b, c = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (x, dt, b, c))
    k = (n + pad) // L
    log_decay = _log_decay(dt, a).view(k, L, i, ns)                         # (k, L, I, N)
    # 1. every chunk from a zero state, all chunks at once: L steps; inp becomes the states
    inp = ((dt * x)[:, :, None] * b[:, None, :]).view(k, L, i, ns)
    decay = torch.exp(log_decay)
    h = inp[:, 0]
    for j in range(1, L):
        h = torch.addcmul(inp[:, j], decay[:, j], h)
        inp[:, j] = h
    # 2. the state entering each chunk: k steps
    since_start = torch.exp(torch.cumsum(log_decay, dim=1).clamp_min_(_MIN_LOG_DECAY))
    entering = torch.empty(k, i, ns, dtype=inp.dtype, device=inp.device)
    for j in range(k):
        entering[j] = state
        state = torch.addcmul(inp[j, -1], since_start[j, -1], state)
    # 3. each position's share of its chunk's entering state, then y_t = S_t C_t
    states = torch.addcmul(inp, since_start, entering[:, None]).view(k * L, i, ns)
    y = torch.bmm(states, c.reshape(k * L, ns, 1))[..., 0]                  # (k L, I)
    return y[:n], state


def _log_decay(dt: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """dt (..., I), a (I, N) -> dt * a (..., I, N), no lower than _MIN_LOG_DECAY."""
    return (dt[..., None] * a).clamp_min(_MIN_LOG_DECAY)


def decode_step(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                c: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for S sequences at once. x, dt: (S, I); a: (I, N); b, c: (S, N);
    state: (S, I, N). -> y (S, I), new state (S, I, N)."""
    state = torch.exp(_log_decay(dt, a)) * state + (dt * x)[:, :, None] * b[:, None, :]
    return torch.einsum("sin,sn->si", state, c), state
