"""The cache tensors of each mixer kind, as StateTensors (DESIGN.md section 2).

Shapes per rank follow REFERENCE.md; this is the only place that knows which mixer holds
which tensor. Everything below (layout, planner) sees segments and rules only.
"""
from __future__ import annotations

import enum

from .model_spec import (AttentionSpec, GatedDeltaNetSpec, Mamba1Spec, Mamba2Spec, MixerSpec,
                         ModelSpec, ShortConvSpec)
from .sharding import (BLOCK, SPLIT, TOKEN, Dim, Segment, StateTensor,
                       groups_of_heads, split_by)


class ConvLayout(enum.Enum):
    SD = "SD"       # (state_len, channels): each segment is state_len strided runs
    DS = "DS"       # (channels, state_len): each segment is one run


class AttnLayout(enum.Enum):
    HEADS_OUTER = "heads_outer"            # per block (kv, heads, token, head_dim)
    TOKENS_OUTER = "tokens_outer"          # per block (token, kv, heads, head_dim)
    HEADS_ACROSS_BLOCKS = "heads_across_blocks"   # (kv, heads, block, token, head_dim)


_B = Dim(BLOCK, 0)


def conv_tensor(layer: int, segments: tuple[Segment, ...], state_len: int, layout: ConvLayout,
                dtype: str) -> StateTensor:
    ch, sl = Dim("channels", 0), Dim("state_len", state_len)
    dims = (_B, sl, ch) if layout is ConvLayout.SD else (_B, ch, sl)
    return StateTensor("conv", layer, dims, "channels", segments, dtype)


def mamba2_tensors(layer: int, m: Mamba2Spec, conv_layout: ConvLayout, dtype: str,
                   ssm_dtype: str) -> list[StateTensor]:
    heads_rule = groups_of_heads(m.num_heads)
    conv = conv_tensor(layer, (
        Segment("x", m.intermediate, 1, split_by(m.head_dim)),   # channels, split by whole heads
        Segment("B", m.n_groups, m.d_state, heads_rule),
        Segment("C", m.n_groups, m.d_state, heads_rule),
    ), m.d_conv - 1, conv_layout, dtype)
    ssm = StateTensor("ssm", layer, (_B, Dim("heads", 0), Dim("head_dim", m.head_dim),
                                     Dim("d_state", m.d_state)),
                      "heads", (Segment("heads", m.num_heads, 1, SPLIT),), ssm_dtype)
    return [conv, ssm]


def mamba1_tensors(layer: int, m: Mamba1Spec, conv_layout: ConvLayout, dtype: str,
                   ssm_dtype: str) -> list[StateTensor]:
    conv = conv_tensor(layer, (Segment("x", m.intermediate, 1, SPLIT),), m.d_conv - 1,
                       conv_layout, dtype)
    ssm = StateTensor("ssm", layer, (_B, Dim("channels", 0), Dim("d_state", m.d_state)),
                      "channels", (Segment("x", m.intermediate, 1, SPLIT),), ssm_dtype)
    return [conv, ssm]


def gdn_tensors(layer: int, g: GatedDeltaNetSpec, conv_layout: ConvLayout, dtype: str,
                ssm_dtype: str) -> list[StateTensor]:
    k_rule = groups_of_heads(g.num_v_heads)     # v-head j uses k-head j // (Hv/Hk)
    conv = conv_tensor(layer, (
        Segment("q", g.num_k_heads, g.head_k_dim, k_rule),
        Segment("k", g.num_k_heads, g.head_k_dim, k_rule),
        Segment("v", g.num_v_heads, g.head_v_dim, SPLIT),
    ), g.d_conv - 1, conv_layout, dtype)
    rec = StateTensor("recurrent", layer, (_B, Dim("heads", 0), Dim("head_k_dim", g.head_k_dim),
                                           Dim("head_v_dim", g.head_v_dim)),
                      "heads", (Segment("heads", g.num_v_heads, 1, SPLIT),), ssm_dtype)
    return [conv, rec]


def short_conv_tensors(layer: int, s: ShortConvSpec, conv_layout: ConvLayout,
                       dtype: str) -> list[StateTensor]:
    return [conv_tensor(layer, (Segment("x", s.hidden, 1, SPLIT),), s.l_cache - 1,
                        conv_layout, dtype)]


def attention_tensors(layer: int, a: AttentionSpec, layout: AttnLayout, kv_packed: bool,
                      dtype: str) -> list[StateTensor]:
    # A rank holds the KV heads its query heads use (REFERENCE.md, Attention KV).
    seg = (Segment("kv_heads", a.num_kv_heads, 1, groups_of_heads(a.num_q_heads)),)
    heads, tok, hd = Dim("heads", 0), Dim(TOKEN, 0), Dim("head_dim", a.head_dim)
    kv = (Dim("kv", 2),) if kv_packed else ()
    if layout is AttnLayout.HEADS_OUTER:
        dims = (_B, *kv, heads, tok, hd)
    elif layout is AttnLayout.TOKENS_OUTER:
        dims = (_B, tok, *kv, heads, hd)
    else:
        dims = (*kv, heads, _B, tok, hd)
    names = ("kv",) if kv_packed else ("k", "v")
    return [StateTensor(n, layer, dims, "heads", seg, dtype, paged=True) for n in names]


def mixer_tensors(layer: int, mixer: MixerSpec, conv_layout: ConvLayout, attn_layout: AttnLayout,
                  kv_packed: bool, dtype: str, ssm_dtype: str) -> list[StateTensor]:
    if isinstance(mixer, AttentionSpec):
        return attention_tensors(layer, mixer, attn_layout, kv_packed, dtype)
    if isinstance(mixer, Mamba2Spec):
        return mamba2_tensors(layer, mixer, conv_layout, dtype, ssm_dtype)
    if isinstance(mixer, Mamba1Spec):
        return mamba1_tensors(layer, mixer, conv_layout, dtype, ssm_dtype)
    if isinstance(mixer, GatedDeltaNetSpec):
        return gdn_tensors(layer, mixer, conv_layout, dtype, ssm_dtype)
    if isinstance(mixer, ShortConvSpec):
        return short_conv_tensors(layer, mixer, conv_layout, dtype)
    raise TypeError(f"unknown mixer spec {type(mixer).__name__}")


def model_tensors(spec: ModelSpec, conv_layout: ConvLayout, attn_layout: AttnLayout,
                  kv_packed: bool, dtype: str, ssm_dtype: str) -> list[list[StateTensor]]:
    """Per layer, per mixer: the list of tensors that mixer keeps (one region each mixer)."""
    return [[t for t in mixer_tensors(l.index, m, conv_layout, attn_layout, kv_packed, dtype, ssm_dtype)]
            for l in spec.layers for m in l.mixers]
