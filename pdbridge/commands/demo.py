"""`pdbridge demo`: prompts through prefill (TP=P) -> NIXL transfer -> decode (TP=D), checked
token for token against one monolithic engine. The README's main job.

Prints per request: prompt and output tokens, whether the output matches the monolithic one,
time to first token split into prefill / transfer / first decode step, bytes, descriptors and
GB/s of the transfer; then a summary. Exits 1 if any output differs.
"""
from __future__ import annotations

import json
import os
import sys
import time

STRATEGIES = ("auto", "direct", "staging", "permute")
DEMO_TEXTS = [
    "Prefill here, decode there: the state must arrive intact.",
    "Mamba keeps a conv state and an SSM state per layer.",
    "Tensor parallel sizes need not divide each other.",
    "B and C groups are shared when n_groups is one.",
    "Hello, disaggregated world!",
    "The quick brown fox jumps over the lazy dog.",
    "Every decode rank reads exactly the bytes its shard needs.",
    "Attention KV is paged; recurrent state is one page per request.",
]


def add_arguments(parser) -> None:
    parser.add_argument("--model", metavar="DIR", help="HF model directory (config.json + "
                        "*.safetensors); default: the embedded tiny hybrid model")
    parser.add_argument("--prefill-tp", type=int, default=1, metavar="P", help="default 1")
    parser.add_argument("--decode-tp", default="2", metavar="D[,D2...]",
                        help="one decode engine per size, fed by the same prefill engine; "
                             "requests go to them in turn (default 2)")
    parser.add_argument("--strategy", default="auto", choices=STRATEGIES,
                        help="how decode ranks read Mamba conv state (default auto)")
    parser.add_argument("--transfer-mode", default="pull", choices=("pull", "push"),
                        help="pull: decode ranks read after the prefill (default); push: "
                             "prefill ranks write each layer into the decode blocks as the "
                             "prefill computes it (strategy direct; auto means direct)")
    parser.add_argument("--conv-layout", default="DS", choices=("SD", "DS"),
                        help="conv state layout of both engines (default DS)")
    parser.add_argument("--prefill-conv-layout", choices=("SD", "DS"),
                        help="prefill engine's conv layout, to bridge two layouts")
    parser.add_argument("--attn-layout", default="heads_across_blocks",
                        choices=("heads_outer", "tokens_outer", "heads_across_blocks"),
                        help="attention KV layout (default heads_across_blocks)")
    parser.add_argument("--layer-interleave", action="store_true",
                        help="prefill engine keeps one cache region per tensor shape with "
                             "layers interleaved (fewer, larger reads); decode keeps one per layer")
    parser.add_argument("--transport", default="nixl", choices=("nixl", "local"),
                        help="nixl (default); local needs every engine at TP=1")
    parser.add_argument("--checksums", action="store_true",
                        help="compare every transferred byte with the prefill side's xxh3_64 "
                             "digest; a mismatch recomputes (off by default)")
    parser.add_argument("--requests", type=int, default=4, metavar="N", help="default 4")
    parser.add_argument("--max-tokens", type=int, default=16, metavar="M", help="default 16")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _check(args) -> tuple[str, list[int]]:
    try:
        decode_tps = [int(x) for x in args.decode_tp.split(",") if x.strip()]
    except ValueError:
        return f"--decode-tp {args.decode_tp!r}: want comma-separated integers, e.g. 2 or 1,4", []
    if not decode_tps or min(decode_tps) < 1:
        return f"--decode-tp {args.decode_tp!r}: sizes must be >= 1", []
    if args.prefill_tp < 1:
        return f"--prefill-tp must be >= 1, got {args.prefill_tp}", []
    if args.transfer_mode == "push" and args.strategy not in ("direct", "auto"):
        return (f"--strategy {args.strategy} with --transfer-mode push; allowed: direct, auto", [])
    if args.requests < 1 or args.max_tokens < 1:
        return "--requests and --max-tokens must be >= 1", []
    if args.transport == "local" and (args.prefill_tp != 1 or decode_tps != [1] * len(decode_tps)):
        return "--transport local: every engine must be TP=1 (one process); use nixl", []
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        return f"--model {args.model!r}: no config.json there (want an HF model directory)", []
    return "", decode_tps


def run(args) -> int:
    error, decode_tps = _check(args)
    if error:
        print(f"pdbridge demo: {error}", file=sys.stderr)
        return 2
    import torch
    from pdbridge.engine.request import SamplingParams
    from pdbridge.spec import CacheConfig
    from pdbridge.model.default_model import model_dir as default_model_dir

    from pdbridge.commands.preflight import check_model
    torch.set_num_threads(1)
    error = check_model(args.model, [("--prefill-tp", args.prefill_tp),   # before any process
                                     *(("--decode-tp", tp) for tp in decode_tps)],
                        CacheConfig(conv_layout=args.conv_layout, attn_layout=args.attn_layout))
    if error:
        print(f"pdbridge demo: {error}", file=sys.stderr)
        return 2
    model = args.model or str(default_model_dir())
    prompts, tokenizer = _prompts(args.model, model, args.requests)
    blocks = args.requests * (-(-(max(map(len, prompts)) + args.max_tokens) // 16) + 2) + 4
    cache = dict(num_blocks=blocks, attn_layout=args.attn_layout)
    pre_cache = CacheConfig(conv_layout=args.prefill_conv_layout or args.conv_layout,
                            layer_interleave=args.layer_interleave, **cache)
    dec_cache = CacheConfig(conv_layout=args.conv_layout, **cache)
    sampling = SamplingParams(max_tokens=args.max_tokens)
    say = (lambda m: print(f"[demo] {m}", file=sys.stderr, flush=True))
    reference = _monolithic(model, prompts, sampling, dec_cache, say)
    records = _disaggregated(args, model, decode_tps, pre_cache, dec_cache, prompts, sampling, say)
    rows = [_row(r, ref, tokenizer) for r, ref in zip(records, reference)]
    summary = _summary(rows, args, decode_tps)
    if args.json:
        print(json.dumps({"summary": summary, "requests": rows}, indent=1))
    else:
        _print_table(rows, summary)
    return 0 if summary["matching"] == summary["requests"] else 1


def _prompts(user_model, model: str, n: int):
    from pdbridge.commands.generate import load_tokenizer
    tokenizer = load_tokenizer(user_model)
    if tokenizer is not None:
        texts = [DEMO_TEXTS[i % len(DEMO_TEXTS)] + (f" ({i // len(DEMO_TEXTS)})" if i >= len(DEMO_TEXTS) else "")
                 for i in range(n)]
        return [tokenizer.encode(t) for t in texts], tokenizer
    import random
    from pdbridge.spec import resolve_model
    vocab = resolve_model(model).vocab_size
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(8, 48))] for _ in range(n)], None


def _monolithic(model, prompts, sampling, cache, say):
    from pdbridge.engine.llm_engine import Engine
    say(f"monolithic engine (TP=1): {len(prompts)} requests")
    with Engine(model, 1, cache) as engine:
        return [o.token_ids for o in engine.generate(prompts, sampling)]


def _disaggregated(args, model, decode_tps, pre_cache, dec_cache, prompts, sampling, say):
    from pdbridge.serve.decode_node import DecodeNode
    from pdbridge.serve.prefill_node import PrefillNode
    from pdbridge.serve.router import PDRouter
    say(f"starting prefill engine (TP={args.prefill_tp}) and decode engines "
        f"(TP={','.join(map(str, decode_tps))}) over {args.transport}, {args.transfer_mode}")
    t0 = time.perf_counter()
    nodes = []
    try:
        prefill = PrefillNode(model, args.prefill_tp, pre_cache, transport=args.transport,
                              checksums=args.checksums)
        nodes.append(prefill)
        for d in decode_tps:
            nodes.append(DecodeNode(model, d, dec_cache, transport=args.transport,
                                    strategy=args.strategy, transfer_mode=args.transfer_mode,
                                    checksums=args.checksums))
        say(f"engines up in {time.perf_counter() - t0:.1f} s")
        return PDRouter(prefill, nodes[1:], progress=say).run(prompts, sampling)
    finally:
        for n in nodes:
            n.close()


def _row(rec, reference, tokenizer) -> dict:
    row = {
        "index": rec.index, "decode_engine": rec.decode_engine, "decode_tp": rec.decode_tp,
        "prompt_tokens": len(rec.prompt_ids), "output_tokens": len(rec.token_ids),
        "matches": rec.token_ids == reference, "strategy": ",".join(rec.strategies),
        "recomputed": rec.recomputed, "errors": rec.errors,
        "ttft_ms": 1e3 * rec.ttft_s, "prefill_ms": 1e3 * rec.prefill_s,
        "transfer_ms": 1e3 * rec.transfer_s, "first_step_ms": 1e3 * rec.first_step_s,
        "bytes": rec.nbytes, "descriptors": rec.descriptors, "gbps": rec.gbps,
        "prompt_token_ids": rec.prompt_ids, "token_ids": rec.token_ids,
        "monolithic_token_ids": reference,
    }
    if tokenizer is not None:
        row["text"] = tokenizer.decode(rec.token_ids)
    return row


def _summary(rows, args, decode_tps) -> dict:
    n = len(rows)
    mean = (lambda k: sum(r[k] for r in rows) / n)
    return {
        "model": args.model or "embedded default", "prefill_tp": args.prefill_tp,
        "decode_tp": decode_tps, "strategy": args.strategy, "conv_layout": args.conv_layout,
        "transport": args.transport, "transfer_mode": args.transfer_mode, "requests": n,
        "matching": sum(r["matches"] for r in rows),
        "recomputed": sum(r["recomputed"] for r in rows),
        "mean_ttft_ms": mean("ttft_ms"), "mean_prefill_ms": mean("prefill_ms"),
        "mean_transfer_ms": mean("transfer_ms"), "mean_first_step_ms": mean("first_step_ms"),
        "bytes": sum(r["bytes"] for r in rows), "descriptors": sum(r["descriptors"] for r in rows),
    }


def _print_table(rows, s) -> None:
    head = (f"{'req':>3} {'D':>2} {'prompt':>6} {'out':>4} {'match':>5} {'ttft ms':>8} "
            f"{'prefill':>8} {'xfer':>7} {'1st step':>8} {'KiB':>8} {'desc':>5} {'GB/s':>6}  strategy")
    print(head)
    for r in rows:
        print(f"{r['index']:>3} {r['decode_tp']:>2} {r['prompt_tokens']:>6} {r['output_tokens']:>4} "
              f"{'yes' if r['matches'] else 'NO':>5} {r['ttft_ms']:>8.1f} {r['prefill_ms']:>8.1f} "
              f"{r['transfer_ms']:>7.1f} {r['first_step_ms']:>8.1f} {r['bytes'] / 1024:>8.1f} "
              f"{r['descriptors']:>5} {r['gbps']:>6.3f}  {r['strategy']}"
              + ("  [recomputed: " + "; ".join(r["errors"]) + "]" if r["recomputed"] else ""))
        if "text" in r:
            print(f"      {r['text']!r}")
    print(f"\nsummary: {s['matching']}/{s['requests']} requests match the monolithic engine; "
          f"prefill TP={s['prefill_tp']} -> decode TP={','.join(map(str, s['decode_tp']))}, "
          f"strategy {s['strategy']}, conv {s['conv_layout']}, transport {s['transport']} "
          f"({s['transfer_mode']})")
    print(f"mean TTFT {s['mean_ttft_ms']:.1f} ms = prefill {s['mean_prefill_ms']:.1f} + transfer "
          f"{s['mean_transfer_ms']:.1f} + first decode step {s['mean_first_step_ms']:.1f}; "
          f"{s['bytes'] / 2**20:.2f} MiB in {s['descriptors']} descriptors; "
          f"{s['recomputed']} recomputed")
