"""Zamba2 checkpoint names -> canonical names, and the TP cut of the names only Zamba2 has.

Canonical names (besides the generic layers.{i}.mixer_norm / layers.{i}.mamba.*):
  shared.{b}.{input_norm, ffn_norm}.weight, shared.{b}.attn.{q,k,v,o}_proj.weight,
  shared.{b}.ffn.{gate,up,down}_proj.weight (+ .bias, ffn.down_bias with add_bias_linear),
  layers.{i}.linear.weight, layers.{i}.adapter.{q,k,v}_{a,b}.weight,
  layers.{i}.adapter.{mlp_a, gate_b, up_b}.weight.
A checkpoint holds the shared block b once, under the first hybrid layer that runs it (transformers
ties the later copies and does not save them); its adapter list has one slot per hybrid layer,
filled for the layers that run block b. Both spellings (saved once, or every copy) load the same.
"""
from __future__ import annotations

import re

import torch

from pdbridge.spec import MixerKind, ModelSpec

from .arch import SharedBlocks, arch_config
from .shard import attention_shard, split_units
from .tp import _attention, _ffn
from .weight_error import WeightError

_ADAPTER_LIST = re.compile(r"^(?:self_attn\.linear_([qkv])_adapter_list|feed_forward\."
                           r"gate_up_proj_adapter_list)\.(\d+)\.([01])\.weight$")
_SHARED_PLAIN = {"input_layernorm.weight": "input_norm.weight",
                 "pre_ff_layernorm.weight": "ffn_norm.weight",
                 "feed_forward.down_proj.weight": "ffn.down_proj.weight",
                 "feed_forward.down_proj.bias": "ffn.down_bias"}


class Zamba2WeightError(WeightError):
    """A Zamba2 checkpoint tensor that has no place; the message names it."""


def zamba2_names(spec: ModelSpec, i: int, rest: str, t: torch.Tensor, experts) -> list:
    """`rest` of checkpoint tensor layers.{i}.{rest} -> [(name, tensor)]: names relative to
    layers.{i}, or canonical ones (shared.*, layers.{other}.*) for the shared blocks."""
    for pre in ("mamba_decoder.mamba.", "mamba."):
        if rest.startswith(pre):
            return [("mamba." + rest[len(pre):], t)]
    if rest in ("input_layernorm.weight", "mamba_decoder.input_layernorm.weight"):
        return [("mixer_norm.weight", t)]
    if rest == "linear.weight":
        return [("linear.weight", t)]
    if rest.startswith("shared_transformer."):
        return _shared(arch_config(spec).shared, i, rest[len("shared_transformer."):], t)
    raise Zamba2WeightError(f"unexpected zamba2 tensor layers.{i}.{rest}")


def _shared(sb: SharedBlocks, i: int, rest: str, t: torch.Tensor) -> list:
    if i not in sb.hybrid_layers:
        raise Zamba2WeightError(f"zamba2: layers.{i}.shared_transformer.{rest} on a Mamba2 layer")
    pre = f"shared.{sb.block_of(i)}."
    if rest in _SHARED_PLAIN:
        return [(pre + _SHARED_PLAIN[rest], t)]
    if rest.startswith("self_attn.") and rest.endswith("_proj.weight"):
        return [(pre + "attn." + rest[len("self_attn."):], t)]
    if rest.startswith("feed_forward.gate_up_proj."):             # (2I, ...): [gate | up]
        gate, up = t.chunk(2, dim=0)
        leaf = rest.rsplit(".", 1)[1]
        return [(pre + "ffn.gate_proj." + leaf, gate), (pre + "ffn.up_proj." + leaf, up)]
    m = _ADAPTER_LIST.match(rest)
    if m is None:
        raise Zamba2WeightError(f"unexpected zamba2 tensor layers.{i}.shared_transformer.{rest}")
    which, j, ab = m.group(1), int(m.group(2)), "ab"[int(m.group(3))]
    if j >= len(sb.hybrid_layers):
        raise Zamba2WeightError(f"zamba2: adapter slot {j} of layers.{i} but only "
                                f"{len(sb.hybrid_layers)} hybrid layers")
    owner = f"layers.{sb.hybrid_layers[j]}.adapter."
    if which is not None:
        return [(f"{owner}{which}_{ab}.weight", t)]
    if ab == "a":
        return [(owner + "mlp_a.weight", t)]
    gate, up = t.chunk(2, dim=0)                                   # (2I, rank): [gate | up]
    return [(owner + "gate_b.weight", gate), (owner + "up_b.weight", up)]


_SHARED_NAME = re.compile(r"^shared\.\d+\.(attn|ffn)\.(.*)$")
_ADAPTER_NAME = re.compile(r"^layers\.\d+\.adapter\.(\w+)\.weight$")


def shard_shared_weights(spec: ModelSpec, sb: SharedBlocks, full: dict[str, torch.Tensor],
                         rank: int, size: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share of the shared blocks' attention / MLP (cut like any attention / MLP)
    and of the adapters' B matrices (cut by the rows of the projection each adds to)."""
    if not sb.hybrid_layers:
        return {}
    attn = attention_shard(spec.layers[sb.hybrid_layers[0]].mixer(MixerKind.ATTENTION), size, rank)
    hd = attn.spec.head_dim
    out = {}
    for name, t in full.items():
        m = _SHARED_NAME.match(name)
        if m is not None:
            part, leaf = m.groups()
            out[name] = _attention(attn, leaf, t) if part == "attn" else _ffn(leaf, t, size, rank)
            continue
        m = _ADAPTER_NAME.match(name)
        if m is None:
            continue
        which = m.group(1)
        if which == "q_b":
            out[name] = t[attn.q0 * hd:attn.q1 * hd]
        elif which in ("k_b", "v_b"):
            out[name] = t[attn.kv0 * hd:attn.kv1 * hd]
        elif which in ("gate_b", "up_b"):
            a, b = split_units(t.shape[0], size, rank)
            out[name] = t[a:b]
        else:
            out[name] = t                                          # the A matrices: replicated
    return {k: v.contiguous() for k, v in out.items()}
