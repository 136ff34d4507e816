"""First-fit allocation of byte ranges of one scratch buffer, keyed by owner. Pure."""
from __future__ import annotations

from typing import Hashable

ALIGN = 64


class ScratchFull(RuntimeError):
    pass


class ScratchAllocator:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._used: dict[Hashable, list[tuple[int, int]]] = {}

    def allocate(self, owner: Hashable, nbytes: int) -> int:
        """Offset of `nbytes` free bytes, recorded under `owner` (freed with `free(owner)`)."""
        spans = sorted(s for v in self._used.values() for s in v)
        start = 0
        for a, b in spans:
            if a - start >= nbytes:
                break
            start = -(-b // ALIGN) * ALIGN
        if start + nbytes > self.nbytes:
            raise ScratchFull(f"scratch buffer of {self.nbytes} bytes has no free {nbytes} bytes "
                              f"({len(self._used)} requests hold it); raise scratch_nbytes")
        self._used.setdefault(owner, []).append((start, start + nbytes))
        return start

    def free(self, owner: Hashable) -> None:
        self._used.pop(owner, None)

    @property
    def used_nbytes(self) -> int:
        return sum(b - a for v in self._used.values() for a, b in v)
