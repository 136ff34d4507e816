"""Hypothesis strategies: tiny random hybrid specs, TP pairs, cache layouts and block tables."""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import assume
from hypothesis import strategies as st

from pdbridge.plan import RequestBlocks, Strategy
from pdbridge.spec import (AttentionSpec, AttnLayout, CacheConfig, ConvLayout, EngineLayout,
                           FfnKind, GatedDeltaNetSpec, LayerSpec, LayoutError, Mamba1Spec,
                           Mamba2Spec, ModelSpec, ShortConvSpec)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def mamba2(draw):
    h = draw(st.sampled_from([2, 3, 4, 6, 8, 12]))
    return Mamba2Spec(num_heads=h, head_dim=draw(st.integers(1, 2)), d_state=draw(st.integers(1, 2)),
                      n_groups=draw(st.sampled_from(_divisors(h))), d_conv=draw(st.integers(2, 4)))


@st.composite
def attention(draw):
    kv = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12]))
    return AttentionSpec(num_q_heads=kv * draw(st.sampled_from([1, 2, 3])), num_kv_heads=kv,
                         head_dim=draw(st.integers(1, 3)))


mamba1 = st.builds(Mamba1Spec, intermediate=st.integers(2, 8), d_state=st.integers(1, 2),
                   d_conv=st.integers(2, 3), dt_rank=st.just(1))
short_conv = st.builds(ShortConvSpec, hidden=st.integers(2, 8), l_cache=st.integers(2, 3))


@st.composite
def gated_delta_net(draw):
    hk = draw(st.sampled_from([1, 2, 4]))
    return GatedDeltaNetSpec(num_k_heads=hk, num_v_heads=hk * draw(st.sampled_from([1, 2])),
                             head_k_dim=draw(st.integers(1, 2)), head_v_dim=draw(st.integers(1, 2)),
                             d_conv=draw(st.integers(2, 3)))


mixer = st.one_of(mamba2(), attention(), mamba1, short_conv, gated_delta_net())


@st.composite
def model_specs(draw, max_layers: int = 3):
    n = draw(st.integers(1, max_layers))
    layers = []
    for i in range(n):
        mixers = (draw(mixer),)
        if draw(st.integers(0, 9)) == 0:         # FalconH1-style attention + Mamba2 in one layer
            mixers = (draw(attention()), draw(mamba2()))
        layers.append(LayerSpec(i, mixers, FfnKind.MLP))
    dt = draw(st.sampled_from(["bfloat16", "float32"]))
    return ModelSpec("tiny", 8, 16, tuple(layers), dtype=dt,
                     ssm_dtype=draw(st.sampled_from(["float32", "bfloat16"])))


def valid_tp_sizes(spec: ModelSpec, max_tp: int = 8) -> list[int]:
    out = []
    for t in range(1, max_tp + 1):
        try:
            EngineLayout(spec, t)
            out.append(t)
        except LayoutError:
            pass
    return out


@dataclass(frozen=True)
class Case:
    prefill: EngineLayout
    decode: EngineLayout
    prefill_blocks: RequestBlocks
    decode_blocks: RequestBlocks
    strategy: Strategy

    def __repr__(self):
        return (f"Case(P={self.prefill.tp_size} {self.prefill.cache}, D={self.decode.tp_size} "
                f"{self.decode.cache}, layers={self.prefill.model.layers}, {self.prefill_blocks}, "
                f"{self.decode_blocks}, {self.strategy})")


@st.composite
def cache_configs(draw, kv_packed: bool):
    padding = draw(st.booleans())
    kbt = draw(st.sampled_from([1, 2, 3, 4]))
    bt = None if padding else kbt * draw(st.integers(1, 3))
    return CacheConfig(num_blocks=1, block_tokens=bt, kernel_block_tokens=kbt,
                       conv_layout=draw(st.sampled_from(list(ConvLayout))),
                       attn_layout=draw(st.sampled_from(list(AttnLayout))),
                       kv_packed=kv_packed, page_padding=padding,
                       layer_interleave=draw(st.booleans()))


@st.composite
def layout_with_blocks(draw, spec: ModelSpec, tp: int, cache: CacheConfig, num_tokens: int):
    probe = EngineLayout(spec, tp, cache)
    need = -(-num_tokens // probe.block_tokens)
    num_blocks = need + draw(st.integers(1, 3))
    layout = EngineLayout(spec, tp, CacheConfig(**{**cache.__dict__, "num_blocks": num_blocks}))
    ids = draw(st.permutations(range(num_blocks)))
    table = tuple(ids[:need + draw(st.integers(0, num_blocks - need))])
    return layout, RequestBlocks(num_tokens, table, draw(st.integers(0, num_blocks - 1)))


@st.composite
def cases(draw, strategies=tuple(Strategy)):
    spec = draw(model_specs())
    sizes = valid_tp_sizes(spec)
    p_tp, d_tp = draw(st.sampled_from(sizes)), draw(st.sampled_from(sizes))
    packed = draw(st.booleans())
    num_tokens = draw(st.integers(0, 24))
    try:
        prefill, pb = draw(layout_with_blocks(spec, p_tp, draw(cache_configs(packed)), num_tokens))
        decode, db = draw(layout_with_blocks(spec, d_tp, draw(cache_configs(packed)), num_tokens))
    except LayoutError:
        assume(False)
    return Case(prefill, decode, pb, db, draw(st.sampled_from(list(strategies))))
