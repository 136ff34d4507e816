"""Mixture of experts with a shared expert (NemotronH, GraniteMoeHybrid).

Routers (transformers 5.x): NemotronH scores sigmoid(logits) (+ a correction bias for the
choice only, grouped top-k), weights = chosen scores, optionally normalised, times
routed_scaling_factor. Granite takes the top-k logits and softmaxes them.
TP: every expert's intermediate channels are split like an MLP's; the router is replicated;
the routed sum and the shared expert are summed over ranks in one all-reduce.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import MoeConfig
from .mlp import MLP, activation
from .precision import upcast


class MoE(nn.Module):
    def __init__(self, hidden: int, inter_local: int, cfg: MoeConfig, act: str, shared: MLP | None,
                 comm):
        super().__init__()
        self.cfg, self.comm, self.act = cfg, comm, activation(act)
        e = cfg.num_experts
        self.router_weight = nn.Parameter(torch.empty(e, hidden))
        self.router_bias = nn.Parameter(torch.zeros(e)) if cfg.router == "sigmoid_group" else None
        self.experts_up = nn.Parameter(torch.empty(e, inter_local, hidden))
        self.experts_gate = nn.Parameter(torch.empty(e, inter_local, hidden)) if cfg.gated else None
        self.experts_down = nn.Parameter(torch.empty(e, hidden, inter_local))
        self.shared = shared

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (top_k_index, top_k_weight), each (T, k)."""
        cfg = self.cfg
        logits = F.linear(upcast(x), upcast(self.router_weight))               # (T, E)
        if cfg.router == "softmax":         # Qwen3-Next: softmax over all, then top-k
            top, idx = torch.softmax(logits, dim=-1).topk(cfg.top_k, dim=-1)
            if cfg.norm_topk_prob:
                top = top / top.sum(-1, keepdim=True)
            return idx, top.to(x.dtype)
        if cfg.router == "softmax_topk":
            top, idx = logits.topk(cfg.top_k, dim=-1)
            return idx, torch.softmax(top, dim=-1).to(x.dtype)
        scores = logits.sigmoid()
        choice = scores + upcast(self.router_bias)
        t, e, g = x.shape[0], cfg.num_experts, cfg.n_group
        group_scores = choice.view(t, g, e // g).topk(min(2, e // g), dim=-1)[0].sum(-1)
        keep = torch.zeros_like(group_scores)
        keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1)[1], 1.0)
        keep = keep[:, :, None].expand(t, g, e // g).reshape(t, e).bool()
        idx = choice.masked_fill(~keep, float("-inf")).topk(cfg.top_k, dim=-1)[1]
        w = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:                        # (T, D)
        idx, w = self.route(x)
        out = torch.zeros(x.shape, dtype=w.dtype, device=x.device)
        for e in torch.unique(idx).tolist():
            tok, pos = torch.where(idx == e)
            h = x[tok]
            if self.experts_gate is None:
                y = self.act(F.linear(h, self.experts_up[e]))
            else:
                y = self.act(F.linear(h, self.experts_gate[e])) * F.linear(h, self.experts_up[e])
            y = F.linear(y, self.experts_down[e]) * w[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        out = out.to(x.dtype)
        if self.shared is not None:
            out = out + self.shared.partial(x)
        self.comm.all_reduce_(out)
        return self.shared.finish(out) if self.shared is not None else out
