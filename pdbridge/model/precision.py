"""The precision that norms, softmax, routing and the SSM recurrence compute in.

Half types are widened to fp32, as transformers does; float64 stays float64. A float64 model is
then float64 throughout, which makes it the rounding-free reference the tests compare TP sizes
with (tests/numerics.py): in fp32, TP=2 and TP=1 differ by rounding (the all-reduce sums partial
products in another order), in float64 the same difference falls by ~1e9, a real bug does not.
"""
from __future__ import annotations

import torch


def upcast(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or in float64 when it already is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
