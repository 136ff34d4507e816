"""BlockPool: the block ids of one engine's caches, no tensors (nano-vllm's block manager).

One pool of ids [0, num_blocks) serves both attention blocks and state blocks: the same id
indexes every region, so a request holds ceil(tokens / block_tokens) attention blocks and one
state block. Allocation is first-fit over runs of free ids and hands out contiguous runs when it
can, because consecutive blocks let a transfer plan merge per-block reads into one
(DESIGN.md section 2, "descriptor count").
"""
from __future__ import annotations

import bisect


class BlockPoolError(RuntimeError):
    """Out of blocks, or a block freed twice / never allocated."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Free runs as parallel sorted lists: run i covers [starts[i], starts[i] + lengths[i]).
        self._starts: list[int] = [0]
        self._lengths: list[int] = [num_blocks]

    @property
    def num_free(self) -> int:
        return sum(self._lengths)

    def free_runs(self) -> list[tuple[int, int]]:
        """(start, length) of every free run, in id order (for tests and reports)."""
        return list(zip(self._starts, self._lengths))

    def allocate(self, n: int) -> list[int]:
        """n block ids: one run if any free run is long enough, else the first runs in order."""
        self._check_room(n)
        for i, length in enumerate(self._lengths):
            if length >= n:
                return self._take(i, n)
        out: list[int] = []
        while len(out) < n:
            out += self._take(0, min(n - len(out), self._lengths[0]))
        return out

    def extend(self, blocks: list[int], n: int) -> list[int]:
        """n more ids for a growing request, continuing its last block's run when free."""
        self._check_room(n)
        out: list[int] = []
        if blocks:
            i = bisect.bisect_left(self._starts, blocks[-1] + 1)
            if i < len(self._starts) and self._starts[i] == blocks[-1] + 1:
                out = self._take(i, min(n, self._lengths[i]))
        return out + (self.allocate(n - len(out)) if n > len(out) else [])

    def free(self, blocks: list[int]) -> None:
        """Return ids to the pool; each exactly once (a double free raises, freeing nothing)."""
        ids = sorted(blocks)
        if len(set(ids)) != len(ids):
            raise BlockPoolError(f"block ids repeated in one free: {blocks}")
        for b in ids:
            if not 0 <= b < self.num_blocks:
                raise BlockPoolError(f"block {b} is outside the pool [0, {self.num_blocks})")
            if self._is_free(b):
                raise BlockPoolError(f"block {b} freed twice (or never allocated)")
        for b in ids:
            self._insert(b)

    # ---- run bookkeeping -------------------------------------------------------------

    def _check_room(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise BlockPoolError(f"out of blocks: {n} requested, {self.num_free} of "
                                 f"{self.num_blocks} free")

    def _take(self, i: int, n: int) -> list[int]:
        """The first n ids of free run i."""
        start = self._starts[i]
        if n == self._lengths[i]:
            del self._starts[i], self._lengths[i]
        else:
            self._starts[i] += n
            self._lengths[i] -= n
        return list(range(start, start + n))

    def _is_free(self, b: int) -> bool:
        i = bisect.bisect_right(self._starts, b) - 1
        return i >= 0 and b < self._starts[i] + self._lengths[i]

    def _insert(self, b: int) -> None:
        i = bisect.bisect_right(self._starts, b)          # runs before i start at or before b
        joins_prev = i > 0 and self._starts[i - 1] + self._lengths[i - 1] == b
        joins_next = i < len(self._starts) and self._starts[i] == b + 1
        if joins_prev and joins_next:
            self._lengths[i - 1] += 1 + self._lengths[i]
            del self._starts[i], self._lengths[i]
        elif joins_prev:
            self._lengths[i - 1] += 1
        elif joins_next:
            self._starts[i] = b
            self._lengths[i] += 1
        else:
            self._starts.insert(i, b)
            self._lengths.insert(i, 1)
