"""vLLM 0.32's CPU cache memory as an EngineLayout (pdbridge/vllm/layout.py), without vLLM.

The views are the ones a probe connector saw in `vllm serve` of a tiny NemotronH (hidden 64,
4 Mamba heads of 16, d_state 16, 2 KV heads of 32, layers M A M A) with 64 blocks: TP=1 with
the SD conv layout, TP=2 with DS. From them the layout must place every tensor where vLLM
has it (check_views), plan reads the oracle agrees with between the two, and refuse views
that disagree.
"""
import os
import sys

import pytest

from pdbridge.plan import RequestBlocks
from pdbridge.spec import LayoutError
from pdbridge.vllm.layout import TensorView, VllmView, check_views, vllm_layout

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "plan"))
from plan_harness import check_all_ranks  # noqa: E402

BLOCKS, F32 = 64, 4


def hf_config(n_groups: int) -> dict:
    return {"model_type": "nemotron_h", "vocab_size": 256, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "intermediate_size": 64, "ssm_state_size": 16, "mamba_num_heads": 4,
            "mamba_head_dim": 16, "n_groups": n_groups, "conv_kernel": 4,
            "layers_block_type": ["mamba", "attention", "mamba", "attention"],
            "torch_dtype": "float32"}


def probed_views(tp: int, conv_layout: str, n_groups: int = 1, base: int = 0x7F0000000000):
    heads, kv_heads = 4 // tp, 2 // tp
    channels = 64 // tp + 2 * 16 * (n_groups if n_groups == 1 else n_groups // tp)
    page = 65536 // tp          # vLLM's page: the attention block (128 tokens)
    slot = BLOCKS * page
    conv_nbytes = 3 * channels * F32
    if conv_layout == "SD":
        conv = lambda a: TensorView(a, (BLOCKS, 3, channels), (page // F32, channels, 1), F32)
    else:
        conv = lambda a: TensorView(a, (BLOCKS, channels, 3), (page // F32, 3, 1), F32)
    ssm = lambda a: TensorView(a + conv_nbytes, (BLOCKS, heads, 16, 16),
                               (page // F32, 256, 16, 1), F32)
    kv = lambda a: TensorView(a, (BLOCKS, kv_heads, 128, 64), (page // F32, 128 * 64, 64, 1), F32)
    storage = dict(storage_addr=base, storage_nbytes=2 * slot)
    return [
        VllmView("model.layers.0.mixer", False, views=(conv(base), ssm(base)), **storage),
        VllmView("model.layers.2.mixer", False, views=(conv(base + slot), ssm(base + slot)),
                 **storage),
        VllmView("model.layers.1.mixer.attn", True, views=(kv(base),), backend="CPU_ATTN",
                 **storage),
        VllmView("model.layers.3.mixer.attn", True, views=(kv(base + slot),),
                 backend="CPU_ATTN", **storage),
    ]


def layout_of(tp, conv_layout, n_groups=1):
    views = probed_views(tp, conv_layout, n_groups)
    layout = vllm_layout(hf_config(n_groups), tp, BLOCKS, 128, conv_layout, "float32",
                         "float32", views)
    for r in range(tp):
        check_views(layout, r, views)
    return layout


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
@pytest.mark.parametrize("p_tp,d_tp", [(1, 2), (2, 1)])
def test_probed_vllm_memory_plans_what_the_oracle_says(n_groups, conv_layout, p_tp, d_tp):
    prefill, decode = layout_of(p_tp, conv_layout, n_groups), layout_of(d_tp, conv_layout, n_groups)
    # 130 tokens: two attention blocks, the second partly used; the state at block 7.
    check_all_ranks(prefill, decode, RequestBlocks(130, (3, 9), 7),
                    RequestBlocks(130, (12, 2), 5), "direct")


def test_one_register_region_and_the_state_packed_after_conv():
    layout = layout_of(2, "DS")
    r = layout.rank(1)
    assert len(r.regions) == 1 and r.regions[0].nbytes == 2 * BLOCKS * 32768
    assert r.tensor(0, "ssm").base - r.tensor(0, "conv").base == 3 * 64 * F32 == 0x300
    assert r.tensor(2, "conv").base == r.tensor(3, "kv").base == BLOCKS * 32768


def test_views_that_disagree_with_the_layout_refuse_naming_the_layer():
    views = probed_views(2, "DS")
    layout = vllm_layout(hf_config(1), 2, BLOCKS, 128, "DS", "float32", "float32", views)
    ssm = views[0].views[1]
    moved = TensorView(ssm.addr + 64, ssm.shape, ssm.strides, ssm.itemsize)
    bad = [VllmView(views[0].name, False, views[0].storage_addr, views[0].storage_nbytes,
                    (views[0].views[0], moved))] + views[1:]
    with pytest.raises(LayoutError, match="model.layers.0.mixer ssm: vLLM's view"):
        check_views(layout, 0, bad)
    # The conv layout the layout was told is not the one in memory.
    sd = vllm_layout(hf_config(1), 2, BLOCKS, 128, "SD", "float32", "float32", views)
    with pytest.raises(LayoutError, match="conv: vLLM's view"):
        check_views(sd, 0, views)


def test_unknown_attention_backends_refuse():
    views = probed_views(1, "SD")
    odd = [VllmView(v.name, v.attention, v.storage_addr, v.storage_nbytes, v.views,
                    "FLASH_ATTN" if v.attention else "") for v in views]
    with pytest.raises(LayoutError, match="attention backend 'FLASH_ATTN'; allowed: CPU_ATTN"):
        vllm_layout(hf_config(1), 1, BLOCKS, 128, "SD", "float32", "float32", odd)


def test_the_package_imports_without_vllm_and_names_what_is_missing():
    import importlib.util

    import pdbridge.vllm
    assert pdbridge.vllm.__doc__ and "kv_connector_module_path" in pdbridge.vllm.__doc__
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match="vllm"):
            pdbridge.vllm.PdbridgeConnector
    with pytest.raises(AttributeError):
        pdbridge.vllm.NoSuchThing
