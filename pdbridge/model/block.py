"""One decoder layer: pre-norm mixers (one: attention, Mamba2, Mamba1, short conv or gated delta
net; or attention and Mamba2 in parallel as FalconH1),
residual; then pre-norm feed-forward (MLP or MoE), residual. Multipliers from ArchConfig."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from pdbridge.spec import FfnKind, LayerSpec, Mamba2Spec, MixerKind

from .arch import ArchConfig
from .attention import Attention
from .batch import ForwardBatch
from .lfm2_weights import lfm2_mlp_intermediate
from .mamba1 import build_mamba1
from .mamba2 import Mamba2
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm, group_spans_ranks
from .qwen import build_gated_attention, build_gdn
from .shard import attention_shard, mamba2_shard, split_units
from .short_conv import build_short_conv


class Block(nn.Module):
    def __init__(self, layer: LayerSpec, hidden: int, arch: ArchConfig, cfg: dict, comm,
                 names: set[str]):
        super().__init__()
        self.arch = arch
        i, pre = layer.index, f"layers.{layer.index}."
        self.mixer_norm = RMSNorm(hidden, arch.eps, arch.norm_offset) if layer.mixers else None
        a, m = layer.mixer(MixerKind.ATTENTION), layer.mixer(MixerKind.MAMBA2)
        g = layer.mixer(MixerKind.GATED_DELTA_NET)
        self.attn = self.mamba = self.gdn = self.ffn = self.ffn_norm = None
        if a is not None and arch.gated_attention:
            self.attn = build_gated_attention(a, hidden, i, arch, comm, names)
        elif a is not None:
            self.attn = Attention(attention_shard(a, comm.size, comm.rank), hidden, i, arch.rope,
                                  arch.attn_scale, arch.key_multiplier,
                                  pre + "attn.q_proj.bias" in names, comm,
                                  arch.eps if arch.qk_norm else None)
        c = layer.mixer(MixerKind.SHORT_CONV)
        self.conv = build_short_conv(c, hidden, i, comm, names) if c is not None else None
        m1 = layer.mixer(MixerKind.MAMBA1)
        self.mamba1 = (build_mamba1(m1, hidden, i, arch.eps, arch.mamba_act, comm, names)
                       if m1 is not None else None)
        if m is not None:
            self.mamba = build_mamba2(m, hidden, i, arch, comm, names)
        if g is not None:
            self.gdn = build_gdn(g, hidden, i, arch, comm)
        if layer.ffn is not FfnKind.NONE:
            self.ffn_norm = RMSNorm(hidden, arch.eps, arch.norm_offset)
            self.ffn = build_ffn(layer, hidden, arch, cfg, comm, names)

    def forward(self, h: torch.Tensor, batch: ForwardBatch, caches,
                embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """h: (T, D). `embeddings` (the layer-0 input) is unused here; Zamba2's layers read it."""
        arch = self.arch
        if self.mixer_norm is not None:
            x = self.mixer_norm(h)
            out = None
            if self.mamba is not None:
                out = self.mamba(x, batch, caches) * arch.ssm_out_multiplier
            if self.gdn is not None:
                out = self.gdn(x, batch, caches)
            if self.conv is not None:
                out = self.conv(x, batch, caches)
            if self.mamba1 is not None:
                out = self.mamba1(x, batch, caches)
            if self.attn is not None:
                y = self.attn(x * arch.attn_in_multiplier, batch, caches) * arch.attn_out_multiplier
                out = y if out is None else out + y
            h = h + out * arch.residual_multiplier
        if self.ffn is not None:
            h = h + self.ffn(self.ffn_norm(h)) * arch.residual_multiplier
        return h


def build_mamba2(m: Mamba2Spec, hidden: int, layer: int, arch: ArchConfig, comm,
                 names: set[str]) -> Mamba2:
    """This rank's Mamba2 of `layer`; the gated-norm sums are all-reduced when a norm group
    spans ranks (decided from the spec, so every rank agrees)."""
    pre = f"layers.{layer}.mamba."
    if arch.mamba_norm_eps is not None:         # Mamba2 reads arch.eps for its gated norm only
        arch = replace(arch, eps=arch.mamba_norm_eps)
    shards = [mamba2_shard(m, comm.size, r) for r in range(comm.size)]
    spans = [(s.h0 * m.head_dim, s.h1 * m.head_dim) for s in shards]
    reduce = group_spans_ranks(spans, shards[0].norm_group_size())
    return Mamba2(shards[comm.rank], hidden, layer, arch, reduce, comm,
                  in_bias=pre + "in_proj.bias" in names, out_bias=pre + "out_bias" in names,
                  conv_bias=pre + "conv_bias" in names)


def build_ffn(layer: LayerSpec, hidden: int, arch: ArchConfig, cfg: dict, comm,
              names: set[str]) -> nn.Module:
    pre = f"layers.{layer.index}.ffn."
    bias = pre + "up_proj.bias" in names

    def mlp(inter: int, bias: bool) -> MLP:
        a, b = split_units(inter, comm.size, comm.rank)
        return MLP(hidden, b - a, arch.mlp_act, arch.mlp_gated, bias, comm,
                   arch.mlp_gate_multiplier, arch.mlp_down_multiplier)

    if layer.ffn is FfnKind.MLP:
        return mlp(_mlp_intermediate(cfg), bias)
    moe = arch.moe
    shared_inter = int(cfg.get("moe_shared_expert_intermediate_size")
                       or cfg.get("shared_intermediate_size")
                       or cfg.get("shared_expert_intermediate_size") or 0)
    shared = mlp(shared_inter, pre + "shared.up_proj.bias" in names) if shared_inter else None
    inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    a, b = split_units(inter, comm.size, comm.rank)
    return MoE(hidden, b - a, moe, arch.mlp_act, shared, comm)


def _mlp_intermediate(cfg: dict) -> int:
    """Granite's dense layers are its `shared_mlp` (shared_intermediate_size)."""
    if cfg.get("model_type") == "granitemoehybrid":
        return int(cfg["shared_intermediate_size"])
    if cfg.get("model_type") == "lfm2":
        return lfm2_mlp_intermediate(cfg)
    return int(cfg["intermediate_size"])
