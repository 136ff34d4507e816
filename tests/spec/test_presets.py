"""Presets against the published figures in REFERENCE.md (conv split, per-request state)."""
import pytest

from pdbridge.spec import (CacheConfig, EngineLayout, MixerKind, PRESETS, get_preset,
                           load_model_spec)

MIB = 2 ** 20


def conv_split(spec, tp, rank=0):
    """Channels of each conv segment one rank holds, from the layout."""
    layer = next(l.index for l in spec.layers
                 if l.mixer(MixerKind.MAMBA2) or l.mixer(MixerKind.GATED_DELTA_NET))
    tl = EngineLayout(spec, tp).rank(rank).tensor(layer, "conv")
    return tuple((b - a) * s.unit_size for s, (a, b) in zip(tl.tensor.segments, tl.seg_units))


@pytest.mark.parametrize("preset,tp,split", [
    ("nemotron-h-8b", 1, (8192, 1024, 1024)),
    ("nemotron-h-8b", 4, (2048, 256, 256)),
    ("nemotron-3-nano-30b-a3b", 1, (4096, 1024, 1024)),
    ("granite-4.0-h-small", 4, (2048, 128, 128)),
])
def test_conv_split_per_rank(preset, tp, split):
    assert conv_split(get_preset(preset), tp) == split


def test_gdn_conv_split_qwen35_27b_like():
    spec = load_model_spec(dict(model_type="qwen3_5_text", hidden_size=5120, num_hidden_layers=4,
                                num_attention_heads=24, num_key_value_heads=4, head_dim=256,
                                linear_num_key_heads=16, linear_num_value_heads=48,
                                linear_key_head_dim=128, linear_value_head_dim=128,
                                linear_conv_kernel_dim=4))
    assert conv_split(spec, 1) == (2048, 2048, 6144)
    assert conv_split(spec, 8) == (256, 256, 768)


@pytest.mark.parametrize("preset,mib", [
    ("nemotron-h-8b", 97), ("nemotron-3-nano-30b-a3b", 47), ("granite-4.0-h-small", 146),
    ("falcon-h1-7b", 133), ("qwen3-next-80b-a3b", 74)])
def test_per_request_state_at_tp1(preset, mib):
    layout = EngineLayout(get_preset(preset), 1, CacheConfig(num_blocks=1))
    got = layout.rank(0).state_nbytes_per_request(1) / MIB
    assert abs(got - mib) < 1.0, f"{preset}: {got:.1f} MiB, published {mib}"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_lays_out_at_common_tp_sizes(preset):
    spec = get_preset(preset)
    for tp in (1, 2, 4, 8):
        layout = EngineLayout(spec, tp)
        assert len(layout.rank(tp - 1).regions) >= spec.num_layers // 4
