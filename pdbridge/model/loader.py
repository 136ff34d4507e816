"""Build a HybridModel from HF weights: map names, shard for this rank, load."""
from __future__ import annotations

import glob
import os

import torch

from pdbridge.spec import ModelSpec, load_model_spec

from .arch import arch_config
from .checkpoint_check import check_shapes
from .comm import SingleComm
from .hf_names import canonical_weights
from .model import HybridModel
from .tp import shard_weights
from .zamba2_weights import shard_shared_weights


def build_model(spec: ModelSpec, tensors_by_hf_name: dict[str, torch.Tensor], comm=None,
                dtype: torch.dtype = torch.float32) -> HybridModel:
    comm = comm or SingleComm()
    arch = arch_config(spec)
    check_shapes(spec, tensors_by_hf_name)       # at TP = 1: so that no shard cuts a bad tensor
    full = canonical_weights(spec, arch, tensors_by_hf_name)
    local = shard_weights(spec, full, comm.rank, comm.size)
    if arch.shared is not None and comm.size > 1:      # Zamba2's shared blocks and adapters
        local.update(shard_shared_weights(spec, arch.shared, full, comm.rank, comm.size))
    model = HybridModel(spec, arch, comm, set(full))
    missing, unexpected = model.load_state_dict(local, strict=False)
    if missing or unexpected:
        raise KeyError(f"{spec.model_type}: weights missing {sorted(missing)[:8]}, "
                       f"unexpected {sorted(unexpected)[:8]}")
    return model.to(dtype).eval()


def read_safetensors(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(os.fspath(model_dir), "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def load_model(model_dir: str | os.PathLike, comm=None, dtype: torch.dtype = torch.float32
               ) -> HybridModel:
    spec = load_model_spec(model_dir)
    return build_model(spec, read_safetensors(model_dir), comm, dtype)
