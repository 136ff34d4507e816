"""PagedCaches views write exactly the bytes EngineLayout.offset names, for every layout."""
import itertools

import pytest
import torch

from pdbridge.engine.paged_caches import PagedCaches
from pdbridge.spec import CacheConfig, EngineLayout

from engine_zoo import zoo_spec

torch.set_num_threads(1)

# Contract dim names of each accessor's view (notes/model_engine_contract.md).
KV_DIMS = ("block", "heads", "token", "head_dim")
CONV_DIMS = ("block", "channels", "state_len")
SSM_DIMS = {"mamba2": ("block", "heads", "head_dim", "d_state"),
            "mamba1": ("block", "channels", "d_state"),
            "gdn": ("block", "heads", "head_k_dim", "head_v_dim")}


def accessor_views(caches, spec):
    """(tensor name, inner kv index or None, dim names, view) for every cache the model sees."""
    out = []
    for layer in spec.layers:
        kinds = {m.kind.value for m in layer.mixers}
        L = layer.index
        if "attention" in kinds:
            k, v = caches.kv(L)
            packed = (L, "kv") in {t.key for t in caches.rank_layout.tensors}
            out += [("kv" if packed else "k", 0 if packed else None, L, KV_DIMS, k),
                    ("kv" if packed else "v", 1 if packed else None, L, KV_DIMS, v)]
        if kinds & {"mamba2", "mamba1", "gated_delta_net", "short_conv"}:
            out.append(("conv", None, L, CONV_DIMS, caches.conv(L)))
        if "mamba2" in kinds or "mamba1" in kinds:
            out.append(("ssm", None, L, SSM_DIMS["mamba2" if "mamba2" in kinds else "mamba1"],
                        caches.ssm(L)))
        if "gated_delta_net" in kinds:
            out.append(("recurrent", None, L, SSM_DIMS["gdn"], caches.ssm(L)))
    return out


def offset_of(layout, rank, name, kv, layer, dims, idx):
    """Translate a view index into EngineLayout.offset's (block, segment, unit, element) terms."""
    tl = layout.rank(rank).tensor(layer, name)
    pos = dict(zip(dims, idx))
    sharded = tl.tensor.sharded_dim
    c = pos.pop(sharded)
    for s, seg in enumerate(tl.tensor.segments):
        u0, u1 = tl.seg_units[s]
        lo = tl.seg_offsets[s]
        if lo <= c < lo + (u1 - u0) * seg.unit_size:
            segment, unit, element = seg.name, u0 + (c - lo) // seg.unit_size, (c - lo) % seg.unit_size
            break
    kb = pos.pop("block")
    if "token" in pos:
        m, kbt = layout.kernel_blocks_per_block, layout.kernel_block_tokens
        block, token = kb // m, (kb % m) * kbt + pos.pop("token")
    else:
        block, token = kb, 0
    if kv is not None:
        pos["kv"] = kv
    return layout.offset(rank, layer, name, block, segment, unit, element, token, pos)


CONFIGS = [dict(conv_layout=c, attn_layout=a, kv_packed=p, kernel_block_tokens=k)
           for c, a, p, k in itertools.product(["SD", "DS"], ["heads_outer", "tokens_outer",
                                                "heads_across_blocks"], [True, False], [2, 4])]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("tp,rank,n_groups,dtype", [(2, 1, 1, "float32"), (1, 0, 2, "bfloat16")])
def test_views_write_the_bytes_offsets_name(cfg, tp, rank, n_groups, dtype):
    spec = zoo_spec(dtype=dtype, n_groups=n_groups)
    layout = EngineLayout(spec, tp, CacheConfig(num_blocks=3, block_tokens=4, **cfg))
    caches = PagedCaches(layout, rank)
    views = accessor_views(caches, spec)
    gen = torch.Generator().manual_seed(0)
    written = []
    for *_, view in views:
        vals = torch.randn(view.shape, generator=gen).to(view.dtype)
        view.copy_(vals)
        written.append(vals)
    for (name, kv, layer, dims, view), vals in zip(views, written):
        assert view.ndim == len(dims)
        assert torch.equal(view, vals), f"{name} L{layer}: overwritten by another view"
        for flat in torch.randint(0, view.numel(), (40,), generator=gen).tolist():
            idx = torch.unravel_index(torch.tensor(flat), view.shape)
            idx = tuple(int(i) for i in idx)
            region, off = offset_of(layout, rank, name, kv, layer, dims, idx)
            buf = caches.region_buffers[region]
            got = buf[off:off + view.element_size()].view(view.dtype)[0]
            assert got.item() == view[idx].item(), (name, layer, idx)


def test_regions_are_the_layout_regions():
    layout = EngineLayout(zoo_spec(), 2, CacheConfig(num_blocks=3, page_padding=True))
    caches = PagedCaches(layout, 0)
    assert [b.numel() for b in caches.region_buffers] == [r.nbytes for r in layout.rank(0).regions]
    k, v = caches.kv(1)
    assert k.shape == (3 * layout.kernel_blocks_per_block, 1, layout.kernel_block_tokens, 3)
    assert caches.conv(0).shape == (3, 4 + 3 + 3, 3)    # x: 2 heads * 2, B and C: 1 group * 3
    assert caches.ssm(0).shape == (3, 2, 2, 3)
