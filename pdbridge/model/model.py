"""HybridModel: embeddings, decoder layers (Block; Zamba2Layer and shared blocks), final norm,
lm_head.

`model(batch, caches)` -> fp32 logits (num_seqs, vocab) at each sequence's last new token.
Written for one device; TP enters only through the shard sizes its modules are built with and
the `comm.all_reduce_` after each row-parallel projection (see tp.py).
"""
from __future__ import annotations

import torch
from torch import nn

from pdbridge.spec import ModelSpec

from .arch import ArchConfig
from .batch import ForwardBatch
from .block import Block
from .norm import RMSNorm
from .precision import upcast
from .zamba2 import build_zamba2_layers


class HybridModel(nn.Module):
    def __init__(self, spec: ModelSpec, arch: ArchConfig, comm, names: set[str]):
        super().__init__()
        self.spec, self.arch, self.comm = spec, arch, comm
        d = spec.hidden_size
        self.embed = nn.Embedding(spec.vocab_size, d)
        if arch.shared is None:
            self.layers = nn.ModuleList(Block(l, d, arch, dict(spec.config), comm, names)
                                        for l in spec.layers)
        else:                                   # Zamba2: shared transformer blocks
            self.shared, self.layers = build_zamba2_layers(spec, arch, comm, names)
        self.final_norm = RMSNorm(d, arch.eps, arch.norm_offset)
        self.lm_head = nn.Linear(d, spec.vocab_size, bias=False)
        # Called with each layer's index once it has run (its caches hold that layer's state
        # for this batch): P/D push mode writes final bytes from here (engine/pd_push.py).
        self.after_layer = None

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, caches, all_logits: bool = False) -> torch.Tensor:
        h = self.embed(batch.input_ids)
        if self.arch.embedding_multiplier != 1.0:
            h = h * self.arch.embedding_multiplier
        emb = h
        for i, block in enumerate(self.layers):
            h = block(h, batch, caches, emb)
            if self.after_layer is not None:
                self.after_layer(i)
        if not all_logits:
            h = h[batch.last_token_index()]
        h = self.final_norm(h)
        return upcast(self.lm_head(h)) * self.arch.logits_multiplier
