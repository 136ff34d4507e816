"""Checks a command runs before it starts any engine: what would otherwise fail inside a worker
process, after start-up, as one traceback per rank (issue 12, "bad input before anything
starts"). Each returns "" or one line naming the flag and what is wrong."""
from __future__ import annotations


def check_device(device: str) -> str:
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        return (f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                f"use --device cpu")
    return ""


def check_model(model_dir: str | None, tp_flags: list[tuple[str, int]], cache) -> str:
    """config.json readable and supported, every TP size possible for its heads, every
    checkpoint tensor of the shape the config implies and finite. `tp_flags`: (flag, size)."""
    from pdbridge.model.checkpoint_check import check_checkpoint
    from pdbridge.model.default_model import model_dir as default_model_dir
    from pdbridge.model.hf_names import WeightError
    from pdbridge.spec import ConfigError, EngineLayout, LayoutError, resolve_model
    model = model_dir or str(default_model_dir())
    try:
        spec = resolve_model(model)
    except ValueError as e:                 # ConfigError, and config.json that is not JSON
        return f"--model {model}: {_first_line(e)}"
    for flag, tp in tp_flags:
        try:
            EngineLayout(spec, tp, cache)
        except LayoutError as e:
            return f"{flag} {tp}: {_first_line(e)}"
    try:
        check_checkpoint(model, spec)
    except (WeightError, FileNotFoundError) as e:
        return f"--model {model}: {_first_line(e)}"
    return ""


def _first_line(e: BaseException) -> str:
    msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)   # KeyError quotes str()
    return msg.splitlines()[0] if msg else type(e).__name__
