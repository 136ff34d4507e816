"""DenseCaches: plain tensors with the canonical cache shapes of the model/engine contract.

The reference for the engine's PagedCaches (strided views into EngineLayout regions):
both give `kv(L)`, `conv(L)`, `ssm(L)` with the same shapes and meaning.
"""
from __future__ import annotations

import torch

from pdbridge.spec import (AttentionSpec, GatedDeltaNetSpec, Mamba1Spec, Mamba2Spec, ModelSpec,
                           ShortConvSpec)

from .gdn_shard import gdn_shard
from .shard import attention_shard, mamba2_shard
from .mamba1 import mamba1_channels
from .short_conv import short_conv_channels

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


def torch_dtype(d) -> torch.dtype:
    return d if isinstance(d, torch.dtype) else _DTYPES[d]


class DenseCaches:
    """Per layer: attention KV (num_kernel_blocks, kv_heads_local, kernel_block_tokens, head_dim)
    each for k and v; Mamba2 conv (num_slots, conv_channels_local, d_conv - 1), [x | B | C] local,
    oldest token first; Mamba2 SSM (num_slots, heads_local, head_dim, d_state)."""

    def __init__(self, spec: ModelSpec, tp_rank: int = 0, tp_size: int = 1, num_blocks: int = 16,
                 block_tokens: int = 16, kernel_block_tokens: int | None = None,
                 dtype=torch.float32, ssm_dtype=torch.float32):
        kbt = kernel_block_tokens or block_tokens
        if block_tokens % kbt:
            raise ValueError(f"kernel_block_tokens={kbt} must divide block_tokens={block_tokens}")
        self.block_tokens, self.kernel_block_tokens = block_tokens, kbt
        self.num_blocks = num_blocks
        dtype, ssm_dtype = torch_dtype(dtype), torch_dtype(ssm_dtype)
        kernel_blocks = num_blocks * (block_tokens // kbt)
        self._kv, self._conv, self._ssm = {}, {}, {}
        for layer in spec.layers:
            for m in layer.mixers:
                if isinstance(m, AttentionSpec):
                    sh = attention_shard(m, tp_size, tp_rank)
                    shape = (kernel_blocks, sh.num_kv, kbt, m.head_dim)
                    self._kv[layer.index] = (torch.zeros(shape, dtype=dtype),
                                             torch.zeros(shape, dtype=dtype))
                elif isinstance(m, Mamba2Spec):
                    sh = mamba2_shard(m, tp_size, tp_rank)
                    self._conv[layer.index] = torch.zeros(num_blocks, sh.conv_dim, m.d_conv - 1,
                                                          dtype=dtype)
                    self._ssm[layer.index] = torch.zeros(num_blocks, sh.num_heads, m.head_dim,
                                                         m.d_state, dtype=ssm_dtype)
                elif isinstance(m, GatedDeltaNetSpec):     # conv [q|k|v]; recurrent (Hv, dk, dv)
                    sh = gdn_shard(m, tp_size, tp_rank)
                    self._conv[layer.index] = torch.zeros(num_blocks, sh.conv_dim, m.d_conv - 1,
                                                          dtype=dtype)
                    self._ssm[layer.index] = torch.zeros(num_blocks, sh.num_v, m.head_k_dim,
                                                         m.head_v_dim, dtype=ssm_dtype)
                elif isinstance(m, Mamba1Spec):            # conv x (I_l, K-1); SSM (I_l, N)
                    c0, c1 = mamba1_channels(m, tp_size, tp_rank)
                    self._conv[layer.index] = torch.zeros(num_blocks, c1 - c0, m.d_conv - 1,
                                                          dtype=dtype)
                    self._ssm[layer.index] = torch.zeros(num_blocks, c1 - c0, m.d_state,
                                                         dtype=ssm_dtype)
                elif isinstance(m, ShortConvSpec):         # conv state of Bx, (C_local, L-1)
                    c0, c1 = short_conv_channels(m, tp_size, tp_rank)
                    self._conv[layer.index] = torch.zeros(num_blocks, c1 - c0, m.l_cache - 1,
                                                          dtype=dtype)
                else:
                    raise NotImplementedError(f"DenseCaches: mixer {m.kind.value} is not supported")

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._kv[layer]

    def conv(self, layer: int) -> torch.Tensor:
        return self._conv[layer]

    def ssm(self, layer: int) -> torch.Tensor:
        return self._ssm[layer]
