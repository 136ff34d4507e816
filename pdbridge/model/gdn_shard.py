"""Which gated-delta-net heads and channels a TP rank holds, from the spec's ShardRules.

The conv channels are [q | k | v]; q and k are cut by the k-heads the rank's v-heads use
(v-head j uses k-head j // (Hv / Hk)), v by a plain split of the v-heads: the same Segments
`pdbridge.spec.state_tensors.gdn_tensors` gives the cache, so weights and cache agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pdbridge.spec import GatedDeltaNetSpec
from pdbridge.spec.state_tensors import ConvLayout, gdn_tensors


@dataclass(frozen=True)
class GdnShard:
    """Rank-local v-heads [v0, v1) and the k-heads [k0, k1) they use."""
    spec: GatedDeltaNetSpec
    k0: int
    k1: int
    v0: int
    v1: int

    @property
    def num_k(self) -> int:
        return self.k1 - self.k0

    @property
    def num_v(self) -> int:
        return self.v1 - self.v0

    @property
    def key_dim(self) -> int:               # local q (and k) channels
        return self.num_k * self.spec.head_k_dim

    @property
    def value_dim(self) -> int:             # local v (and z) channels
        return self.num_v * self.spec.head_v_dim

    @property
    def conv_dim(self) -> int:              # local [q | k | v]
        return 2 * self.key_dim + self.value_dim

    def k_of_v(self) -> list[int]:
        """Local k-head index used by each local v-head."""
        per = self.spec.num_v_heads // self.spec.num_k_heads
        return [j // per - self.k0 for j in range(self.v0, self.v1)]

    def rows(self) -> dict[str, torch.Tensor]:
        """Global indices of this rank's rows: `qkv` of in_proj_qkv and the conv ([q|k|v]),
        `value` of in_proj_z / out_proj's input (v-head channels), `heads` (b, a, dt_bias, A_log)."""
        g = self.spec
        kd, vd = g.head_k_dim, g.head_v_dim
        key = torch.arange(self.k0 * kd, self.k1 * kd)
        value = torch.arange(self.v0 * vd, self.v1 * vd)
        full_key = g.num_k_heads * kd
        return {"qkv": torch.cat([key, full_key + key, 2 * full_key + value]), "value": value,
                "heads": torch.arange(self.v0, self.v1)}


def gdn_shard(g: GatedDeltaNetSpec, tp_size: int, rank: int) -> GdnShard:
    conv, rec = gdn_tensors(0, g, ConvLayout.DS, "float32", "float32")
    q_seg, k_seg, v_seg = conv.segments
    k0, k1 = q_seg.units(tp_size, rank)
    v0, v1 = v_seg.units(tp_size, rank)
    if v1 <= v0:
        raise ValueError(f"tp_size={tp_size} leaves rank {rank} without delta-net value heads "
                         f"({g.num_v_heads} heads)")
    assert k_seg.units(tp_size, rank) == (k0, k1), "q and k segments disagree"
    assert rec.segments[0].units(tp_size, rank) == (v0, v1), "recurrent heads and v disagree"
    return GdnShard(g, k0, k1, v0, v1)
