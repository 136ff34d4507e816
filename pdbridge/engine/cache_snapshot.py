"""What one rank's caches hold for one request, as plain arrays: how tests compare the state a
decode rank received with the state it computes itself (issue: disaggregation fidelity)."""
from __future__ import annotations

from typing import ClassVar

import msgspec
import numpy as np
import torch

from .messages import WorkerCall


class Snapshot(WorkerCall):
    """Every rank returns its cache contents for a request's blocks and first num_tokens."""
    handler: ClassVar[str] = "snapshot"
    collect: ClassVar[bool] = True
    num_tokens: int
    attn_blocks: list[int]
    state_block: int


class TensorData(msgspec.Struct):
    shape: list[int]
    data: bytes                 # float64, C order


class RankSnapshot(msgspec.Struct):
    rank: int
    tensors: dict[str, TensorData]      # "L3.conv", "L1.kv", ...

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.frombuffer(t.data, np.float64).reshape(t.shape) for k, t in self.tensors.items()}


def snapshot(caches, call: Snapshot) -> RankSnapshot:
    kblock, row = caches.layout.token_slots(call.attn_blocks, call.num_tokens)
    kb, kt = torch.from_numpy(kblock), torch.from_numpy(row)
    out = {}
    for tl in caches.rank_layout.tensors:
        view = caches.view(*tl.key)
        if tl.tensor.paged:             # (..., kernel blocks, heads, token, hd) -> (..., n, heads, hd)
            data = view[..., kb, :, kt, :] if view.dim() == 5 else view[kb, :, kt, :]
        else:
            data = view[call.state_block]
        arr = data.detach().to("cpu", torch.float64).contiguous().numpy()
        out[f"L{tl.key[0]}.{tl.key[1]}"] = TensorData(list(arr.shape), arr.tobytes())
    return RankSnapshot(caches.rank, out)
