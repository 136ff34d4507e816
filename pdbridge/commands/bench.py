"""`pdbridge bench transfer`: measure one request's transfer per strategy against the
transport's single-read limit and a per-(layer, block, segment) descriptor scheme.
`pdbridge bench engine`: our prefill and decode against transformers' (bench_engine.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys

STRATEGIES = ("direct", "staging", "permute")
CONV_LAYOUTS = ("DS", "SD")
MODES = ("pull", "push")
BENCHES = ("transfer", "engine", "serve")
ENGINE_DTYPES = ("float32", "bfloat16", "float16", "float64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    p = sub.add_parser("transfer", help="one request's transfer over NIXL, per strategy")
    p.add_argument("--model", required=True, help="a preset id (pdbridge.spec.PRESETS)")
    p.add_argument("--prefill-tp", type=int, required=True)
    p.add_argument("--decode-tp", type=int, required=True)
    p.add_argument("--tokens", required=True, help="comma-separated token counts, e.g. 512,4096")
    p.add_argument("--strategy", default="all", help=f"all or one of {', '.join(STRATEGIES)}")
    p.add_argument("--conv-layout", default="DS", help=f"one of {', '.join(CONV_LAYOUTS)}")
    p.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median)")
    p.add_argument("--no-layer-interleave", dest="layer_interleave", action="store_false",
                   help="one cache region per layer instead of per tensor shape (layers "
                        "interleaved, the default: few large reads per request)")
    p.add_argument("--mode", default="pull", help=f"comma-separated, of {', '.join(MODES)}: "
                   "push adds a phase timing pull against push from the end of prefill")
    p.add_argument("--layer-us-per-token", type=float, default=0.5,
                   help="push phase: simulated prefill compute per layer per token, in us "
                        "(default 0.5: 2 ms per layer at 4,096 tokens)")
    p.add_argument("--json", action="store_true", help="print rows as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write limit ratio vs tokens")
    _add_engine_arguments(sub)
    _add_serve_arguments(sub)


def _add_serve_arguments(sub) -> None:
    p = sub.add_parser("serve", help="concurrent HTTP clients: pdbridge up against one "
                       "serve --role both; TTFT, throughput, transfer stage / bare read",
                       description="Streams the same mixed-length requests through `pdbridge "
                       "up` (P/D) and one `pdbridge serve --role both`, each alone on the "
                       "machine, and prints TTFT p50/p99, output tokens/s and peak memory of "
                       "each, and the P/D transfer stage (and the decode ranks' own pull) "
                       "divided by one bare NIXL read + notification of the same bytes: in "
                       "place (every 2nd request's decode ranks time one first, where the "
                       "pull starts: `serve --floor-probe 2`; those requests are kept out "
                       "of the stage figures), and on agents of the bench's own, back to back "
                       "and after the run's mean gap between requests. Use --clients 1 for "
                       "the small-request ratio.")
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded "
                   "tiny model)")
    p.add_argument("--prefill-tp", type=int, default=1)
    p.add_argument("--decode-tp", type=int, default=2, help="also the both server's TP")
    p.add_argument("--clients", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--requests", type=int, default=64, help="requests per deployment")
    p.add_argument("--prompt-tokens", default="8,512", metavar="MIN,MAX",
                   help="prompt lengths, log-uniform in [MIN, MAX] (default 8,512)")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    p.add_argument("--num-blocks", type=int, default=512, help="cache blocks per server")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write the TTFT distributions")


def _add_engine_arguments(sub) -> None:
    p = sub.add_parser("engine", help="our prefill / decode tokens/s against transformers")
    p.add_argument("--model", default=None,
                   help="an HF checkpoint directory (default: a small random NemotronH)")
    p.add_argument("--tokens", default="512,2048,8192", help="comma-separated prompt lengths")
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(ENGINE_DTYPES)}")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both engines (default: torch's)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per prefill (median)")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps per context")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _fail(msg: str, bench: str = "transfer") -> int:
    sys.stderr.write(f"pdbridge bench {bench}: error: {msg}\n")
    return 2


def _tokens(text: str) -> tuple[int, ...] | None:
    try:
        tokens = tuple(int(t) for t in text.split(","))
    except ValueError:
        return None
    return tokens if tokens and min(tokens) >= 1 else None


def run(args) -> int:
    bench = getattr(args, "bench", None)
    if bench == "engine":
        return run_engine(args)
    if bench == "serve":
        return run_serve(args)
    if bench != "transfer":
        return _fail(f"choose a benchmark; allowed: {', '.join(BENCHES)}", bench or "")
    from pdbridge.spec import PRESETS
    if args.model not in PRESETS:
        return _fail(f"--model={args.model!r}; allowed: {', '.join(PRESETS)}")
    tokens = _tokens(args.tokens)
    if tokens is None:
        return _fail(f"--tokens={args.tokens!r}; allowed: comma-separated positive integers")
    if args.strategy != "all" and args.strategy not in STRATEGIES:
        return _fail(f"--strategy={args.strategy!r}; allowed: all, {', '.join(STRATEGIES)}")
    if args.conv_layout not in CONV_LAYOUTS:
        return _fail(f"--conv-layout={args.conv_layout!r}; allowed: {', '.join(CONV_LAYOUTS)}")
    for name in ("prefill_tp", "decode_tp", "reps"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')}={getattr(args, name)}; allowed: >= 1")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        return _fail(f"--plot={args.plot!r}: folder {os.path.dirname(os.path.abspath(args.plot))} "
                     f"does not exist (checked before the benchmark runs)")
    modes = tuple(m.strip() for m in args.mode.split(","))
    if not modes or any(m not in MODES for m in modes):
        return _fail(f"--mode={args.mode!r}; allowed: comma-separated of {', '.join(MODES)}")
    if args.layer_us_per_token <= 0:
        return _fail(f"--layer-us-per-token={args.layer_us_per_token}; allowed: > 0")
    from .bench_transfer import BenchConfig, run_bench
    strategies = STRATEGIES if args.strategy == "all" else (args.strategy,)
    cfg = BenchConfig(args.model, args.prefill_tp, args.decode_tp, tokens, strategies,
                      args.conv_layout, args.reps, args.layer_interleave)
    try:
        cfg.layouts()
    except ValueError as e:
        return _fail(str(e))
    rows = run_bench(cfg) if "pull" in modes else []
    push_rows = []
    if "push" in modes:
        from .bench_push import run_push_bench
        push_rows = run_push_bench(cfg, args.layer_us_per_token)
    if args.json:
        print(json.dumps(rows + push_rows if push_rows else rows, indent=1))
    else:
        if rows:
            _print_table(cfg, rows)
        if push_rows:
            _print_push_table(cfg, push_rows, args.layer_us_per_token)
    if args.plot:
        _plot(rows, args.plot)
    return 0


def run_engine(args) -> int:
    tokens = _tokens(args.tokens)
    if tokens is None:
        return _fail(f"--tokens={args.tokens!r}; allowed: comma-separated positive integers",
                     "engine")
    if args.dtype not in ENGINE_DTYPES:
        return _fail(f"--dtype={args.dtype!r}; allowed: {', '.join(ENGINE_DTYPES)}", "engine")
    for name in ("threads", "reps", "decode_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return _fail(f"--{name.replace('_', '-')}={v}; allowed: >= 1", "engine")
    import torch
    from .bench_engine import EngineBenchConfig, format_table, run_bench
    cfg = EngineBenchConfig(args.model, tokens, getattr(torch, args.dtype),
                            args.threads or torch.get_num_threads(), args.reps,
                            args.decode_steps, args.device)
    res = run_bench(cfg)
    print(json.dumps(res, indent=1) if args.json else format_table(res))
    return 0


def _print_table(cfg, rows) -> None:
    print(f"{cfg.model}  P={cfg.prefill_tp} -> D={cfg.decode_tp}  conv={cfg.conv_layout}  "
          f"layers {'interleaved' if cfg.layer_interleave else 'one region each'}  "
          f"(limit: one descriptor per source; per_block: one per (layer, block, segment))")
    head = (f"{'tokens':>7} {'strategy':>10} {'descs':>7} {'indices':>8} {'MiB':>9} "
            f"{'ms':>8} {'GB/s':>6} {'/limit':>7} {'vs per_block':>12}")
    print(head)
    for r in rows:
        print(f"{r['tokens']:>7} {r['strategy']:>10} {r['descriptors']:>7} {r['indices']:>8} "
              f"{r['nbytes'] / 2**20:>9.1f} {r['time_ms']:>8.2f} {r['gb_per_s']:>6.2f} "
              f"{r['limit_ratio']:>7.3f} {r['vs_per_block']:>12.2f}")


def _print_push_table(cfg, rows, us_per_token: float) -> None:
    print(f"\npull vs push: time from the end of prefill until the decode ranks hold all their "
          f"bytes (summed over decode ranks); one region per layer; prefill simulated at "
          f"{us_per_token:g} us per token per layer; /limit = single-read time / time "
          f"(push: > 1 when earlier layers' bytes were already there)")
    print(f"{'tokens':>7} {'mode':>5} {'strategy':>9} {'descs':>7} {'MiB':>9} {'prefill ms':>10} "
          f"{'ms after':>9} {'/limit':>7}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['mode']:>5} {r['strategy']:>9} {r['descriptors']:>7} "
              f"{r['nbytes'] / 2**20:>9.1f} {r['prefill_ms']:>10.1f} {r['time_ms']:>9.2f} "
              f"{r['limit_ratio']:>7.3f}")
    print("push: strategy direct only (staging and permute refused in push mode)")


def _plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in dict.fromkeys(r["strategy"] for r in rows):
        pts = [(r["tokens"], r["limit_ratio"]) for r in rows if r["strategy"] == s]
        ax.plot(*zip(*pts), marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("time of single-read limit / time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def run_serve(args) -> int:
    for name in ("prefill_tp", "decode_tp", "clients", "requests", "max_tokens", "num_blocks"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')}={getattr(args, name)}; allowed: >= 1",
                         "serve")
    lengths = _tokens(args.prompt_tokens)
    if lengths is None or len(lengths) != 2 or lengths[0] > lengths[1]:
        return _fail(f"--prompt-tokens={args.prompt_tokens!r}; allowed: MIN,MAX with "
                     "1 <= MIN <= MAX", "serve")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        return _fail(f"--model={args.model!r}: no config.json there", "serve")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        return _fail(f"--plot={args.plot!r}: folder does not exist", "serve")
    from .bench_serve import ServeBenchConfig, format_table, plot, run_bench
    cfg = ServeBenchConfig(args.clients, args.requests, lengths[0], lengths[1], args.max_tokens,
                           args.prefill_tp, args.decode_tp, args.model,
                           num_blocks=args.num_blocks)
    res = run_bench(cfg, progress=lambda m: print(f"[bench serve] {m}", file=sys.stderr,
                                                  flush=True))
    print(json.dumps(res, indent=1) if args.json else format_table(res))
    if args.plot:
        plot(res, args.plot)
    return 0
