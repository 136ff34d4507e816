"""How much faster is the fast prefill path than the per-token oracle it replaces, for Jamba's
Mamba1 (chunked parallel selective scan vs ScanImpl.RECURRENT) and LFM2's short conv (one conv1d
per chunk vs ConvImpl.RECURRENT), and how does our prefill compare with transformers' on the same
checkpoint? Prompt prefill from empty state, medians of interleaved runs, one thread, fp32.
Random small checkpoints (from_config + save_pretrained into a temporary directory): nothing is
downloaded.

    .venv/bin/python benchmarks/mamba1_short_conv_speed.py [--tokens 512,2048] [--reps 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

JAMBA = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=3,
             expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
             mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=16)
LFM2 = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, conv_L_cache=3,
            layer_types=["conv", "conv", "full_attention", "conv"])


def _checkpoint(kind: str, root: str) -> str:
    import transformers as tf
    cfg = tf.JambaConfig(**JAMBA) if kind == "jamba" else tf.Lfm2Config(**LFM2)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(f"{root}/{kind}")
    return f"{root}/{kind}"


@torch.no_grad()
def _ours(model, prompt):
    from pdbridge.model import DenseCaches, ForwardBatch
    caches = DenseCaches(model.spec, num_blocks=len(prompt) // 16 + 2, block_tokens=16)
    batch = ForwardBatch.build([prompt], [0], [list(range(caches.num_blocks))], [0])
    t0 = time.perf_counter()
    model(batch, caches)
    return time.perf_counter() - t0


@torch.no_grad()
def _hf(model, prompt):
    t0 = time.perf_counter()
    model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def main() -> None:
    import transformers as tf
    from pdbridge.model import load_model
    from pdbridge.model.mamba1 import use_scan1
    from pdbridge.model.mamba2 import ScanImpl
    from pdbridge.model.short_conv import ConvImpl, use_conv_impl
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':>6} {'tokens':>6} {'fast_s':>8} {'oracle_s':>9} {'hf_s':>7} "
          f"{'oracle/fast':>11} {'hf/fast':>8}")
    with tempfile.TemporaryDirectory() as root:
        for kind in ("jamba", "lfm2"):
            d = _checkpoint(kind, root)
            fast, slow = load_model(d), load_model(d)
            if kind == "jamba":
                use_scan1(slow, ScanImpl.RECURRENT)
            else:
                use_conv_impl(slow, ConvImpl.RECURRENT)
            hf = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for n in (int(t) for t in args.tokens.split(",")):
                prompt = [(7 * i + 3) % 1024 for i in range(n)]
                runs = [(_ours(fast, prompt), _ours(slow, prompt), _hf(hf, prompt))
                        for _ in range(args.reps + 1)][1:]          # first round: warm-up
                f, s, h = (statistics.median(r[k] for r in runs) for k in range(3))
                print(f"{kind:>6} {n:>6} {f:>8.3f} {s:>9.3f} {h:>7.3f} {s / f:>11.2f} {h / f:>8.2f}")


if __name__ == "__main__":
    main()
