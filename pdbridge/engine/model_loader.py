"""The engine's default way to get a rank's model shard: pdbridge.model from a HF directory,
or the embedded default tiny hybrid model when no directory is given."""
from __future__ import annotations

import torch

from pdbridge.spec import ModelSpec, load_model_spec

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "float64": torch.float64}


def default_model_dir() -> str:
    """A directory holding the embedded default model (written on first use)."""
    from pdbridge.model import default_model
    return str(default_model.model_dir())


def load_model_shard(model_dir: str | None, comm, device: torch.device, dtype: str | None
                     ) -> tuple[ModelSpec, torch.nn.Module]:
    """(spec, model) for rank comm.rank of comm.size; `dtype` overrides the config's."""
    from pdbridge.model import load_model
    model_dir = model_dir or default_model_dir()
    spec = load_model_spec(model_dir, dtype=dtype)
    model = load_model(model_dir, comm, TORCH_DTYPES[spec.dtype])
    return spec, model.to(device)


def eos_token_ids(spec: ModelSpec) -> tuple[int, ...]:
    """The config's eos_token_id (an int or a list), or none."""
    eos = spec.config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
