"""TransferPlan: every read one decode rank makes for one request, as flat numpy arrays.

Offsets are bytes from the start of a region of EngineLayout.rank(r).regions. The region id
SCRATCH names a side's scratch buffer instead: the decode rank's staging buffer (reads into it,
then `decode_restore` copies out of it) or, with `permute`, the prefill rank's scratch buffer
(`prefill_reorder[rank]` fills it before the reads).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

SCRATCH = -1    # region id of a side's scratch buffer (decode staging / prefill permute scratch)


class Strategy(enum.Enum):
    DIRECT = "direct"      # one read per contiguous run, straight into place
    STAGING = "staging"    # read whole source pages into staging, extract locally on decode
    PERMUTE = "permute"    # prefill reorders into destination-chunk order, decode restores
    AUTO = "auto"          # the cheapest of the above by the cost model


@dataclass(frozen=True)
class CopyList:
    """Local copies on one rank: src/dst region ids (SCRATCH allowed), byte offsets, lengths."""
    src_region: np.ndarray      # int32
    src_offset: np.ndarray      # int64
    dst_region: np.ndarray      # int32
    dst_offset: np.ndarray      # int64
    nbytes: np.ndarray          # int64

    @staticmethod
    def empty() -> "CopyList":
        return _NO_COPIES

    def __len__(self) -> int:
        return len(self.nbytes)


def _no_copies() -> CopyList:
    arrays = [np.zeros(0, d) for d in (np.int32, np.int64, np.int32, np.int64, np.int64)]
    for a in arrays:
        a.flags.writeable = False       # one shared empty list
    return CopyList(*arrays)


_NO_COPIES = _no_copies()


class ReadGroup(NamedTuple):
    """What one slice of the plan reads, for reports: one (layer, tensor, segment, source).
    A NamedTuple, not a frozen dataclass: every plan makes one per group (issue 10: 15 frozen
    dataclasses were 15% of a warm plan)."""
    layer: int
    tensor: str
    segment: str
    prefill_rank: int
    global_range: tuple[int, int]   # [start, stop) in the segment's units
    nbytes: int
    descriptors: int


@dataclass(frozen=True)
class TransferPlan:
    decode_rank: int
    strategy: Strategy
    # One entry per read (descriptor), sorted by (src_rank, src_region, src_offset).
    src_rank: np.ndarray        # int32
    src_region: np.ndarray      # int32, SCRATCH: the prefill rank's permute scratch
    src_offset: np.ndarray      # int64
    dst_region: np.ndarray      # int32, SCRATCH: this decode rank's staging buffer
    dst_offset: np.ndarray      # int64
    nbytes: np.ndarray          # int64
    staging_nbytes: int = 0                                  # decode-side scratch needed
    prefill_scratch_nbytes: dict[int, int] = field(default_factory=dict)   # per prefill rank
    prefill_reorder: dict[int, CopyList] = field(default_factory=dict)     # run on prefill first
    decode_restore: CopyList = field(default_factory=CopyList.empty)       # run on decode after
    groups: tuple[ReadGroup, ...] = ()
    minimal_nbytes: int = 0     # bytes of the decode shard itself (what a perfect plan moves)

    # Derived facts a pull asks for several times are computed once per plan and kept in
    # the instance's __dict__ (the fields are frozen; a plan's arrays are never written).

    @property
    def num_descriptors(self) -> int:
        return len(self.nbytes)

    @property
    def total_nbytes(self) -> int:
        return self._derived("total_nbytes", lambda: int(self.nbytes.sum()))

    def source_ranks(self) -> list[int]:
        return list(self._derived("source_ranks", lambda: np.unique(self.src_rank).tolist()))

    def scratch_sources(self) -> list[int]:
        """The prefill ranks whose scratch (permute) this plan reads."""
        return list(self._derived("scratch_sources", lambda: np.unique(
            self.src_rank[self.src_region == SCRATCH]).tolist()))

    def uses_decode_scratch(self) -> bool:
        """The plan lands bytes in (or restores from) this decode rank's scratch."""
        return self._derived("uses_decode_scratch", lambda: bool(self.staging_nbytes) or bool(
            len(self.decode_restore)) or bool((self.dst_region == SCRATCH).any()))

    def _derived(self, name: str, make):
        key = "_derived_" + name        # not the method's own name, which it would shadow
        d = self.__dict__
        if key not in d:
            d[key] = make()
        return d[key]

    def reads_from(self, prefill_rank: int) -> np.ndarray:
        """Indices of the reads served by one prefill rank."""
        return np.nonzero(self.src_rank == prefill_rank)[0]


@dataclass(frozen=True)
class RequestBlocks:
    """The blocks one engine holds for one request: the tokens whose state is transferred,
    the attention block table (logical block ids, in token order) and the state block id
    (one page per state mixer, at the same id in every state region)."""
    num_tokens: int
    attn_blocks: tuple[int, ...]
    state_block: int

    def __post_init__(self):
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {self.num_tokens}")
        if self.state_block < 0 or min(self.attn_blocks, default=0) < 0:
            raise ValueError("block ids must be >= 0")
