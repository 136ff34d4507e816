"""`pdbridge plan`: the transfer plan between a prefill and a decode TP size, per decode rank.

Module level imports stdlib only (pdbridge/cli.py imports every command to build its parser).
The JSON output is documented in docs/plan-json.md.
"""
from __future__ import annotations

import argparse
import json
import sys

STRATEGIES = ("direct", "staging", "permute", "auto")
CONCRETE = ("direct", "staging", "permute")
ATTN_LAYOUTS = ("heads_outer", "tokens_outer", "heads_across_blocks")


MAX_TOKENS = 1 << 20         # a 1M-token context: the longest any supported model is built for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="preset id or path to a config.json / model directory")
    parser.add_argument("--prefill-tp", type=int, default=1, metavar="P")
    parser.add_argument("--decode-tp", type=int, default=1, metavar="D")
    parser.add_argument("--strategy", choices=STRATEGIES, default="direct")
    parser.add_argument("--conv-layout", choices=("SD", "DS"), default="DS")
    parser.add_argument("--attn-layout", choices=ATTN_LAYOUTS, default="heads_outer")
    parser.add_argument("--layer-interleave", action="store_true",
                        help="one cache region per tensor shape with layers interleaved "
                             "(a rank's share of a segment is one run across all layers)")
    parser.add_argument("--page-padding", action="store_true",
                        help="pad state and attention pages to one size, deriving block "
                             "tokens from it, as hybrid engines do")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens transferred")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--list-models", action="store_true", help="list the model presets")
    parser.set_defaults(_parser=parser)


def run(args: argparse.Namespace) -> int:
    from pdbridge.spec import PRESETS, get_preset
    if args.list_models:
        for name in PRESETS:
            print(f"{name:28s} {get_preset(name).pattern()}")
        return 0
    try:
        report = build_report(args)
    except ValueError as e:         # ConfigError, LayoutError and bad sizes are ValueErrors
        args._parser.error(str(e))
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_report(report)
    return 0


def _layouts(args):
    from pdbridge.spec import CacheConfig, EngineLayout, resolve_model
    if not args.model:
        raise ValueError("--model is required (a preset id, see --list-models, or a config path)")
    if not 1 <= args.tokens <= MAX_TOKENS:
        raise ValueError(f"--tokens={args.tokens}; allowed: 1..{MAX_TOKENS} (the plan's arrays "
                         f"grow with the blocks: 10M tokens took 5.8 GB)")
    spec = resolve_model(args.model)
    cache = dict(conv_layout=args.conv_layout, attn_layout=args.attn_layout,
                 layer_interleave=args.layer_interleave, page_padding=args.page_padding)
    out = []
    for tp in (args.prefill_tp, args.decode_tp):
        probe = EngineLayout(spec, tp, CacheConfig(num_blocks=1, **cache))
        num_blocks = -(-args.tokens // probe.block_tokens) + 1    # + the state block
        out.append(EngineLayout(spec, tp, CacheConfig(num_blocks=num_blocks, **cache)))
    return spec, out[0], out[1]


def build_report(args) -> dict:
    from pdbridge.plan import CostModel, RequestBlocks, plan_transfer
    spec, prefill, decode = _layouts(args)
    blocks = [RequestBlocks(args.tokens, tuple(range(l.num_blocks - 1)), l.num_blocks - 1)
              for l in (prefill, decode)]
    model = CostModel()
    ranks, per_strategy = [], {s: [] for s in CONCRETE}
    for j in range(decode.tp_size):
        plans = {s: plan_transfer(prefill, decode, j, *blocks, s) for s in CONCRETE}
        for s, p in plans.items():
            per_strategy[s].append(p)
        chosen = min(plans.values(), key=model.plan_us) if args.strategy == "auto" \
            else plans[args.strategy]
        ranks.append(_rank_entry(chosen))
    minimal = sum(r["minimal_nbytes"] for r in ranks)
    return {
        "model": spec.name or args.model, "pattern": spec.pattern(),
        "prefill_tp": prefill.tp_size, "decode_tp": decode.tp_size, "tokens": args.tokens,
        "strategy": args.strategy,
        "prefill": _layout_entry(prefill), "decode": _layout_entry(decode),
        "decode_ranks": ranks,
        "totals": _totals(ranks, minimal),
        "strategies": [{**_totals([_rank_entry(p) for p in plans], minimal), "strategy": s,
                        "estimated_us": round(sum(model.plan_us(p) for p in plans), 1)}
                       for s, plans in per_strategy.items()],
    }


def _layout_entry(layout) -> dict:
    return {"tp_size": layout.tp_size, "block_tokens": layout.block_tokens,
            "kernel_block_tokens": layout.kernel_block_tokens,
            "conv_layout": layout.cache.conv_layout.value,
            "attn_layout": layout.cache.attn_layout.value}


def _rank_entry(plan) -> dict:
    return {
        "decode_rank": plan.decode_rank, "strategy": plan.strategy.value,
        "sources": plan.source_ranks(), "descriptors": plan.num_descriptors,
        "nbytes": plan.total_nbytes, "minimal_nbytes": plan.minimal_nbytes,
        "staging_nbytes": plan.staging_nbytes,
        "prefill_scratch_nbytes": {str(k): v for k, v in plan.prefill_scratch_nbytes.items()},
        "restore_copies": len(plan.decode_restore),
        "groups": [{"decode_rank": plan.decode_rank, "layer": g.layer, "tensor": g.tensor,
                    "segment": g.segment, "prefill_rank": g.prefill_rank,
                    "global_range": list(g.global_range), "nbytes": g.nbytes,
                    "descriptors": g.descriptors} for g in plan.groups],
    }


def _totals(ranks: list[dict], minimal: int) -> dict:
    nbytes = sum(r["nbytes"] for r in ranks)
    return {"descriptors": sum(r["descriptors"] for r in ranks), "nbytes": nbytes,
            "minimal_nbytes": minimal, "ratio": round(nbytes / minimal, 4) if minimal else 1.0}


# ---- text output ---------------------------------------------------------------------------

def print_report(r: dict) -> None:
    p, d = r["prefill"], r["decode"]
    print(f"{r['model']}: prefill TP {r['prefill_tp']} -> decode TP {r['decode_tp']}, "
          f"{r['tokens']} tokens, strategy {r['strategy']}")
    print(f"  block tokens P {p['block_tokens']} / D {d['block_tokens']}, conv {d['conv_layout']}, "
          f"attention {d['attn_layout']}")
    for rank in r["decode_ranks"]:
        print(f"\ndecode rank {rank['decode_rank']} ({rank['strategy']}): sources "
              f"{', '.join(f'P{s}' for s in rank['sources'])}; {rank['descriptors']} descriptors, "
              f"{_size(rank['nbytes'])} (minimal {_size(rank['minimal_nbytes'])})")
        for line in _group_lines(rank["groups"], r["pattern"]):
            print("  " + line)
    t = r["totals"]
    print(f"\ntotal: {t['descriptors']} descriptors, {_size(t['nbytes'])}, "
          f"{t['ratio']:.3f} x minimal")
    print(f"\n{'strategy':10s} {'descriptors':>11s} {'bytes':>11s} {'x minimal':>9s} {'est. us':>9s}")
    for s in r["strategies"]:
        print(f"{s['strategy']:10s} {s['descriptors']:11d} {_size(s['nbytes']):>11s} "
              f"{s['ratio']:9.3f} {s['estimated_us']:9.1f}")


_KIND = {"M": "mamba2", "m": "mamba1", "G": "gated_delta_net", "C": "short_conv",
         "*": "attention", "F": "hybrid"}


def _group_lines(groups: list[dict], pattern: str) -> list[str]:
    """Layers with identical reads share one line."""
    similar: dict[tuple, list[int]] = {}
    for g in groups:
        key = (g["tensor"], g["segment"], g["prefill_rank"], tuple(g["global_range"]),
               g["nbytes"], g["descriptors"])
        similar.setdefault(key, []).append(g["layer"])
    lines = []
    for (tensor, seg, src, (a, b), nbytes, desc), layers in similar.items():
        kind = _KIND.get(pattern[layers[0]], "layer") if layers[0] < len(pattern) else "layer"
        lines.append(f"{_layers(layers, kind):34s} {tensor}.{seg:9s} P{src} units [{a}, {b}) "
                     f"{_size(nbytes):>10s} {desc} desc")
    return lines


def _layers(layers: list[int], kind: str) -> str:
    if len(layers) == 1:
        return f"layer {layers[0]} ({kind})"
    shown = ",".join(map(str, layers[:3])) + (",.." if len(layers) > 3 else "")
    return f"layers {shown} ({len(layers)} {kind})"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
