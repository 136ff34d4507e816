"""Feed-forward: act(up) (NemotronH relu2) or act(gate) * up (SwiGLU); column-parallel in,
row-parallel out (intermediate channels split across TP ranks, outputs summed)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


_ACTS = {"relu2": relu2, "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    if name not in _ACTS:
        raise NotImplementedError(f"activation {name!r}; supported: {', '.join(sorted(_ACTS))}")
    return _ACTS[name]


class MLP(nn.Module):
    def __init__(self, hidden: int, inter_local: int, act: str, gated: bool, bias: bool, comm,
                 gate_multiplier: float = 1.0, down_multiplier: float = 1.0):
        super().__init__()
        self.act, self.comm = activation(act), comm
        self.gate_multiplier, self.down_multiplier = gate_multiplier, down_multiplier
        self.up_proj = nn.Linear(hidden, inter_local, bias=bias)
        self.gate_proj = nn.Linear(hidden, inter_local, bias=bias) if gated else None
        self.down_proj = nn.Linear(inter_local, hidden, bias=False)
        self.down_bias = nn.Parameter(torch.zeros(hidden)) if bias else None

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output, before the sum over ranks and the bias."""
        if self.gate_proj is None:
            y = self.act(self.up_proj(x))
        else:
            y = self.act(self.gate_proj(x) * self.gate_multiplier) * self.up_proj(x)
        return self.down_proj(y)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.down_bias is not None:
            y = y + self.down_bias
        return y * self.down_multiplier if self.down_multiplier != 1.0 else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.partial(x)
        self.comm.all_reduce_(y)
        return self.finish(y)
