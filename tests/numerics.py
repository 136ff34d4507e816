"""Tolerances that follow from floating-point rounding, not from one machine's luck (issue 8).

The comparisons in this suite put side by side two computations of the same function that differ
only in the order of their floating-point operations: TP=t against TP=1 (the all-reduce adds the
ranks' partial products in another order), a batch against one sequence at a time, a chunked
prefill against a one-shot one, and ours against transformers (a chunked SSD scan where we run the
recurrence token by token). Each operation rounds to eps/2 relative to the magnitude of its
*inputs*, and earlier layers' errors pass through the later ones, so the difference of an element
is a multiple of eps times the magnitude of the tensor it is computed from, not of the element
itself: an element near zero, made from inputs of size 4, carries their absolute error. A relative
tolerance (rtol) is therefore the wrong tool, and a fixed absolute one fits one dtype and one
value range only. We allow `ulps * eps(dtype) * scale`, scale = max |expected| over the tensor
(or over the whole tensor a shard was cut from).

Why the budgets below are safe both ways: a real bug (a wrong shard, B read where C belongs, a
missing all-reduce) moves values by O(scale), i.e. ~1 / eps = 8e6 ulps in fp32; rounding moved
them by at most the figures measured below. And the difference *is* rounding: in float64
(pdbridge.model.precision) the same TP=2 vs TP=1 difference falls from 1.7e-5 to 9e-15, by the
ratio of the two epsilons (5e8), which a bug would not do; the float64 tests hold the same ulps
budget and so check 5e8 times closer.

Set PDBRIDGE_NUMERICS_LOG=FILE to append every comparison's measured ulps to FILE.
"""
from __future__ import annotations

import os

import numpy as np
import torch

# Budgets, in ulps of the tensor's scale. Worst measured over the default and the slow suite
# (PDBRIDGE_NUMERICS_LOG, 2026-12): 70 ulps for TP=2 against TP=1 (zamba2's SSM state in layer 4
# of 5, rounding amplified through five layers; 42 in float64), 17 for a mixed batch against one
# sequence alone, 8 for a P/D-received state against the decode rank's own prefill, 37 for ours
# against transformers (zamba2's layer-4 conv state). 256 leaves 3.5x headroom over the worst
# and stays 2.6e4 times below the smallest bug measured: 6.7e6 ulps (tests/model/test_tp.py).
REORDER_ULPS = 256      # same function, operations reordered (TP sizes, batching, chunking)
HF_ULPS = 256           # ours against transformers (another scan algorithm, other kernels)


def measured_ulps(actual, expected, scale: float | None = None, dtype=None) -> float:
    """max |actual - expected| in units of eps(dtype) * scale; dtype: the precision the values
    were computed in (default: expected's own)."""
    eps = _eps(expected if dtype is None else dtype)
    a, e = _as_float64(actual), _as_float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        raise AssertionError("non-finite values")
    scale = float(np.abs(e).max(initial=0.0)) if scale is None else float(scale)
    diff = float(np.abs(a - e).max(initial=0.0))
    if diff == 0.0:
        return 0.0
    return diff / (eps * scale) if scale > 0 else float("inf")


def assert_close(actual, expected, *, ulps: int, scale: float | None = None, dtype=None,
                 what: str = "") -> None:
    """max |actual - expected| <= ulps * eps(dtype) * scale; scale defaults to max |expected|,
    dtype (the precision the values were computed in) to expected's dtype."""
    got = measured_ulps(actual, expected, scale, dtype)
    log = os.environ.get("PDBRIDGE_NUMERICS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{got:.2f}\t{ulps}\t{os.environ.get('PYTEST_CURRENT_TEST', '?')}\t{what}\n")
    assert got <= ulps, (f"{what or 'values'} differ by {got:.1f} ulps of the tensor's scale "
                         f"(allowed {ulps}; eps = {_eps(expected if dtype is None else dtype):.2e})")


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _eps(x) -> float:
    """eps of a tensor's or array's dtype, or of a dtype."""
    if isinstance(x, torch.dtype):
        return torch.finfo(x).eps
    if isinstance(x, torch.Tensor):
        return torch.finfo(x.dtype).eps
    if isinstance(x, np.ndarray):
        return float(np.finfo(x.dtype).eps)
    return float(np.finfo(x).eps)
