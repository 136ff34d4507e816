"""Pure geometry: model specs, sharding rules, and the byte layout of every rank's caches."""
from .hf_config import ConfigError, load_model_spec
from .layout import (DTYPE_BYTES, Axis, CacheConfig, EngineLayout, LayoutError, PlacedGroup,
                     Placement, RankLayout, Region,
                     TensorLayout)
from .model_spec import (AttentionSpec, FfnKind, GatedDeltaNetSpec, LayerSpec, Mamba1Spec,
                         Mamba2Spec, MixerKind, ModelSpec, ShortConvSpec)
from .presets import PRESETS, get_preset, resolve_model
from .sharding import (BLOCK, FULL, REPLICATE_WHEN_FEWER, SPLIT, TOKEN, Dim, RuleKind, Segment,
                       ShardRule, StateTensor, groups_of_heads, split_by, split_range)
from .state_tensors import AttnLayout, ConvLayout

__all__ = [n for n in dir() if not n.startswith("_")]
