"""Zamba2 layers: Mamba2 layers, and hybrid layers that first run a shared transformer block.

Hybrid layer i (the j-th hybrid layer), residual stream h and token embeddings e, both (T, D):
    x = norm_2D([h | e])                       the shared block sees the embeddings again: 2D wide
    a = attn(x)  (+ layer j's q/k/v adapters)  its KV cached at layer i (spec: attention at i)
    t = linear_i(mlp(norm(a)) (+ adapter_j))   no residual inside the shared block
    h = h + mamba_i(norm_i(h + t))             t enters the Mamba2 input only, not the residual
Shared block j % num_mem_blocks serves hybrid layer j; linear_i and the adapters are per layer.
A Mamba2 layer is h = h + mamba_i(norm_i(h)).
Source: transformers 5.x modeling_zamba2.py (Zamba2HybridLayer, Zamba2AttentionDecoderLayer,
Zamba2MambaDecoderLayer); the Zamba2 report (arXiv 2411.15242, fig. 2).

TP: attention heads and MLP channels of the shared blocks are cut like any attention / MLP
(zamba2_weights.py); an adapter's down matrix A (rank x in) is replicated, its up matrix B is cut
by the rows of the projection it adds to; linear_i is replicated.
"""
from __future__ import annotations

import torch
from torch import nn

from pdbridge.spec import AttentionSpec, LayerSpec, MixerKind, ModelSpec

from .arch import ArchConfig, SharedBlocks
from .attention import Attention
from .batch import ForwardBatch
from .block import build_mamba2
from .mlp import MLP
from .norm import RMSNorm
from .shard import attention_shard, split_units


class Adapters(nn.Module):
    """One hybrid layer's low-rank terms B(A x): on q, k, v (optional) and on the MLP's gate / up."""

    def __init__(self, hidden: int, rank: int, q_local: int, kv_local: int, inter_local: int,
                 attention: bool):
        super().__init__()
        self.attention = attention
        if attention:
            self.q_a, self.k_a, self.v_a = (nn.Linear(2 * hidden, rank, bias=False) for _ in "qkv")
            self.q_b = nn.Linear(rank, q_local, bias=False)
            self.k_b = nn.Linear(rank, kv_local, bias=False)
            self.v_b = nn.Linear(rank, kv_local, bias=False)
        self.mlp_a = nn.Linear(hidden, rank, bias=False)
        self.gate_b = nn.Linear(rank, inter_local, bias=False)
        self.up_b = nn.Linear(rank, inter_local, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:     # x: (T, 2D)
        if not self.attention:
            return None
        return self.q_b(self.q_a(x)), self.k_b(self.k_a(x)), self.v_b(self.v_a(x))

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:   # x: (T, D)
        a = self.mlp_a(x)
        return self.gate_b(a), self.up_b(a)


class SharedTransformer(nn.Module):
    """Attention over [h | e] (2D wide, no bias), then a gated MLP; neither adds a residual."""

    def __init__(self, a: AttentionSpec, hidden: int, inter: int, arch: ArchConfig, comm,
                 prefix: str, names: set[str]):
        super().__init__()
        self.input_norm = RMSNorm(2 * hidden, arch.eps)
        # The cache layer is given per call; -1 here would fail loudly if it were ever used.
        self.attn = Attention(attention_shard(a, comm.size, comm.rank), 2 * hidden, -1, arch.rope,
                              arch.attn_scale, 1.0, False, comm)
        # Reads [h | e] (2D) but writes the D-wide residual stream.
        self.attn.o_proj = nn.Linear(self.attn.num_q * a.head_dim, hidden, bias=False)
        self.ffn_norm = RMSNorm(hidden, arch.eps)
        i0, i1 = split_units(inter, comm.size, comm.rank)
        self.ffn = MLP(hidden, i1 - i0, arch.mlp_act, True, prefix + "ffn.up_proj.bias" in names,
                       comm)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, batch: ForwardBatch, caches,
                layer: int, adapter: Adapters) -> torch.Tensor:            # (T, D) each
        x = self.input_norm(torch.cat([h, emb], dim=-1))
        y = self.ffn_norm(self.attn(x, batch, caches, layer, adapter.qkv(x)))
        gate_delta, up_delta = adapter.gate_up(y)
        mlp = self.ffn
        g = mlp.gate_proj(y) + gate_delta
        u = mlp.up_proj(y) + up_delta
        out = mlp.down_proj(mlp.act(g) * u)
        mlp.comm.all_reduce_(out)
        return mlp.finish(out)


class Zamba2Layer(nn.Module):
    """A Mamba2 layer; with `shared`, a hybrid layer (the shared block runs first)."""

    def __init__(self, layer: LayerSpec, hidden: int, arch: ArchConfig, comm, names: set[str],
                 shared: SharedTransformer | None = None, adapter: Adapters | None = None):
        super().__init__()
        m = layer.mixer(MixerKind.MAMBA2)
        if m is None:
            raise ValueError(f"zamba2 layer {layer.index} has no Mamba2 mixer")
        self.index = layer.index
        self.mixer_norm = RMSNorm(hidden, arch.eps)
        self.mamba = build_mamba2(m, hidden, layer.index, arch, comm, names)
        # A plain reference: the block's parameters belong to HybridModel.shared (one copy).
        self.__dict__["shared"] = shared
        self.linear = nn.Linear(hidden, hidden, bias=False) if shared is not None else None
        self.adapter = adapter

    def forward(self, h: torch.Tensor, batch: ForwardBatch, caches,
                embeddings: torch.Tensor | None = None) -> torch.Tensor:   # (T, D)
        x = h
        if self.shared is not None:
            t = self.shared(h, embeddings, batch, caches, self.index, self.adapter)
            x = h + self.linear(t)
        return h + self.mamba(self.mixer_norm(x), batch, caches)


def build_zamba2_layers(spec: ModelSpec, arch: ArchConfig, comm, names: set[str]
                        ) -> tuple[nn.ModuleList, nn.ModuleList]:
    """-> (shared blocks, one Zamba2Layer per spec layer)."""
    sb: SharedBlocks = arch.shared
    d, inter = spec.hidden_size, int(spec.config["intermediate_size"])
    attn = _attention_spec(spec, sb)
    used = min(sb.num_blocks, len(sb.hybrid_layers))          # blocks no layer runs have no weights
    shared = nn.ModuleList(SharedTransformer(attn, d, inter, arch, comm, f"shared.{b}.", names)
                           for b in range(used))
    layers = []
    for layer in spec.layers:
        if layer.index in sb.hybrid_layers:
            block = shared[sb.block_of(layer.index)]
            adapter = Adapters(d, sb.adapter_rank, block.attn.num_q * attn.head_dim,
                               block.attn.num_kv * attn.head_dim, block.ffn.up_proj.out_features,
                               sb.attention_adapter)
            layers.append(Zamba2Layer(layer, d, arch, comm, names, block, adapter))
        else:
            layers.append(Zamba2Layer(layer, d, arch, comm, names))
    return shared, nn.ModuleList(layers)


def _attention_spec(spec: ModelSpec, sb: SharedBlocks) -> AttentionSpec | None:
    specs = {spec.layers[i].mixer(MixerKind.ATTENTION) for i in sb.hybrid_layers}
    if len(specs) > 1:
        raise ValueError(f"zamba2: hybrid layers disagree on attention geometry: {specs}")
    a = next(iter(specs), None)
    # An adapter adds a (2D)-wide term to q, k and v alike: HF builds it only for kv == q heads.
    if a is not None and sb.attention_adapter and a.num_kv_heads != a.num_q_heads:
        raise NotImplementedError(f"zamba2: use_shared_attention_adapter needs num_key_value_heads"
                                  f" == num_attention_heads, got {a.num_kv_heads} and "
                                  f"{a.num_q_heads}")
    return a
