"""Checkpoint checks before any rank loads: every tensor's shape against the spec, and NaN/Inf.

The canonical (TP = 1) shape of every parameter follows from the config alone, and every TP
shard is cut from it (tp.py), so checking the full shapes once checks every TP size: a q_proj
with 99 rows where the config implies 96 would otherwise load at TP >= 2 with its extra rows
silently dropped (issue 12). The expected shapes come from the model itself, built on the meta
device (no memory, no arithmetic), so they cannot drift from what loading needs.
"""
from __future__ import annotations

import glob
import os

import torch

from pdbridge.spec import ModelSpec

from .arch import arch_config
from .comm import SingleComm
from .hf_names import WeightError, canonical_weights


def check_shapes(spec: ModelSpec, tensors_by_hf_name: dict[str, torch.Tensor]) -> None:
    """Raise WeightError naming the first tensor whose shape the config does not imply, or the
    first parameter the checkpoint lacks. Works on meta tensors (shapes only)."""
    from .model import HybridModel
    arch = arch_config(spec)
    origin = {id(t): name for name, t in tensors_by_hf_name.items()}
    full = canonical_weights(spec, arch, tensors_by_hf_name)
    with torch.device("meta"):
        want = HybridModel(spec, arch, SingleComm(), set(full)).state_dict()
    for name, t in full.items():
        if name in want and tuple(t.shape) != tuple(want[name].shape):
            hf = origin.get(id(t))
            where = f" (checkpoint tensor {hf})" if hf and hf != name else ""
            raise WeightError(f"{name}{where}: shape {tuple(t.shape)}, but config.json implies "
                              f"{tuple(want[name].shape)}")
    missing = sorted(want.keys() - full.keys())
    if missing:
        raise WeightError(f"checkpoint lacks {missing[0]}" +
                          (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def check_checkpoint(model_dir: str | os.PathLike, spec: ModelSpec) -> None:
    """Shapes (from the safetensors headers) and finiteness (one tensor in memory at a time)
    of a checkpoint directory; raises WeightError (or FileNotFoundError) naming the problem."""
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(os.fspath(model_dir), "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    shapes: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                shapes[name] = torch.empty(s.get_shape(), dtype=_DTYPES.get(s.get_dtype(), torch.float32),
                                           device="meta")
    check_shapes(spec, shapes)
    for path in files:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise WeightError(f"{name}: {bad} NaN/Inf values in {os.path.basename(path)}")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}
