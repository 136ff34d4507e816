"""vLLM's cache memory as an EngineLayout with a Placement (spec/layout.py): data only.

The worker hands over what it sees in memory (VllmView per layer: the views vLLM's layers
use, as address, shape and strides), and `vllm_layout` says where every tensor of our model
spec sits: registered buffers are the distinct storages, a group's base is its first view's
offset in its storage, the page is the views' block stride. Then `check_views` compares
every stride and base the layout derived with the views themselves, so a vLLM whose memory
differs from what this file assumes refuses at start instead of moving wrong bytes.

Assumed (and checked) from vLLM 0.32's CPU build: an attention view is
(blocks, kv_heads, block_tokens, 2 * head_dim) holding, per block and head, the K rows then
the V rows (CPU_ATTN); a Mamba2/GDN/Mamba1 layer holds (conv, ssm/recurrent) views packed
back to back in one page; a short conv layer holds (conv,).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pdbridge.spec import (BLOCK, TOKEN, CacheConfig, EngineLayout, LayoutError, PlacedGroup,
                           Placement, load_model_spec)

# Per block: heads, then K or V, then tokens, then head_dim (cpu_attn.py's view/chunk).
CPU_ATTN_ORDER = (BLOCK, "heads", "kv", TOKEN, "head_dim")
ATTN_ORDERS = {"CPU_ATTN": CPU_ATTN_ORDER}
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorView:
    addr: int                   # data_ptr
    shape: tuple[int, ...]
    strides: tuple[int, ...]    # in elements
    itemsize: int


@dataclass(frozen=True)
class VllmView:
    """One vLLM layer's cache as its layer object holds it."""
    name: str                   # "model.layers.3.mixer.attn"
    attention: bool
    storage_addr: int
    storage_nbytes: int
    views: tuple[TensorView, ...]   # attention: (kv,); state mixers: (conv, ssm) or (conv,)
    backend: str = ""           # attention backend name (ATTN_ORDERS)


def layer_index(name: str) -> int:
    m = _LAYER.search(name)
    if not m:
        raise LayoutError(f"vLLM layer name {name!r} has no 'layers.<i>.' part")
    return int(m.group(1))


def vllm_layout(hf_config: dict, tp_size: int, num_blocks: int, block_tokens: int,
                conv_layout: str, dtype: str, ssm_dtype: str,
                layers: list[VllmView]) -> EngineLayout:
    spec = load_model_spec(hf_config, dtype=dtype)
    storages = sorted({(v.storage_addr, v.storage_nbytes) for v in layers})
    region = {addr: i for i, (addr, _) in enumerate(storages)}
    groups, pages, kernel_tokens = [], set(), set()
    for v in layers:
        first = v.views[0]
        pages.add(first.strides[0] * first.itemsize)
        layer = layer_index(v.name)
        base = first.addr - v.storage_addr
        if v.attention:
            if v.backend not in ATTN_ORDERS:
                raise LayoutError(f"{v.name}: attention backend {v.backend!r}; allowed: "
                                  f"{', '.join(ATTN_ORDERS)}")
            kernel_tokens.add(first.shape[2])
            groups.append(PlacedGroup(layer, ("kv",), region[v.storage_addr], base,
                                      (ATTN_ORDERS[v.backend],)))
        else:
            names = ("conv", _state_name(spec, layer))[:len(v.views)]
            groups.append(PlacedGroup(layer, names, region[v.storage_addr], base))
    if len(pages) != 1:
        raise LayoutError(f"vLLM layers have block strides {sorted(pages)}; pdbridge.vllm "
                          f"needs one page size for every layer")
    if len(kernel_tokens) > 1:
        raise LayoutError(f"attention kernel block sizes differ: {sorted(kernel_tokens)}")
    placement = Placement(tuple((f"vllm.kv{i}", n) for i, (_, n) in enumerate(storages)),
                          pages.pop(), tuple(groups), pack_align=1)
    kbt = kernel_tokens.pop() if kernel_tokens else block_tokens
    return EngineLayout(spec, tp_size, CacheConfig(
        num_blocks=num_blocks, block_tokens=block_tokens, kernel_block_tokens=kbt,
        conv_layout=conv_layout, dtype=dtype, ssm_dtype=ssm_dtype, placement=placement))


def whole_blocks(prefill: EngineLayout, decode: EngineLayout, num_tokens: int) -> int:
    """The tokens to move for a request of `num_tokens`: whole attention blocks.

    The CPU attention kernel keeps each (block, head, K or V) slab in an order of its own
    (measured: moving tokens 0..n-1 of a partly filled block as token-major rows gives wrong
    tokens; moving whole blocks gives exact ones), so the token axis cannot be cut inside a
    block, and both engines must use the same kernel block size."""
    if prefill.kernel_block_tokens != decode.kernel_block_tokens:
        raise LayoutError(f"kernel_block_tokens: prefill {prefill.kernel_block_tokens}, decode "
                          f"{decode.kernel_block_tokens}; the CPU attention kernel's blocks "
                          f"move whole, so both servers need the same --block-size")
    b = decode.kernel_block_tokens
    return -(-num_tokens // b) * b


def _state_name(spec, layer: int) -> str:
    from pdbridge.spec import GatedDeltaNetSpec
    mixers = spec.layers[layer].mixers
    return "recurrent" if any(isinstance(m, GatedDeltaNetSpec) for m in mixers) else "ssm"


def check_views(layout: EngineLayout, rank: int, layers: list[VllmView]) -> None:
    """Refuse (LayoutError naming the layer and tensor) unless every view's base, block
    stride, shape and strides are where the layout puts that tensor's bytes."""
    r = layout.rank(rank)
    for v in layers:
        layer = layer_index(v.name)
        if v.attention:
            tl = r.tensor(layer, "kv")
            view = v.views[0]
            ax = {a.name: a for a in tl.axes}
            want_shape = (ax[BLOCK].extent, ax["heads"].extent, ax[TOKEN].extent,
                          2 * ax["head_dim"].extent)
            want = (ax[BLOCK].stride, ax["heads"].stride, 2 * ax[TOKEN].stride,
                    ax["head_dim"].stride)
            _same(v.name, "kv", view, tl.base + v.storage_addr, want_shape, want)
            continue
        names = [t.tensor.name for t in r.tensors if t.tensor.layer == layer and not t.tensor.paged]
        if len(names) != len(v.views):
            raise LayoutError(f"{v.name}: vLLM holds {len(v.views)} state tensors, the model "
                              f"spec {len(names)} ({', '.join(names)})")
        for name, view in zip(names, v.views):
            tl = r.tensor(layer, name)
            _same(v.name, name, view, tl.base + v.storage_addr,
                  tuple(a.extent for a in tl.axes), tuple(a.stride for a in tl.axes))


def _same(layer: str, name: str, view: TensorView, addr: int, shape, strides) -> None:
    got_strides = tuple(s * view.itemsize for s in view.strides)
    if view.addr != addr or tuple(view.shape) != tuple(shape) or got_strides != tuple(strides):
        raise LayoutError(
            f"{layer} {name}: vLLM's view (address +{view.addr - addr}, shape "
            f"{tuple(view.shape)}, byte strides {got_strides}) is not where pdbridge's layout "
            f"puts it (shape {tuple(shape)}, byte strides {tuple(strides)})")
