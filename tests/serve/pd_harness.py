"""Shared pieces of the P/D tests: tiny checkpoints, and running prompts through P/D and a
monolithic engine."""
from __future__ import annotations

import time

import torch

from pdbridge.engine.llm_engine import Engine
from pdbridge.engine.request import SamplingParams
from pdbridge.plan import Strategy
from pdbridge.serve.decode_node import DecodeNode, push_strategy
from pdbridge.serve.prefill_node import PrefillNode
from pdbridge.serve.router import PDRouter
from pdbridge.spec import CacheConfig

PROMPTS = [[5, 71, 33, 90, 12, 64, 7, 19, 101, 44, 3, 58, 27],
           [88, 14, 60, 2, 39, 111, 72, 9, 30, 17, 95, 41, 6, 120, 83, 21, 50, 77, 66, 12, 8],
           [42, 42, 7],
           [9, 19, 29, 39, 49, 59, 69, 79, 89, 99, 109, 119, 10, 20, 30, 40, 50, 60, 70, 80,
            90, 100, 110, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
STRATEGIES = [s.value for s in (Strategy.DIRECT, Strategy.STAGING, Strategy.PERMUTE, Strategy.AUTO)]


def granite_moe_dir(path) -> str:
    """A tiny random GraniteMoeHybrid: Mamba2 with n_groups = 1 (B/C replicated under TP) and
    MoE feed-forward, 4 mamba heads and 4 q / 2 kv heads (TP 1, 2, 4)."""
    import transformers as tf
    cfg = tf.GraniteMoeHybridConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=12, shared_intermediate_size=16,
        num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=4, mamba_d_head=16,
        mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=8,
        position_embedding_type="rope", initializer_range=0.3)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():       # constants HF initialises to fixed values: make them matter
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("dt_bias", "A_log"):
                p.uniform_(-1.0, 1.0)
            elif leaf == "D" or "norm" in name:
                p.normal_(1.0, 0.3)
    model.save_pretrained(str(path))
    return str(path)


def cache(conv_layout: str = "DS", **kw) -> CacheConfig:
    return CacheConfig(num_blocks=48, conv_layout=conv_layout,
                       attn_layout=kw.pop("attn_layout", "heads_across_blocks"), **kw)


def monolithic(model_dir, prompts, max_tokens: int) -> list[list[int]]:
    with Engine(model_dir, 1, cache()) as engine:
        return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=max_tokens))]


def run_pd(model_dir, prefill_tp: int, decode_tps: list[int], strategies: list[str],
           prompts, max_tokens: int, prefill_conv: str = "DS", decode_conv: str = "DS",
           transport: str = "nixl", prefill_interleave: bool = False,
           transfer_mode: str = "pull", checksums: bool = False):
    """Each strategy runs every prompt through P -> (each decode engine in turn); returns
    {(decode_tp, strategy): [token ids per prompt routed there]} and the prefill node's
    count of requests still holding blocks afterwards. `transfer_mode` push: the prefill
    ranks write into the decode blocks layer by layer (strategies: direct, auto)."""
    pre = PrefillNode(model_dir, prefill_tp, cache(prefill_conv, layer_interleave=prefill_interleave),
                      transport=transport, checksums=checksums)
    decs = []
    try:
        decs = [DecodeNode(model_dir, d, cache(decode_conv), transport=transport,
                           transfer_mode=transfer_mode, checksums=checksums)
                for d in decode_tps]
        out = {}
        for s in strategies:
            for node in decs:
                node.strategy = push_strategy(Strategy(s)) if transfer_mode == "push" \
                    else Strategy(s)
            records = PDRouter(pre, decs).run(prompts, SamplingParams(max_tokens=max_tokens))
            for rec in records:
                assert not rec.recomputed, rec.errors
                out.setdefault((rec.decode_tp, s), []).append((rec.index, rec.token_ids))
        return out, pre.num_held
    finally:
        for n in [pre, *decs]:
            n.close()


def hf_arch_dir(arch: str, path) -> str:
    """A tiny random checkpoint of any architecture the model tests cover (their configs)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    import hf_tiny
    return hf_tiny.save(hf_tiny.hf_model(hf_tiny.hf_config(arch)), str(path))


class FakeClock:
    """A clock the test moves by hand (PrefillNode(clock=...)), so lease tests never sleep."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    """Wait for something a background thread does; the bound only turns a hang into a failure."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)
