"""Which global heads, groups and channels a TP rank holds, from the spec's ShardRules.

The cache layout (EngineLayout) and the weight sharding must agree unit for unit, so both
read the same Segments: the ones `pdbridge.spec.state_tensors` builds for each mixer.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdbridge.spec import SPLIT, AttentionSpec, Mamba2Spec
from pdbridge.spec.state_tensors import ConvLayout, attention_tensors, mamba2_tensors, AttnLayout


@dataclass(frozen=True)
class AttentionShard:
    """Rank-local attention heads: query heads [q0, q1), KV heads [kv0, kv1)."""
    spec: AttentionSpec
    q0: int
    q1: int
    kv0: int
    kv1: int

    @property
    def num_q(self) -> int:
        return self.q1 - self.q0

    @property
    def num_kv(self) -> int:
        return self.kv1 - self.kv0

    def kv_of_q(self) -> list[int]:
        """Local KV head index used by each local query head (GQA: q // (Q/K))."""
        per = self.spec.num_q_heads // self.spec.num_kv_heads
        return [q // per - self.kv0 for q in range(self.q0, self.q1)]


@dataclass(frozen=True)
class Mamba2Shard:
    """Rank-local Mamba2 heads [h0, h1) and the B/C groups [g0, g1) they use."""
    spec: Mamba2Spec
    h0: int
    h1: int
    g0: int
    g1: int

    @property
    def num_heads(self) -> int:
        return self.h1 - self.h0

    @property
    def num_groups(self) -> int:
        return self.g1 - self.g0

    @property
    def intermediate(self) -> int:          # local x (and z) channels
        return self.num_heads * self.spec.head_dim

    @property
    def conv_dim(self) -> int:              # local [x | B | C] channels
        return self.intermediate + 2 * self.num_groups * self.spec.d_state

    def group_of_head(self) -> list[int]:
        """Local group index of each local head (head h uses group h // (H/G))."""
        per = self.spec.num_heads // self.spec.n_groups
        return [h // per - self.g0 for h in range(self.h0, self.h1)]

    def norm_group_size(self) -> int:       # gated-norm group: I / G channels
        return self.spec.intermediate // self.spec.n_groups


def attention_shard(a: AttentionSpec, tp_size: int, rank: int) -> AttentionShard:
    q0, q1 = SPLIT.units(a.num_q_heads, tp_size, rank)
    kv_seg = attention_tensors(0, a, AttnLayout.HEADS_OUTER, True, "float32")[0].segments[0]
    kv0, kv1 = kv_seg.units(tp_size, rank)
    if q1 <= q0:
        raise ValueError(f"tp_size={tp_size} leaves rank {rank} without query heads "
                         f"({a.num_q_heads} heads)")
    return AttentionShard(a, q0, q1, kv0, kv1)


def mamba2_shard(m: Mamba2Spec, tp_size: int, rank: int) -> Mamba2Shard:
    conv, ssm = mamba2_tensors(0, m, ConvLayout.DS, "float32", "float32")
    h0, h1 = ssm.segments[0].units(tp_size, rank)
    x0, x1 = conv.segments[0].units(tp_size, rank)
    g0, g1 = conv.segments[1].units(tp_size, rank)
    if h1 <= h0:
        raise ValueError(f"tp_size={tp_size} leaves rank {rank} without Mamba2 heads "
                         f"({m.num_heads} heads)")
    # The x segment is split by whole heads: it must be exactly the local heads' channels.
    assert (x0, x1) == (h0 * m.head_dim, h1 * m.head_dim), "x channels and SSM heads disagree"
    return Mamba2Shard(m, h0, h1, g0, g1)


def split_units(n: int, tp_size: int, rank: int) -> tuple[int, int]:
    """MLP / MoE intermediate channels: a plain split."""
    return SPLIT.units(n, tp_size, rank)
