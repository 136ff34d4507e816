"""Greedy generation for one sequence on DenseCaches (tests, the CLI's embedded path)."""
from __future__ import annotations

import torch

from .batch import ForwardBatch


def greedy(model, caches, prompt: list[int], max_new_tokens: int, slot: int = 0,
           blocks: list[int] | None = None, chunk: int | None = None) -> list[int]:
    """Prefill `prompt` (in chunks of `chunk` tokens if given), then decode greedily."""
    total = len(prompt) + max_new_tokens
    blocks = blocks if blocks is not None else list(range(-(-total // caches.block_tokens)))
    chunk = chunk or len(prompt)
    ctx, logits = 0, None
    while ctx < len(prompt):
        ids = prompt[ctx:ctx + chunk]
        logits = model(ForwardBatch.build([ids], [ctx], [blocks], [slot]), caches)
        ctx += len(ids)
    out = []
    for _ in range(max_new_tokens):
        tok = int(torch.argmax(logits[0]))
        out.append(tok)
        if len(out) == max_new_tokens:
            break
        logits = model(ForwardBatch.build([[tok]], [ctx], [blocks], [slot]), caches)
        ctx += 1
    return out
