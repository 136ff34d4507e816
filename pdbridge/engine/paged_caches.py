"""PagedCaches: one rank's cache memory, allocated from EngineLayout, seen through the
contract's canonical views (notes/model_engine_contract.md).

Memory is one uint8 buffer per region of `EngineLayout.rank(r).regions` (`region_buffers`, what a
transport registers). Every tensor is an `as_strided` view built from its TensorLayout's axes,
so whatever the layout (conv SD/DS, attention heads/tokens outer or heads across blocks, packed
or separate K/V, kernel blocks) a write through a view lands exactly where `EngineLayout.offset`
says, and the planner's byte offsets are the bytes the model wrote.
"""
from __future__ import annotations

import torch

from pdbridge.spec import BLOCK, TOKEN, EngineLayout, TensorLayout

from .model_loader import TORCH_DTYPES

# Canonical dim order of the views the model sees; other tensors keep their declared order.
_CANONICAL = {
    "kv": (BLOCK, "heads", TOKEN, "head_dim"),        # per K and V: (kernel blocks, heads, token, hd)
    "k": (BLOCK, "heads", TOKEN, "head_dim"),
    "v": (BLOCK, "heads", TOKEN, "head_dim"),
    "conv": (BLOCK, "channels", "state_len"),         # (slots, channels_local, d_conv - 1)
}


def tensor_view(buffer: torch.Tensor, tl: TensorLayout) -> torch.Tensor:
    """The tensor `tl` as a view of its region's bytes, dims in tl.tensor.dims order."""
    dtype = TORCH_DTYPES[tl.tensor.dtype]
    for a in tl.axes:
        if a.stride % tl.itemsize:
            raise ValueError(f"{tl.tensor.name} axis {a.name}: stride {a.stride} bytes is not a "
                             f"multiple of the {tl.itemsize}-byte element")
    if tl.base % tl.itemsize or buffer.numel() % tl.itemsize:
        raise ValueError(f"{tl.tensor.name}: base {tl.base} not aligned to {tl.itemsize} bytes")
    typed = buffer.view(dtype)
    return torch.as_strided(typed, [a.extent for a in tl.axes],
                            [a.stride // tl.itemsize for a in tl.axes], tl.base // tl.itemsize)


def canonical_view(buffer: torch.Tensor, tl: TensorLayout) -> torch.Tensor:
    """Permuted into the contract's order; a packed KV tensor keeps its `kv` dim first."""
    names = [d.name for d in tl.tensor.dims]
    order = _CANONICAL.get(tl.tensor.name, (BLOCK, *[n for n in names if n != BLOCK]))
    if "kv" in names:
        order = ("kv", *order)
    return tensor_view(buffer, tl).permute([names.index(n) for n in order])


class PagedCaches:
    """The caches of rank `rank` of an engine; the accessors DenseCaches offers."""

    def __init__(self, layout: EngineLayout, rank: int, device: str | torch.device = "cpu"):
        self.layout, self.rank = layout, rank
        self.rank_layout = layout.rank(rank)
        self.device = torch.device(device)
        self.block_tokens = layout.block_tokens
        self.kernel_block_tokens = layout.kernel_block_tokens
        self.num_blocks = layout.num_blocks
        self.region_buffers = [torch.zeros(r.nbytes, dtype=torch.uint8, device=self.device)
                               for r in self.rank_layout.regions]
        self._views = {tl.key: canonical_view(self.region_buffers[tl.region], tl)
                       for tl in self.rank_layout.tensors}

    def view(self, layer: int, name: str) -> torch.Tensor:
        try:
            return self._views[(layer, name)]
        except KeyError:
            raise KeyError(f"layer {layer} has no {name!r} cache; it has "
                           f"{sorted(n for l, n in self._views if l == layer)}") from None

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each (num_kernel_blocks, kv_heads_local, kernel_block_tokens, head_dim)."""
        if (layer, "kv") in self._views:
            packed = self._views[(layer, "kv")]
            return packed[0], packed[1]
        return self.view(layer, "k"), self.view(layer, "v")

    def conv(self, layer: int) -> torch.Tensor:
        """(num_slots, conv_channels_local, state_len), oldest token first."""
        return self.view(layer, "conv")

    def ssm(self, layer: int) -> torch.Tensor:
        """Mamba2 (slots, heads_local, head_dim, d_state); Mamba1 (slots, channels_local,
        d_state); a gated delta net's recurrent state (slots, heads_local, dk, dv)."""
        if (layer, "ssm") in self._views:
            return self._views[(layer, "ssm")]
        return self.view(layer, "recurrent")

    def recurrent(self, layer: int) -> torch.Tensor:
        return self.view(layer, "recurrent")

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.region_buffers)
