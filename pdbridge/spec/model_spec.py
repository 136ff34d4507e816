"""Model geometry: what every layer holds, read from a Hugging Face config.

Only the fields that decide cache geometry and sharding live here. Numbers that matter
only to the arithmetic of the model (norm epsilons, rope theta, multipliers) are read by
`pdbridge.model` from `ModelSpec.config`, the parsed config this spec was built from.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping


class MixerKind(enum.Enum):
    ATTENTION = "attention"
    MAMBA2 = "mamba2"
    MAMBA1 = "mamba1"
    GATED_DELTA_NET = "gated_delta_net"
    SHORT_CONV = "short_conv"


class FfnKind(enum.Enum):
    NONE = "none"
    MLP = "mlp"
    MOE = "moe"


@dataclass(frozen=True)
class AttentionSpec:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    kind: MixerKind = field(default=MixerKind.ATTENTION, init=False)

    def __post_init__(self):
        _positive(self, "num_q_heads", "num_kv_heads", "head_dim")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads={self.num_q_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")


@dataclass(frozen=True)
class Mamba2Spec:
    num_heads: int      # H
    head_dim: int       # P
    d_state: int        # N
    n_groups: int       # G
    d_conv: int         # K
    kind: MixerKind = field(default=MixerKind.MAMBA2, init=False)

    def __post_init__(self):
        _positive(self, "num_heads", "head_dim", "d_state", "n_groups", "d_conv")
        if self.num_heads % self.n_groups:
            raise ValueError(f"mamba num_heads={self.num_heads} is not a multiple of "
                             f"n_groups={self.n_groups}")

    @property
    def intermediate(self) -> int:          # I = H * P
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:              # I + 2 * G * N, the [x | B | C] channels
        return self.intermediate + 2 * self.n_groups * self.d_state


@dataclass(frozen=True)
class Mamba1Spec:
    intermediate: int   # I = expand * D
    d_state: int
    d_conv: int
    dt_rank: int
    kind: MixerKind = field(default=MixerKind.MAMBA1, init=False)

    def __post_init__(self):
        _positive(self, "intermediate", "d_state", "d_conv", "dt_rank")


@dataclass(frozen=True)
class GatedDeltaNetSpec:
    num_k_heads: int    # Hk
    num_v_heads: int    # Hv
    head_k_dim: int     # dk
    head_v_dim: int     # dv
    d_conv: int
    kind: MixerKind = field(default=MixerKind.GATED_DELTA_NET, init=False)

    def __post_init__(self):
        _positive(self, "num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "d_conv")
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"num_v_heads={self.num_v_heads} is not a multiple of "
                             f"num_k_heads={self.num_k_heads}")

    @property
    def conv_dim(self) -> int:              # [q | k | v]
        return 2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim


@dataclass(frozen=True)
class ShortConvSpec:
    hidden: int         # D channels, sharded
    l_cache: int        # conv kernel L; the state holds L - 1 tokens
    kind: MixerKind = field(default=MixerKind.SHORT_CONV, init=False)

    def __post_init__(self):
        _positive(self, "hidden", "l_cache")


MixerSpec = AttentionSpec | Mamba2Spec | Mamba1Spec | GatedDeltaNetSpec | ShortConvSpec


@dataclass(frozen=True)
class LayerSpec:
    index: int
    mixers: tuple[MixerSpec, ...]   # several run in parallel (FalconH1), or in sequence (Zamba2 hybrid)
    ffn: FfnKind

    def mixer(self, kind: MixerKind) -> MixerSpec | None:
        return next((m for m in self.mixers if m.kind is kind), None)


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    hidden_size: int
    vocab_size: int
    layers: tuple[LayerSpec, ...]
    dtype: str = "bfloat16"                 # activations, KV and conv state
    ssm_dtype: str = "float32"              # recurrent (SSM / delta-net) state
    name: str = ""
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layers_with(self, kind: MixerKind) -> tuple[LayerSpec, ...]:
        return tuple(l for l in self.layers if l.mixer(kind) is not None)

    def pattern(self) -> str:
        """One letter per layer: M mamba2, m mamba1, G delta net, C short conv, * attention,
        F falcon-style parallel attention + mamba; `-` MLP only, `E` MoE only."""
        out = []
        for l in self.layers:
            kinds = {m.kind for m in l.mixers}
            if len(kinds) > 1:
                out.append("F")
            elif kinds:
                out.append(_LETTER[kinds.pop()])
            else:
                out.append("E" if l.ffn is FfnKind.MOE else "-")
        return "".join(out)


_LETTER = {MixerKind.MAMBA2: "M", MixerKind.MAMBA1: "m", MixerKind.GATED_DELTA_NET: "G",
           MixerKind.SHORT_CONV: "C", MixerKind.ATTENTION: "*"}


def _positive(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be a positive integer, got {v!r}")
