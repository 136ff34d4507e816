"""EngineLayout.to_dict / from_dict: the layout travels whole and is rebuilt identically."""
from __future__ import annotations

import dataclasses

import pytest

from pdbridge.spec import PRESETS, CacheConfig, EngineLayout, LayoutError, get_preset
from pdbridge.transport.messages import MetadataReply, decode, encode

CACHES = [CacheConfig(), CacheConfig(conv_layout="SD", attn_layout="heads_across_blocks",
                                     page_padding=True, ssm_dtype="bfloat16", num_blocks=3)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("cache", CACHES, ids=["default", "sd_padded"])
def test_layout_survives_the_wire(preset, cache):
    tp = 2
    layout = EngineLayout(get_preset(preset), tp, cache)
    reply = MetadataReply("p0", 0, b"", [], layout.to_dict(), layout.digest)
    got = EngineLayout.from_dict(decode(encode(reply)).layout)
    assert got.digest == layout.digest
    assert got.model == layout.model and got.cache == layout.cache
    assert got.rank(1) == layout.rank(1)        # every region, tensor, axis and stride


def test_digest_mismatch_is_refused():
    d = EngineLayout(get_preset("lfm2-1.2b"), 1).to_dict()
    d["cache"]["num_blocks"] += 1               # the layout no longer matches its digest
    with pytest.raises(LayoutError, match="digest"):
        EngineLayout.from_dict(d)


def test_spec_without_config_cannot_be_sent():
    spec = dataclasses.replace(get_preset("lfm2-1.2b"), config={})
    with pytest.raises(LayoutError, match="no source config"):
        EngineLayout(spec, 1).to_dict()
    edited = dataclasses.replace(get_preset("lfm2-1.2b"), ssm_dtype="float16")
    with pytest.raises(LayoutError, match="differs"):
        EngineLayout(edited, 1).to_dict()
