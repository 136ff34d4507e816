"""ForwardBatch: one model step over a flattened batch of sequences (prefill chunks and decodes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def _long(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.long).reshape(-1)


@dataclass(frozen=True)
class ForwardBatch:
    """Sequence i contributes query_lens[i] new tokens, at positions context_lens[i] + (0..).

    input_ids, positions: (T,) with T = sum(query_lens), sequences back to back.
    context_lens[i]: tokens of sequence i already in its caches; 0 means its recurrent state
        starts from zero (the slot may hold an old request's data).
    block_tables: (num_seqs, max_blocks) logical attention block ids, -1 padded.
    state_slots: (num_seqs,) state block id per sequence.
    Lists are accepted for every field and turned into LongTensors here.
    """
    input_ids: torch.Tensor
    positions: torch.Tensor
    query_lens: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    state_slots: torch.Tensor

    def __post_init__(self):
        for name in ("input_ids", "positions", "query_lens", "context_lens", "state_slots"):
            object.__setattr__(self, name, _long(getattr(self, name)))
        object.__setattr__(self, "block_tables", _pad_tables(self.block_tables))
        n, t = self.num_seqs, self.input_ids.numel()
        for name in ("context_lens", "state_slots"):
            if getattr(self, name).numel() != n:
                raise ValueError(f"ForwardBatch.{name} has {getattr(self, name).numel()} entries, "
                                 f"query_lens has {n}")
        if self.block_tables.shape[0] != n:
            raise ValueError(f"ForwardBatch.block_tables has {self.block_tables.shape[0]} rows, "
                             f"query_lens has {n}")
        if int(self.query_lens.sum()) != t or self.positions.numel() != t:
            raise ValueError(f"ForwardBatch: sum(query_lens)={int(self.query_lens.sum())}, "
                             f"input_ids has {t}, positions has {self.positions.numel()}")
        if n and int(self.query_lens.min()) < 1:
            raise ValueError("ForwardBatch.query_lens must be >= 1 for every sequence")

    @classmethod
    def build(cls, input_ids: Sequence[Sequence[int]], context_lens: Sequence[int],
              block_tables: Sequence[Sequence[int]], state_slots: Sequence[int]) -> "ForwardBatch":
        """From per-sequence new-token lists; positions follow the context lengths."""
        flat = [t for ids in input_ids for t in ids]
        pos = [c + j for ids, c in zip(input_ids, context_lens) for j in range(len(ids))]
        return cls(flat, pos, [len(ids) for ids in input_ids], list(context_lens),
                   block_tables, list(state_slots))

    @property
    def num_seqs(self) -> int:
        return self.query_lens.numel()

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def seq_spans(self) -> list[tuple[int, int]]:
        """[start, stop) of each sequence's tokens in the flattened batch."""
        out, a = [], 0
        for q in self.query_lens.tolist():
            out.append((a, a + q))
            a += q
        return out

    def last_token_index(self) -> torch.Tensor:      # (num_seqs,)
        return torch.cumsum(self.query_lens, 0) - 1


def _pad_tables(tables) -> torch.Tensor:
    if isinstance(tables, torch.Tensor):
        if tables.dim() != 2:
            raise ValueError(f"ForwardBatch.block_tables must be 2-D, got shape {tuple(tables.shape)}")
        return tables.to(torch.long)
    rows = [list(r) for r in tables]
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out
