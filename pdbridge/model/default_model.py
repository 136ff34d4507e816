"""The embedded default model: a tiny deterministic NemotronH-style hybrid written from our own
modules (no download, no transformers), with a byte-level tokenizer (text <-> UTF-8 bytes).

Geometry: layers "M*M-M*" (Mamba2, attention, MLP), 12 Mamba2 heads in 2 B/C groups, 6 query
and 2 KV heads: every TP size 1-4 is valid, including the uneven (3, 2) and (2, 3) pairs.
Its weights are random; the lm_head rows of non-printable bytes are zeroed so that greedy
text is printable ASCII (cheap, and it keeps demo output readable).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

VERSION = 2                 # 2: tokenizer.json + tokenizer_config.json (chat template)
PATTERN = "M*M-M*"
CONFIG = {
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
    "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": len(PATTERN),
    "layers_block_type": [{"M": "mamba", "*": "attention", "-": "mlp"}[c] for c in PATTERN],
    "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "mlp_hidden_act": "relu2", "mlp_bias": False,
    "attention_bias": False, "mamba_num_heads": 12, "mamba_head_dim": 8,
    "ssm_state_size": 16, "n_groups": 2, "conv_kernel": 4, "chunk_size": 64,
    "mamba_hidden_act": "silu", "use_conv_bias": True, "use_bias": False,
    "time_step_min": 0.001, "time_step_max": 0.1, "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None, "dtype": "float32", "n_routed_experts": 0,
}
SEED = 1234
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
PRINTABLE = [10] + list(range(32, 127))


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def model_dir(path: str | os.PathLike | None = None) -> Path:
    """The default model's directory (config.json + model.safetensors), written if missing."""
    root = Path(path) if path else Path(os.environ.get("PDBRIDGE_CACHE",
                                                       Path.home() / ".cache" / "pdbridge"))
    out = root if path else root / f"default_model_v{VERSION}"
    if all((out / f).exists() for f in FILES):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".default_model."))
    write_checkpoint(tmp)
    try:
        os.replace(tmp, out) if not out.exists() else _move_files(tmp, out)
    except OSError:             # another process won the race: its files are identical
        pass
    return out


default_model_dir = model_dir


def _move_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        os.replace(f, dst / f.name)
    src.rmdir()


def write_checkpoint(path: str | os.PathLike) -> None:
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG, indent=1))
    tensors = {k: v.contiguous() for k, v in to_hf_names(initial_weights()).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(path)


def write_tokenizer(path: str | os.PathLike) -> None:
    """The byte-level tokenizer (ids are UTF-8 bytes, as `encode`) and a plain chat template."""
    from pdbridge.serve.tokenizer import SIMPLE_CHAT_TEMPLATE, byte_tokenizer_json
    path = Path(path)
    (path / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": SIMPLE_CHAT_TEMPLATE},
        indent=1), encoding="utf-8")


def initial_weights() -> dict[str, torch.Tensor]:
    """Canonical weights from our own modules' initialisers under a fixed seed."""
    from pdbridge.spec import load_model_spec
    from .arch import arch_config
    from .comm import SingleComm
    from .model import HybridModel
    spec = load_model_spec(CONFIG)
    torch.manual_seed(SEED)
    # Optional parameters present: only the conv bias (use_conv_bias), as NemotronH has.
    names = {f"layers.{l.index}.mamba.conv_bias" for l in spec.layers if l.mixers
             and l.mixers[0].kind.value == "mamba2"}
    model = HybridModel(spec, arch_config(spec), SingleComm(), names)
    with torch.no_grad():
        for block in model.layers:
            if block.mamba is not None:
                _init_mamba(block.mamba)
        keep = torch.zeros(256, 1)
        keep[PRINTABLE] = 1.0
        model.lm_head.weight.mul_(keep * 4.0)     # sharper, printable-only distribution
        model.embed.weight.normal_(0.0, 1.0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _init_mamba(m) -> None:
    h = m.A_log.numel()
    m.A_log.copy_(torch.log(torch.empty(h).uniform_(1.0, 16.0)))
    dt = torch.exp(torch.rand(h) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))           # inverse softplus
    m.D.fill_(1.0)
    torch.nn.init.uniform_(m.conv_weight, -0.5, 0.5)
    m.conv_bias.uniform_(-0.1, 0.1)


def to_hf_names(canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical -> NemotronH checkpoint names (the inverse of hf_names for this model)."""
    out = {}
    for k, v in canonical.items():
        if k == "embed.weight":
            out["backbone.embeddings.weight"] = v
        elif k == "final_norm.weight":
            out["backbone.norm_f.weight"] = v
        elif k == "lm_head.weight":
            out[k] = v
        else:
            _, i, rest = k.split(".", 2)
            if rest in ("mixer_norm.weight", "ffn_norm.weight"):
                out[f"backbone.layers.{i}.norm.weight"] = v
                continue
            rest = rest.split(".", 1)[1]
            if rest == "conv_weight":
                rest, v = "conv1d.weight", v[:, None, :]
            elif rest == "conv_bias":
                rest = "conv1d.bias"
            out[f"backbone.layers.{i}.mixer.{rest}"] = v
    return out
