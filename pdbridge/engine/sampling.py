"""Next-token choice from fp32 logits: greedy, or temperature + top-k + top-p with a per-request
seed."""
from __future__ import annotations

import os

import torch

from .request import FinishReason, Request, SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded per request, so a seeded request samples the same tokens
    whatever else is batched with it. Greedy requests need none."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from `logits` (vocab,)."""
    logits = logits.detach().to("cpu", torch.float32)
    if params.greedy:
        return int(torch.argmax(logits))
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always >= 1)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()


def stop_reason(req: Request, eos_token_ids: tuple[int, ...]) -> FinishReason | None:
    """Why the request stops after its latest output token, or None to continue."""
    last, p = req.output_ids[-1], req.sampling
    if not p.ignore_eos and last in eos_token_ids:
        return FinishReason.EOS
    if last in p.stop_token_ids:
        return FinishReason.STOP_TOKEN
    if len(req.output_ids) >= p.max_tokens:
        return FinishReason.LENGTH
    return None
