"""Tensor-parallel communicators: what a model needs from its TP group (rank, size, a sum)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SingleComm:
    """TP = 1: the all-reduce of one rank is the identity."""
    rank: int = 0
    size: int = 1

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class TorchDistComm:
    """The default torch.distributed process group (gloo on CPU, nccl on GPU)."""

    def __init__(self, group=None):
        import torch.distributed as dist
        self._dist, self._group = dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, group=self._group)
        return tensor
