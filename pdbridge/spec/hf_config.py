"""Build a ModelSpec from a Hugging Face `config.json` (a path or a dict).

One builder per `model_type`; each reads only the fields geometry and sharding need.
Field names follow transformers 5.x; older spellings are accepted where they exist.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

from .model_spec import (AttentionSpec, FfnKind, GatedDeltaNetSpec, LayerSpec, Mamba1Spec,
                         Mamba2Spec, ModelSpec, ShortConvSpec)

Config = Mapping[str, Any]


class ConfigError(ValueError):
    """A config.json that cannot be turned into a ModelSpec; the message names the field."""


def load_model_spec(source: str | os.PathLike | Config, *, dtype: str | None = None) -> ModelSpec:
    """`source` is a config dict, a config.json path, or a directory holding config.json."""
    cfg = _read(source) if not isinstance(source, Mapping) else dict(source)
    if cfg.get("model_type") == "qwen3_5" and "text_config" in cfg:
        cfg = {**cfg["text_config"], "model_type": "qwen3_5_text"}
    model_type = cfg.get("model_type")
    builder = BUILDERS.get(model_type)
    if builder is None:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: "
                          + ", ".join(sorted(BUILDERS)))
    layers = tuple(builder(cfg))
    dtype = dtype or _dtype(cfg)
    ssm_dtype = _norm_dtype(cfg.get("mamba_ssm_cache_dtype") or "float32")
    return ModelSpec(model_type=model_type, hidden_size=_int(cfg, "hidden_size"),
                     vocab_size=int(cfg.get("vocab_size", 0)), layers=layers, dtype=dtype,
                     ssm_dtype=ssm_dtype, name=str(cfg.get("_name_or_path", "")), config=cfg)


def _read(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


# ---- field helpers -------------------------------------------------------------------------

def _int(cfg: Config, *names: str, default: int | None = None) -> int:
    for n in names:
        v = cfg.get(n)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"config field {n!r} must be an integer, got {v!r}")
            return v
    if default is not None:
        return default
    raise ConfigError(f"config is missing field {' or '.join(map(repr, names))}")


_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32",
           "float64": "float64"}


def _norm_dtype(v: Any) -> str:
    v = str(v).replace("torch.", "")
    if v not in _DTYPES:
        raise ConfigError(f"unsupported dtype {v!r}; allowed: {', '.join(sorted(set(_DTYPES.values())))}")
    return _DTYPES[v]


def _dtype(cfg: Config) -> str:
    v = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    return _norm_dtype(v)


def _attention(cfg: Config, head_dim_field: str = "head_dim") -> AttentionSpec:
    q = _int(cfg, "num_attention_heads")
    kv = _int(cfg, "num_key_value_heads", default=q)
    hd = cfg.get(head_dim_field) or _int(cfg, "hidden_size") // q
    return AttentionSpec(num_q_heads=q, num_kv_heads=kv, head_dim=int(hd))


def _mamba2_granite(cfg: Config) -> Mamba2Spec:
    """Bamba / GraniteMoeHybrid / FalconH1 field names (`mamba_*`)."""
    h = _int(cfg, "mamba_n_heads")
    p = _int(cfg, "mamba_d_head", default=0) or None
    if p is None or cfg.get("mamba_d_ssm"):
        inter = cfg.get("mamba_d_ssm") or _int(cfg, "mamba_expand") * _int(cfg, "hidden_size")
        p = inter // h
    return Mamba2Spec(num_heads=h, head_dim=p, d_state=_int(cfg, "mamba_d_state"),
                      n_groups=_int(cfg, "mamba_n_groups"), d_conv=_int(cfg, "mamba_d_conv"))


def _layer_kinds(values: list[str], aliases: dict[str, str], field_name: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v not in aliases:
            raise ConfigError(f"{field_name}[{i}] = {v!r}; allowed: {', '.join(sorted(aliases))}")
        out.append(aliases[v])
    return out


def _ffn_for(cfg: Config, moe_field: str) -> FfnKind:
    return FfnKind.MOE if int(cfg.get(moe_field) or 0) > 0 else FfnKind.MLP


# ---- builders -----------------------------------------------------------------------------

_NEMOTRON_KINDS = {"mamba": "M", "linear_attention": "M", "M": "M",
                   "attention": "*", "full_attention": "*", "*": "*",
                   "mlp": "-", "-": "-", "moe": "E", "E": "E"}


def _nemotron_h(cfg: Config) -> list[LayerSpec]:
    if cfg.get("layers_block_type") is not None:
        kinds = _layer_kinds(list(cfg["layers_block_type"]), _NEMOTRON_KINDS, "layers_block_type")
    elif cfg.get("hybrid_override_pattern") is not None:
        kinds = _layer_kinds(list(cfg["hybrid_override_pattern"]), _NEMOTRON_KINDS,
                             "hybrid_override_pattern")
    else:
        raise ConfigError("nemotron_h config needs 'layers_block_type' or 'hybrid_override_pattern'")
    mamba = Mamba2Spec(num_heads=_int(cfg, "mamba_num_heads"), head_dim=_int(cfg, "mamba_head_dim"),
                       d_state=_int(cfg, "ssm_state_size"), n_groups=_int(cfg, "n_groups"),
                       d_conv=_int(cfg, "conv_kernel"))
    attn = _attention(cfg)
    mixers = {"M": (mamba,), "*": (attn,), "-": (), "E": ()}
    ffns = {"M": FfnKind.NONE, "*": FfnKind.NONE, "-": FfnKind.MLP, "E": FfnKind.MOE}
    return [LayerSpec(i, mixers[k], ffns[k]) for i, k in enumerate(kinds)]


def _bamba(cfg: Config) -> list[LayerSpec]:
    n = _int(cfg, "num_hidden_layers")
    attn_idx = set(cfg.get("attn_layer_indices") or [])
    mamba, attn = _mamba2_granite(cfg), _attention(cfg)
    return [LayerSpec(i, (attn,) if i in attn_idx else (mamba,), FfnKind.MLP) for i in range(n)]


_GRANITE_KINDS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*"}


def _granitemoehybrid(cfg: Config) -> list[LayerSpec]:
    n = _int(cfg, "num_hidden_layers")
    types = cfg.get("layer_types") or ["mamba"] * n
    kinds = _layer_kinds(list(types), _GRANITE_KINDS, "layer_types")
    mamba, attn = _mamba2_granite(cfg), _attention(cfg)
    ffn = _ffn_for(cfg, "num_local_experts")
    return [LayerSpec(i, (mamba,) if k == "M" else (attn,), ffn) for i, k in enumerate(kinds)]


def _falcon_h1(cfg: Config) -> list[LayerSpec]:
    mamba, attn = _mamba2_granite(cfg), _attention(cfg)
    return [LayerSpec(i, (attn, mamba), FfnKind.MLP) for i in range(_int(cfg, "num_hidden_layers"))]


def _jamba(cfg: Config) -> list[LayerSpec]:
    d = _int(cfg, "hidden_size")
    mamba = Mamba1Spec(intermediate=_int(cfg, "mamba_expand") * d, d_state=_int(cfg, "mamba_d_state"),
                       d_conv=_int(cfg, "mamba_d_conv"),
                       dt_rank=_int(cfg, "mamba_dt_rank", default=-(-d // 16)))
    attn = _attention(cfg)
    ap, ao = _int(cfg, "attn_layer_period"), _int(cfg, "attn_layer_offset")
    ep, eo = _int(cfg, "expert_layer_period"), _int(cfg, "expert_layer_offset")
    experts = _int(cfg, "num_experts", default=1)
    return [LayerSpec(i, (attn,) if i % ap == ao else (mamba,),
                      FfnKind.MOE if experts > 1 and i % ep == eo else FfnKind.MLP)
            for i in range(_int(cfg, "num_hidden_layers"))]


_ZAMBA_KINDS = {"mamba": "M", "linear_attention": "M", "hybrid": "H"}


def _zamba2(cfg: Config) -> list[LayerSpec]:
    types = cfg.get("layers_block_type")
    if types is None:
        raise ConfigError("zamba2 config is missing field 'layers_block_type'")
    kinds = _layer_kinds(list(types), _ZAMBA_KINDS, "layers_block_type")
    d = _int(cfg, "hidden_size")
    h = _int(cfg, "n_mamba_heads")
    inter = _int(cfg, "mamba_expand") * d
    mamba = Mamba2Spec(num_heads=h, head_dim=inter // h, d_state=_int(cfg, "mamba_d_state"),
                       n_groups=_int(cfg, "mamba_ngroups"), d_conv=_int(cfg, "mamba_d_conv"))
    q = _int(cfg, "num_attention_heads")
    attn_hidden = _int(cfg, "attention_hidden_size", default=2 * d)
    attn = AttentionSpec(num_q_heads=q, num_kv_heads=_int(cfg, "num_key_value_heads", default=q),
                         head_dim=_int(cfg, "attention_head_dim", default=attn_hidden // q))
    # A hybrid layer runs the shared transformer block (attention + MLP) and then its Mamba2.
    return [LayerSpec(i, (attn, mamba) if k == "H" else (mamba,),
                      FfnKind.MLP if k == "H" else FfnKind.NONE) for i, k in enumerate(kinds)]


_QWEN_KINDS = {"linear_attention": "G", "full_attention": "*"}


def _qwen_gdn(cfg: Config) -> list[LayerSpec]:
    n = _int(cfg, "num_hidden_layers")
    types = cfg.get("layer_types")
    if types is None:
        interval = _int(cfg, "full_attention_interval", default=4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    kinds = _layer_kinds(list(types), _QWEN_KINDS, "layer_types")
    gdn = GatedDeltaNetSpec(num_k_heads=_int(cfg, "linear_num_key_heads"),
                            num_v_heads=_int(cfg, "linear_num_value_heads"),
                            head_k_dim=_int(cfg, "linear_key_head_dim"),
                            head_v_dim=_int(cfg, "linear_value_head_dim"),
                            d_conv=_int(cfg, "linear_conv_kernel_dim"))
    attn = _attention(cfg)
    # Qwen3-Next: MoE on every `decoder_sparse_step`-th layer except `mlp_only_layers`.
    sparse = _ffn_for(cfg, "num_experts") is FfnKind.MOE
    step = _int(cfg, "decoder_sparse_step", default=1)
    dense = set(cfg.get("mlp_only_layers") or [])
    ffn = [FfnKind.MOE if sparse and i not in dense and (i + 1) % step == 0 else FfnKind.MLP
           for i in range(len(kinds))]
    return [LayerSpec(i, (gdn,) if k == "G" else (attn,), ffn[i]) for i, k in enumerate(kinds)]


_LFM_KINDS = {"conv": "C", "full_attention": "*", "attention": "*"}


def _lfm2(cfg: Config) -> list[LayerSpec]:
    n = _int(cfg, "num_hidden_layers")
    types = cfg.get("layer_types")
    if types is None:
        full = set(cfg.get("full_attn_idxs") or [])
        types = ["full_attention" if i in full else "conv" for i in range(n)]
    kinds = _layer_kinds(list(types), _LFM_KINDS, "layer_types")
    conv = ShortConvSpec(hidden=_int(cfg, "hidden_size"), l_cache=_int(cfg, "conv_L_cache"))
    attn = _attention(cfg)
    ffn = _ffn_for(cfg, "num_experts")
    return [LayerSpec(i, (conv,) if k == "C" else (attn,), ffn) for i, k in enumerate(kinds)]


def _plain_attention(cfg: Config) -> list[LayerSpec]:
    attn = _attention(cfg)
    return [LayerSpec(i, (attn,), FfnKind.MLP) for i in range(_int(cfg, "num_hidden_layers"))]


BUILDERS: dict[str, Callable[[Config], list[LayerSpec]]] = {
    "nemotron_h": _nemotron_h,
    "bamba": _bamba,
    "granitemoehybrid": _granitemoehybrid,
    "falcon_h1": _falcon_h1,
    "jamba": _jamba,
    "zamba2": _zamba2,
    "qwen3_next": _qwen_gdn,
    "qwen3_5_text": _qwen_gdn,
    "qwen3_5": _qwen_gdn,       # reached only with a text_config, unwrapped above
    "lfm2": _lfm2,
    "llama": _plain_attention,
    "mistral": _plain_attention,
    "qwen2": _plain_attention,
    "qwen3": _plain_attention,
}
