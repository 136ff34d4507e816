"""Which units of a sharded axis each TP rank holds, and the tensors made of such axes.

DESIGN.md section 2: every cache tensor has one sharded dim made of segments (e.g. the Mamba2
conv channels are [x | B | C]); a ShardRule gives each rank one contiguous range of units per
segment, so every transfer question is an interval intersection.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class RuleKind(enum.Enum):
    SPLIT = "split"                                  # [r*n//t, (r+1)*n//t)
    REPLICATE_WHEN_FEWER = "replicate_when_fewer"    # split; t > n: unit r*n//t
    GROUPS_OF_HEADS = "groups_of_heads"              # the groups rank r's heads use
    FULL = "full"                                    # every rank holds every unit


@dataclass(frozen=True)
class ShardRule:
    kind: RuleKind
    num_heads: int = 0      # GROUPS_OF_HEADS: the head count whose split drives the groups
    granule: int = 1        # SPLIT: units are split in whole granules (channels of one head)

    def __post_init__(self):
        if (self.kind is RuleKind.GROUPS_OF_HEADS) != (self.num_heads > 0):
            raise ValueError("ShardRule.num_heads is required by groups_of_heads and only by it")
        if self.granule < 1 or (self.granule > 1 and self.kind is not RuleKind.SPLIT):
            raise ValueError("ShardRule.granule must be >= 1 and is for split only")

    def units(self, n: int, t: int, r: int) -> tuple[int, int]:
        """Global unit range [start, stop) that rank r of t holds, out of n units."""
        if not 0 <= r < t:
            raise ValueError(f"rank {r} is outside tp_size {t}")
        if self.kind is RuleKind.FULL:
            return 0, n
        if self.kind is RuleKind.SPLIT:
            a, b = split_range(n // self.granule, t, r)
            return a * self.granule, b * self.granule
        if self.kind is RuleKind.REPLICATE_WHEN_FEWER:
            if t > n:
                u = r * n // t
                return u, u + 1
            return split_range(n, t, r)
        # GROUPS_OF_HEADS: heads [h0, h1) use groups h // (H/n); n divides H.
        h0, h1 = split_range(self.num_heads, t, r)
        if h1 == h0:
            return 0, 0
        per_group = self.num_heads // n
        return h0 // per_group, (h1 - 1) // per_group + 1


SPLIT = ShardRule(RuleKind.SPLIT)
REPLICATE_WHEN_FEWER = ShardRule(RuleKind.REPLICATE_WHEN_FEWER)
FULL = ShardRule(RuleKind.FULL)


def split_by(granule: int) -> ShardRule:
    return ShardRule(RuleKind.SPLIT, granule=granule)


def groups_of_heads(num_heads: int) -> ShardRule:
    return ShardRule(RuleKind.GROUPS_OF_HEADS, num_heads)


def split_range(n: int, t: int, r: int) -> tuple[int, int]:
    return r * n // t, (r + 1) * n // t


@dataclass(frozen=True)
class Segment:
    name: str           # "x", "B", "C", "q", "k", "v", "heads", "channels"
    unit_count: int     # global units (heads, groups, channels)
    unit_size: int      # elements of the sharded dim per unit
    rule: ShardRule

    def __post_init__(self):
        if self.unit_count <= 0 or self.unit_size <= 0:
            raise ValueError(f"segment {self.name}: unit_count and unit_size must be positive")
        if self.unit_count % self.rule.granule:
            raise ValueError(f"segment {self.name}: granule {self.rule.granule} does not divide "
                             f"{self.unit_count} units")
        if self.rule.kind is RuleKind.GROUPS_OF_HEADS and self.rule.num_heads % self.unit_count:
            raise ValueError(f"segment {self.name}: {self.rule.num_heads} heads do not divide "
                             f"into {self.unit_count} groups")

    def units(self, t: int, r: int) -> tuple[int, int]:
        return self.rule.units(self.unit_count, t, r)


@dataclass(frozen=True)
class Dim:
    name: str
    extent: int         # elements; for the sharded dim, 0 (it is given by the segments)


@dataclass(frozen=True)
class StateTensor:
    """One cache tensor of one layer, before any rank or layout is chosen.

    `dims` lists every dim in physical order (outer -> inner). BLOCK (the page index; kernel
    blocks for a paged tensor) usually comes first; a layout may put it inside the head dim.
    The token dim of a paged tensor is TOKEN (tokens within a kernel block). The extents of
    BLOCK, TOKEN and the sharded dim are 0 here: the EngineLayout gives them.
    """
    name: str               # "kv", "k", "v", "conv", "ssm", "recurrent"
    layer: int
    dims: tuple[Dim, ...]
    sharded_dim: str
    segments: tuple[Segment, ...]
    dtype: str
    paged: bool = False     # True: attention KV, indexed by token through a block table

    def __post_init__(self):
        names = [d.name for d in self.dims]
        if names.count(self.sharded_dim) != 1:
            raise ValueError(f"{self.name}: sharded dim {self.sharded_dim!r} must appear once in {names}")
        if names.count(BLOCK) != 1:
            raise ValueError(f"{self.name}: needs exactly one {BLOCK!r} dim in {names}")
        if self.paged != (TOKEN in names):
            raise ValueError(f"{self.name}: a paged tensor has a {TOKEN!r} dim, and only it")

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.name

    def dim_index(self, name: str) -> int:
        return [d.name for d in self.dims].index(name)


BLOCK = "block"
TOKEN = "token"
