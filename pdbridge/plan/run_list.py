"""RunList: byte runs (source rank, region, offset -> destination region, offset, length) as
flat numpy arrays, and the one coalescing rule every strategy uses.

A run is what becomes one transfer descriptor (or one local copy). `group` ties a run back to
the ReadGroup (layer, tensor, segment, source) that produced it, for reports only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .transfer_plan import CopyList

_I32, _I64 = np.int32, np.int64


@dataclass(frozen=True)
class RunList:
    src_rank: np.ndarray        # int32
    src_region: np.ndarray      # int32 (SCRATCH allowed)
    src_offset: np.ndarray      # int64 bytes
    dst_region: np.ndarray      # int32 (SCRATCH allowed)
    dst_offset: np.ndarray      # int64 bytes
    nbytes: np.ndarray          # int64
    group: np.ndarray           # int32: index into the planner's group table

    @staticmethod
    def empty() -> "RunList":
        return _EMPTY

    @staticmethod
    def concat(parts: list["RunList"]) -> "RunList":
        parts = [p for p in parts if len(p.nbytes)]
        if not parts:
            return RunList.empty()
        if len(parts) == 1:
            return parts[0]
        cat = np.concatenate
        return RunList(cat([p.src_rank for p in parts]), cat([p.src_region for p in parts]),
                       cat([p.src_offset for p in parts]), cat([p.dst_region for p in parts]),
                       cat([p.dst_offset for p in parts]), cat([p.nbytes for p in parts]),
                       cat([p.group for p in parts]))

    def __len__(self) -> int:
        return len(self.nbytes)

    def take(self, idx: np.ndarray) -> "RunList":
        return RunList(self.src_rank[idx], self.src_region[idx], self.src_offset[idx],
                       self.dst_region[idx], self.dst_offset[idx], self.nbytes[idx],
                       self.group[idx])

    def coalesced(self) -> "RunList":
        """Sorted by (src_rank, src_region, src_offset); runs adjacent on BOTH sides merged.

        Merging is purely a byte-level identity (the same bytes land in the same places), so it
        may join runs of different tensors or groups; the merged run keeps its first group.
        """
        if len(self) <= 1:
            return self
        order = np.lexsort((self.dst_offset, self.src_offset, self.src_region, self.src_rank))
        r = self.take(order)
        end_src, end_dst = r.src_offset + r.nbytes, r.dst_offset + r.nbytes
        joins = ((r.src_rank[1:] == r.src_rank[:-1]) & (r.src_region[1:] == r.src_region[:-1])
                 & (r.dst_region[1:] == r.dst_region[:-1])
                 & (r.src_offset[1:] == end_src[:-1]) & (r.dst_offset[1:] == end_dst[:-1]))
        if not joins.any():
            return r
        heads = np.flatnonzero(np.concatenate(([True], ~joins)))
        merged = r.take(heads)
        total = np.add.reduceat(r.nbytes, heads)
        return RunList(merged.src_rank, merged.src_region, merged.src_offset, merged.dst_region,
                       merged.dst_offset, total.astype(_I64), merged.group)

    def as_copy_list(self) -> CopyList:
        """Local copies (the source rank is implied by where the list runs)."""
        return CopyList(self.src_region.astype(_I32), self.src_offset.astype(_I64),
                        self.dst_region.astype(_I32), self.dst_offset.astype(_I64),
                        self.nbytes.astype(_I64))


def _empty() -> RunList:
    arrays = [np.zeros(0, d) for d in (_I32, _I32, _I64, _I32, _I64, _I64, _I32)]
    for a in arrays:
        a.flags.writeable = False       # one shared empty list
    return RunList(*arrays)


_EMPTY = _empty()
