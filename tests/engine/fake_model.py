"""A tiny stand-in for pdbridge.model that obeys the cache contract, for engine tests.

It reads and writes only the caches: each token's features go into the attention KV (through
the block table) and into a Mamba2-like conv window and decaying state, and the logits are a
function of everything cached so far, so a wrong block, slot, chunk boundary or transferred byte
changes the tokens. TP: each rank sums only the units it alone counts, then all-reduces.
"""
import math

import torch
from torch import nn

from pdbridge.spec import AttentionSpec, FfnKind, LayerSpec, Mamba2Spec, ModelSpec

VOCAB = 29


def fake_spec(dtype: str = "float64") -> ModelSpec:
    attn = AttentionSpec(num_q_heads=4, num_kv_heads=2, head_dim=2)
    m2 = Mamba2Spec(num_heads=4, head_dim=2, d_state=2, n_groups=1, d_conv=3)
    layers = (LayerSpec(0, (m2,), FfnKind.NONE), LayerSpec(1, (attn,), FfnKind.NONE),
              LayerSpec(2, (attn, m2), FfnKind.NONE))
    return ModelSpec("fake", hidden_size=4, vocab_size=VOCAB, layers=layers, dtype=dtype,
                     ssm_dtype=dtype, config={"eos_token_id": VOCAB - 1})


def load_fake(model_dir, comm, device, dtype):
    spec = fake_spec(dtype or "float64")
    return spec, FakeModel(spec, comm)


def feature(tok: int, pos: int) -> float:
    return math.sin(0.7 * tok + 1.3) + 0.01 * pos


class FakeModel(nn.Module):
    def __init__(self, spec: ModelSpec, comm):
        super().__init__()
        self.spec, self.comm = spec, comm
        r, t = comm.rank, comm.size
        self.heads = (r * 4 // t, (r + 1) * 4 // t)           # mamba heads and query heads
        self.kv_heads = (self.heads[0] // 2, (self.heads[1] - 1) // 2 + 1)

    def forward(self, batch, caches):
        z = torch.zeros(batch.num_seqs, dtype=torch.float64)
        for i, (a, b) in enumerate(batch.seq_spans()):
            ctx, slot = int(batch.context_lens[i]), int(batch.state_slots[i])
            table = batch.block_tables[i]
            for layer in self.spec.layers:
                kinds = {m.kind.value for m in layer.mixers}
                if "mamba2" in kinds and ctx == 0:
                    caches.conv(layer.index)[slot].zero_()
                    caches.ssm(layer.index)[slot].zero_()
                for j in range(a, b):
                    e = feature(int(batch.input_ids[j]), int(batch.positions[j]))
                    if "mamba2" in kinds:
                        self._mamba_token(caches, layer.index, slot, e)
                    if "attention" in kinds:
                        self._kv_write(caches, layer.index, table, int(batch.positions[j]), e)
                last = int(batch.positions[b - 1])
                if "mamba2" in kinds:
                    z[i] += caches.ssm(layer.index)[slot].double().sum()
                    z[i] += 0.1 * caches.conv(layer.index)[slot, :4 * (self.heads[1] - self.heads[0]) // 2].double().sum()
                if "attention" in kinds:
                    z[i] += self._attend(caches, layer.index, table, last)
        self.comm.all_reduce_(z)
        v = torch.arange(1, VOCAB + 1, dtype=torch.float64)
        return torch.cos(z[:, None] * v[None, :] * 0.37).float()

    def _mamba_token(self, caches, L, slot, e):
        conv, ssm = caches.conv(L)[slot], caches.ssm(L)[slot]     # (ch, 2), (heads, P, N)
        nx = 2 * (self.heads[1] - self.heads[0])                   # x channels here
        ch = torch.arange(conv.shape[0], dtype=torch.float64)
        glob = torch.cat([ch[:nx] + 2 * self.heads[0], ch[nx:] - nx + 100])   # B, C: group 0
        new = torch.cat([conv[:, 1:], (e * (glob + 1) * 0.1).to(conv.dtype)[:, None]], dim=1)
        conv.copy_(new)
        b = conv[nx:nx + 2, -1].double().sum()
        x = conv[:nx].double().sum(-1).reshape(-1, 2)              # (heads_local, P)
        ssm.copy_(0.9 * ssm.double() + (x[:, :, None] * (1 + 0.1 * b)).to(ssm.dtype))

    def _kv_slot(self, caches, table, pos):
        m = caches.block_tokens // caches.kernel_block_tokens
        kb = int(table[pos // caches.block_tokens]) * m + (pos % caches.block_tokens) // caches.kernel_block_tokens
        return kb, pos % caches.kernel_block_tokens

    def _kv_write(self, caches, L, table, pos, e):
        k, v = caches.kv(L)
        kb, row = self._kv_slot(caches, table, pos)
        for h in range(k.shape[1]):
            g = self.kv_heads[0] + h
            k[kb, h, row] = torch.tensor([e * (g + 1), pos], dtype=k.dtype)
            v[kb, h, row] = torch.tensor([2 * e, -e * (g + 1)], dtype=v.dtype)

    def _attend(self, caches, L, table, last):
        """Sum over cached tokens 0..last of the heads whose first query head is ours."""
        k, v = caches.kv(L)
        out = 0.0
        for h in range(k.shape[1]):
            g = self.kv_heads[0] + h
            if not self.heads[0] <= 2 * g < self.heads[1]:
                continue
            for t in range(last + 1):
                kb, row = self._kv_slot(caches, table, t)
                w = math.cos(0.3 * t)
                out += w * (float(k[kb, h, row, 0]) + 0.5 * float(v[kb, h, row, 1]))
                assert float(k[kb, h, row, 1]) == t, "KV of a position read from the wrong slot"
        return out


CRASH_TOKEN = 13
SLOW_LOAD_S = 2.0


def load_fake_slow(model_dir, comm, device, dtype):
    """The fake model, but ranks 1.. take SLOW_LOAD_S to load (a big shard on a busy disk)."""
    import time
    if comm.rank > 0:
        time.sleep(SLOW_LOAD_S)
    return load_fake(model_dir, comm, device, dtype)


def load_fake_fragile(model_dir, comm, device, dtype):
    """Rank 1 fails to load; with dtype "crash" instead rank 1 dies mid-forward on CRASH_TOKEN."""
    if comm.rank == 1 and dtype != "crash":
        raise RuntimeError("rank 1 cannot load its shard")
    spec = fake_spec()
    return spec, _Fragile(spec, comm)


class _Fragile(FakeModel):
    def forward(self, batch, caches):
        import os
        if self.comm.rank == 1 and CRASH_TOKEN in batch.input_ids.tolist():
            os._exit(7)
        return super().forward(batch, caches)



NAN_TOKEN = 11


def load_fake_nan(model_dir, comm, device, dtype):
    """The fake model, but a sequence whose step sees NAN_TOKEN gets NaN logits (an overflow)."""
    spec = fake_spec(dtype or "float64")
    return spec, _Nan(spec, comm)


class _Nan(FakeModel):
    def forward(self, batch, caches):
        logits = super().forward(batch, caches)
        ids = batch.input_ids.tolist()
        for i, (a, b) in enumerate(batch.seq_spans()):
            if NAN_TOKEN in ids[a:b]:
                logits[i] = float("nan")
        return logits
