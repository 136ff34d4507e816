"""`pdbridge bench engine`: our model's prefill and decode against transformers' on the same
checkpoint, threads and dtype, measured side by side in one run.

Prefill: one prompt of T tokens from empty state, logits of the last token (transformers:
`logits_to_keep=1`, a fresh cache). Decode: after that prompt, `decode_steps` single-token steps,
time per token; "mamba" is the part spent inside our recurrent mixers (Mamba2, Mamba1, short
conv, gated delta net; forward hooks), which should stay flat in T: the SSM state has a fixed
size, unlike attention's KV.
Without --model, a small NemotronH made with transformers (from_config, random weights,
save_pretrained into a temporary directory): nothing is downloaded.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

# The default checkpoint: Mamba2-heavy like the real hybrids (REFERENCE.md), small enough for CI.
DEFAULT_CONFIG = dict(
    vocab_size=1024, hidden_size=256, layers_block_type=["mamba", "mlp", "mamba", "attention",
                                                         "mamba", "mlp"],
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
    mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=64, n_groups=2, conv_kernel=4,
    chunk_size=128, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
    moe_shared_expert_intermediate_size=64, initializer_range=0.02)
BLOCK_TOKENS = 64


@dataclass(frozen=True)
class EngineBenchConfig:
    model_dir: str | None          # None: build DEFAULT_CONFIG into a temporary directory
    tokens: tuple[int, ...]
    dtype: torch.dtype
    threads: int
    reps: int
    decode_steps: int
    device: str = "cpu"

    def __post_init__(self):
        if not self.tokens or min(self.tokens) < 1:
            raise ValueError(f"tokens={self.tokens}; allowed: positive integers")
        for name in ("threads", "reps", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: >= 1")


def write_default_checkpoint(path: str) -> str:
    import transformers as tf
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.NemotronHConfig(**DEFAULT_CONFIG))
    model.save_pretrained(path)
    return path


def run_bench(cfg: EngineBenchConfig) -> dict:
    """-> {"prefill": [row per T], "decode": [row per T], "model": ..., ...}."""
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="pdbridge_bench_") as tmp:
        model_dir = cfg.model_dir or write_default_checkpoint(tmp)
        ours, hf = _load_pair(model_dir, cfg.dtype, cfg.device)
        vocab = ours.spec.vocab_size
        g = torch.Generator().manual_seed(0)
        prefill, decode = [], []
        for t in cfg.tokens:
            prompt = torch.randint(0, vocab, (t,), generator=g).tolist()
            ours_s, hf_s = _alternate(cfg.reps, lambda: _ours_prefill(ours, prompt, cfg),
                                      lambda: _hf_prefill(hf, prompt, cfg))
            prefill.append(dict(tokens=t, ours_ms=ours_s * 1e3, hf_ms=hf_s * 1e3,
                                ours_tok_s=t / ours_s, hf_tok_s=t / hf_s, speedup=hf_s / ours_s))
            o_tok, o_mamba, h_tok = _decode_pair(ours, hf, prompt, cfg)
            decode.append(dict(context=t, ours_ms_per_tok=o_tok * 1e3,
                               ours_mamba_ms_per_tok=o_mamba * 1e3, hf_ms_per_tok=h_tok * 1e3,
                               speedup=h_tok / o_tok))
    return dict(model=cfg.model_dir or "default (transformers NemotronH, random weights)",
                dtype=str(cfg.dtype).removeprefix("torch."), threads=cfg.threads,
                device=cfg.device, prefill=prefill, decode=decode)


def _load_pair(model_dir: str, dtype: torch.dtype, device: str):
    import transformers as tf
    from pdbridge.model import load_model
    ours = load_model(model_dir, dtype=dtype).to(device)
    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return ours, hf


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _alternate(reps: int, ours, theirs) -> tuple[float, float]:
    """Median seconds of each, runs interleaved (ours, theirs, ours, ...) after one warm-up
    each, so that a shared machine's load falls on both alike."""
    ours(), theirs()
    a, b = zip(*((ours(), theirs()) for _ in range(reps)))
    return statistics.median(a), statistics.median(b)


def _decode_pair(ours, hf, prompt: list[int], cfg: EngineBenchConfig):
    """-> (ours s/token, of which in Mamba2 mixers, transformers s/token): medians over `reps`
    interleaved rounds of `decode_steps` steps each."""
    rounds = [(*_ours_decode(ours, prompt, cfg), _hf_decode(hf, prompt, cfg))
              for _ in range(cfg.reps)]
    return tuple(statistics.median(r[i] for r in rounds) for i in range(3))


def _caches(model, tokens: int, cfg: EngineBenchConfig):
    from pdbridge.model import DenseCaches
    caches = DenseCaches(model.spec, num_blocks=-(-tokens // BLOCK_TOKENS) + 1,
                         block_tokens=BLOCK_TOKENS, dtype=cfg.dtype, ssm_dtype=torch.float32)
    for group in (caches._conv, caches._ssm):
        for k, t in group.items():
            group[k] = t.to(cfg.device)
    for k, (kc, vc) in caches._kv.items():
        caches._kv[k] = (kc.to(cfg.device), vc.to(cfg.device))
    return caches


@torch.no_grad()
def _ours_prefill(model, prompt: list[int], cfg: EngineBenchConfig, caches=None) -> float:
    from pdbridge.model import ForwardBatch
    caches = caches or _caches(model, len(prompt) + cfg.decode_steps, cfg)
    blocks = list(range(caches.num_blocks))
    batch = _to(ForwardBatch.build([prompt], [0], [blocks], [0]), cfg.device)
    _sync(cfg.device)
    t0 = time.perf_counter()
    model(batch, caches)
    _sync(cfg.device)
    return time.perf_counter() - t0


@torch.no_grad()
def _ours_decode(model, prompt: list[int], cfg: EngineBenchConfig) -> tuple[float, float]:
    """-> (seconds per token, of which inside the recurrent mixers: Mamba2, Mamba1, short conv,
    gated delta net)."""
    from pdbridge.model import ForwardBatch
    from pdbridge.model.gdn import GatedDeltaNet
    from pdbridge.model.mamba1 import Mamba1
    from pdbridge.model.mamba2 import Mamba2
    from pdbridge.model.short_conv import ShortConv
    caches = _caches(model, len(prompt) + cfg.decode_steps + 1, cfg)
    blocks = list(range(caches.num_blocks))
    _ours_prefill(model, prompt, cfg, caches)
    ctx = len(prompt)
    step = lambda tok: model(_to(ForwardBatch.build([[tok]], [ctx], [blocks], [0]), cfg.device),
                             caches)
    step(1)                                         # warm-up (overwritten by the first step)
    watch = _Stopwatch([m for m in model.modules()
                        if isinstance(m, (Mamba2, Mamba1, ShortConv, GatedDeltaNet))],
                       cfg.device)
    _sync(cfg.device)
    t0 = time.perf_counter()
    with watch:
        for j in range(cfg.decode_steps):
            step(j % 7)
            ctx += 1
    _sync(cfg.device)
    return (time.perf_counter() - t0) / cfg.decode_steps, watch.seconds / cfg.decode_steps


@torch.no_grad()
def _hf_prefill(hf, prompt: list[int], cfg: EngineBenchConfig):
    ids = torch.tensor([prompt], device=cfg.device)
    _sync(cfg.device)
    t0 = time.perf_counter()
    hf(ids, use_cache=True, logits_to_keep=1)
    _sync(cfg.device)
    return time.perf_counter() - t0


@torch.no_grad()
def _hf_decode(hf, prompt: list[int], cfg: EngineBenchConfig) -> float:
    out = hf(torch.tensor([prompt], device=cfg.device), use_cache=True, logits_to_keep=1)
    cache = out.cache
    tok = torch.tensor([[1]], device=cfg.device)
    cache = hf(tok, cache=cache, use_cache=True, logits_to_keep=1).cache   # warm-up
    _sync(cfg.device)
    t0 = time.perf_counter()
    for j in range(cfg.decode_steps):
        cache = hf(tok * (j % 7), cache=cache, use_cache=True, logits_to_keep=1).cache
    _sync(cfg.device)
    return (time.perf_counter() - t0) / cfg.decode_steps


def _to(batch, device: str):
    if device == "cpu":
        return batch
    from dataclasses import fields, replace
    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})


class _Stopwatch:
    """Wall time spent inside the given modules' forward (pre/post hooks)."""

    def __init__(self, modules, device: str):
        self.modules, self.device, self.seconds, self._t0, self._hooks = modules, device, 0.0, 0.0, []

    def __enter__(self):
        for m in self.modules:
            self._hooks.append(m.register_forward_pre_hook(self._start))
            self._hooks.append(m.register_forward_hook(self._stop))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _start(self, *_):
        _sync(self.device)
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        _sync(self.device)
        self.seconds += time.perf_counter() - self._t0


def format_table(res: dict) -> str:
    lines = [f"model: {res['model']}  dtype={res['dtype']}  threads={res['threads']}  "
             f"device={res['device']}  (speedup = transformers time / ours; > 1: we are faster)",
             "prefill (one prompt, logits of the last token)",
             f"{'tokens':>7} {'ours_ms':>9} {'ours_tok/s':>11} {'hf_ms':>9} {'hf_tok/s':>10} "
             f"{'speedup':>8}"]
    for r in res["prefill"]:
        lines.append(f"{r['tokens']:>7} {r['ours_ms']:>9.1f} {r['ours_tok_s']:>11.0f} "
                     f"{r['hf_ms']:>9.1f} {r['hf_tok_s']:>10.0f} {r['speedup']:>8.2f}")
    lines += ["decode (one token per step, after a prompt of `context` tokens)",
              f"{'context':>7} {'ours_ms/tok':>12} {'mamba_ms/tok':>13} {'hf_ms/tok':>10} "
              f"{'speedup':>8}"]
    for r in res["decode"]:
        lines.append(f"{r['context']:>7} {r['ours_ms_per_tok']:>12.2f} "
                     f"{r['ours_mamba_ms_per_tok']:>13.2f} {r['hf_ms_per_tok']:>10.2f} "
                     f"{r['speedup']:>8.2f}")
    return "\n".join(lines)
