"""Jamba checkpoint names -> canonical names (hf_names.py calls `jamba_names` per layer tensor).

transformers 5.x JambaForCausalLM: `input_layernorm` before the mixer (`mamba.*` or
`self_attn.*`), `pre_ff_layernorm` before `feed_forward`: a SwiGLU MLP, or on the expert layers
a router (`router.weight`) and experts, saved one tensor per expert (`experts.{j}.{gate,up,down}
_proj.weight`) and held stacked in memory (`experts.gate_up_proj` (E, 2I, D) as [gate | up],
`experts.down_proj`); both spellings load. Mamba1 tensors go to `layers.{i}.mamba1.*`.
"""
from __future__ import annotations

import re

import torch

from .weight_error import WeightError

_EXPERT = re.compile(r"^feed_forward\.experts\.(\d+)\.(up|down|gate)_proj\.weight$")
_PREFIX = {"input_layernorm.": "mixer_norm.", "pre_ff_layernorm.": "ffn_norm.",
           "self_attn.": "attn."}
_MAMBA = {"conv1d.bias": "conv_bias", "out_proj.bias": "out_bias",
          "dt_layernorm.weight": "dt_norm.weight", "b_layernorm.weight": "b_norm.weight",
          "c_layernorm.weight": "c_norm.weight"}
_MAMBA_PLAIN = ("in_proj.weight", "in_proj.bias", "x_proj.weight", "dt_proj.weight",
                "dt_proj.bias", "A_log", "D", "out_proj.weight")
_FFN = {"feed_forward.router.weight": "ffn.router_weight",
        "feed_forward.experts.down_proj": "ffn.experts_down",
        "feed_forward.gate_proj.weight": "ffn.gate_proj.weight",
        "feed_forward.up_proj.weight": "ffn.up_proj.weight",
        "feed_forward.down_proj.weight": "ffn.down_proj.weight"}


class JambaWeightError(WeightError):
    """A Jamba checkpoint tensor that has no place; the message names it."""


def jamba_names(spec, i: int, rest: str, t: torch.Tensor, experts) -> list[tuple[str, torch.Tensor]]:
    for a, b in _PREFIX.items():
        if rest.startswith(a):
            return [(b + rest[len(a):], t)]
    if rest.startswith("mamba."):
        leaf = rest[len("mamba."):]
        if leaf == "conv1d.weight":
            return [("mamba1.conv_weight", t.reshape(t.shape[0], -1))]     # (I, 1, K) -> (I, K)
        if leaf in _MAMBA:
            return [("mamba1." + _MAMBA[leaf], t)]
        if leaf in _MAMBA_PLAIN:
            return [("mamba1." + leaf, t)]
    m = _EXPERT.match(rest)
    if m:
        experts.setdefault((i, m.group(2)), {})[int(m.group(1))] = t
        return []
    if rest == "feed_forward.experts.gate_up_proj":              # (E, 2I, D): [gate | up]
        gate, up = t.chunk(2, dim=1)
        return [("ffn.experts_gate", gate), ("ffn.experts_up", up)]
    if rest in _FFN:
        return [(_FFN[rest], t)]
    raise JambaWeightError(f"unexpected jamba tensor layers.{i}.{rest}")
