"""Hugging Face parameter names -> pdbridge's canonical (unsharded) parameter names.

Canonical names are the HybridModel's state_dict keys at TP = 1:
  embed.weight, final_norm.weight, lm_head.weight,
  layers.{i}.mixer_norm.weight, layers.{i}.ffn_norm.weight,
  layers.{i}.attn.{q,k,v,o}_proj.weight, layers.{i}.mamba.{in_proj.weight, conv_weight,
  conv_bias, dt_bias, A_log, D, norm.weight, out_proj.weight}, layers.{i}.ffn.{up,gate,down}_proj
  .weight, MoE: layers.{i}.ffn.{router_weight, router_bias, experts_up, experts_gate,
  experts_down, shared.*}; Zamba2's shared blocks and adapters: see zamba2_weights.py; Qwen's
  gated delta nets (layers.{i}.gdn.*): see qwen_weights.py.
Both the checkpoint spelling (`backbone.*`, per-expert tensors) and the in-memory spelling of
transformers 5.x (`model.*`, stacked experts) are accepted.
"""
from __future__ import annotations

import re

import torch

from pdbridge.spec import FfnKind, MixerKind, ModelSpec

from .arch import ArchConfig
from .jamba_weights import jamba_names
from .lfm2_weights import lfm2_names
from .qwen_weights import qwen_names
from .weight_error import WeightError  # noqa: F401  (the callers' name for it)
from .zamba2_weights import zamba2_names

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^experts\.(\d+)\.(up|down|gate)_proj\.weight$")
_IGNORED = ("mtp.", "visual.")          # Qwen: multi-token prediction, vision tower
# A renamer may place a tensor outside its own layer (Zamba2's shared blocks and adapters):
# such names come back already canonical.
_CANONICAL = ("layers.", "shared.")


def canonical_weights(spec: ModelSpec, arch: ArchConfig, hf: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    rename = _RENAMERS[spec.model_type]
    for name, t in hf.items():
        base = _strip(name)
        if base.startswith(_IGNORED):
            continue
        m = _LAYER.match(base)
        if m is None:
            out[_top_level(base, name)] = t
            continue
        i, rest = int(m.group(1)), m.group(2)
        for sub, tensor in rename(spec, i, rest, t, experts):
            out[sub if sub.startswith(_CANONICAL) else f"layers.{i}.{_fixup(sub)}"] = tensor
    for (i, kind), per in experts.items():
        _same_shape_experts(i, kind, per)
        out[f"layers.{i}.ffn.experts_{kind}"] = torch.stack([per[j] for j in sorted(per)])
    for k in [k for k in out if k.endswith("mamba.conv_weight")]:
        out[k] = out[k].reshape(out[k].shape[0], -1)                  # (C, 1, K) -> (C, K)
    if "lm_head.weight" not in out:
        if not arch.tie_word_embeddings:
            raise WeightError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        out["lm_head.weight"] = out["embed.weight"]
    if spec.model_type == "falcon_h1":
        _fold_falcon_mup(spec, arch, out)
    return out


def _same_shape_experts(i: int, kind: str, per: dict[int, torch.Tensor]) -> None:
    """Per-expert tensors are stacked: one of another shape is named, not a stack error."""
    first = per[min(per)].shape
    for j in sorted(per):
        if per[j].shape != first:
            raise WeightError(f"layers.{i} expert {j} {kind}_proj: shape {tuple(per[j].shape)}, "
                              f"expert {min(per)} has {tuple(first)}")


def _strip(name: str) -> str:
    for p in ("backbone.", "model.language_model.", "model."):
        if name.startswith(p):
            return name[len(p):]
    return name


def _top_level(base: str, name: str) -> str:
    table = {"embeddings.weight": "embed.weight", "embed_tokens.weight": "embed.weight",
             "norm_f.weight": "final_norm.weight", "final_layernorm.weight": "final_norm.weight",
             "norm.weight": "final_norm.weight", "lm_head.weight": "lm_head.weight",
             "embedding_norm.weight": "final_norm.weight"}       # LFM2: the final norm
    if base not in table:
        raise WeightError(f"unexpected checkpoint tensor {name!r}")
    return table[base]


def _fixup(sub: str) -> str:
    """Module-level spellings: conv1d -> conv_*, row-parallel biases added after the sum."""
    for a, b in (("mamba.conv1d.weight", "mamba.conv_weight"), ("mamba.conv1d.bias", "mamba.conv_bias"),
                 ("attn.o_proj.bias", "attn.o_bias"), ("mamba.out_proj.bias", "mamba.out_bias"),
                 ("ffn.down_proj.bias", "ffn.down_bias"),
                 ("ffn.shared.down_proj.bias", "ffn.shared.down_bias")):
        if sub == a:
            return b
    return sub


def _nemotron_h(spec, i, rest, t, experts):
    layer = spec.layers[i]
    if rest == "norm.weight":
        return [("mixer_norm.weight" if layer.mixers else "ffn_norm.weight", t)]
    if not rest.startswith("mixer."):
        raise WeightError(f"unexpected nemotron_h tensor layers.{i}.{rest}")
    rest = rest[len("mixer."):]
    if layer.mixer(MixerKind.MAMBA2):
        return [("mamba." + rest, t)]
    if layer.mixer(MixerKind.ATTENTION):
        return [("attn." + rest, t)]
    if layer.ffn is FfnKind.MLP:
        return [("ffn." + rest, t)]
    m = _EXPERT.match(rest)
    if m:
        experts.setdefault((i, m.group(2)), {})[int(m.group(1))] = t
        return []
    moe = {"experts.up_proj": "experts_up", "experts.down_proj": "experts_down",
           "gate.weight": "router_weight", "gate.e_score_correction_bias": "router_bias"}
    if rest in moe:
        return [("ffn." + moe[rest], t)]
    if rest.startswith("shared_experts."):
        return [("ffn.shared." + rest[len("shared_experts."):], t)]
    raise WeightError(f"unexpected nemotron_h tensor layers.{i}.mixer.{rest}")


_GRANITE_PREFIX = {"input_layernorm.": "mixer_norm.", "pre_ff_layernorm.": "ffn_norm.",
                   "post_attention_layernorm.": "ffn_norm.", "mamba.": "mamba.",
                   "self_attn.": "attn.", "feed_forward.": "ffn."}


def _granite_family(spec, i, rest, t, experts):
    """Bamba, GraniteMoeHybrid, FalconH1 (one decoder layer: mixers, then the FFN)."""
    for a, b in _GRANITE_PREFIX.items():
        if rest.startswith(a):
            return [(b + rest[len(a):], t)]
    moe = spec.layers[i].ffn is FfnKind.MOE
    if rest == "block_sparse_moe.input_linear.weight":      # (E, 2I, D): [gate | up]
        gate, up = t.chunk(2, dim=1)
        return [("ffn.experts_gate", gate), ("ffn.experts_up", up)]
    if rest == "block_sparse_moe.output_linear.weight":
        return [("ffn.experts_down", t)]
    if rest == "block_sparse_moe.router.layer.weight":
        return [("ffn.router_weight", t)]
    pre = "ffn.shared." if moe else "ffn."
    if rest == "shared_mlp.input_linear.weight":            # (2S, D): [gate | up]
        gate, up = t.chunk(2, dim=0)
        return [(pre + "gate_proj.weight", gate), (pre + "up_proj.weight", up)]
    if rest == "shared_mlp.output_linear.weight":
        return [(pre + "down_proj.weight", t)]
    raise WeightError(f"unexpected {spec.model_type} tensor layers.{i}.{rest}")


def _fold_falcon_mup(spec: ModelSpec, arch: ArchConfig, out: dict[str, torch.Tensor]) -> None:
    """FalconH1 scales in_proj's input by ssm_in_multiplier and its output sections z|x|B|C|dt
    by ssm_multipliers (its `mup_vector`); both are linear, so fold them into the weights."""
    for layer in spec.layers:
        m = layer.mixer(MixerKind.MAMBA2)
        if m is None:
            continue
        i_, gn, h = m.intermediate, m.n_groups * m.d_state, m.num_heads
        sizes = (i_, i_, gn, gn, h)
        mup = torch.cat([torch.full((s,), f) for s, f in zip(sizes, arch.zxbcdt_multipliers)])
        w = f"layers.{layer.index}.mamba.in_proj.weight"
        out[w] = out[w] * (mup[:, None] * arch.ssm_in_multiplier).to(out[w].dtype)
        b = f"layers.{layer.index}.mamba.in_proj.bias"
        if b in out:
            out[b] = out[b] * mup.to(out[b].dtype)


_RENAMERS = {"nemotron_h": _nemotron_h, "bamba": _granite_family,
             "granitemoehybrid": _granite_family, "falcon_h1": _granite_family,
             "zamba2": zamba2_names, "qwen3_5_text": qwen_names, "qwen3_next": qwen_names,
             "lfm2": lfm2_names, "jamba": jamba_names}
