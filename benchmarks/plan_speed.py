"""How long does planning one request take? nemotron-h-8b, 32k tokens, prefill TP 2 -> decode
TP 4, every decode rank, `direct` and `auto` (which builds all three strategies).

Printed side by side with the time to merely copy the resulting plan arrays (numpy), the floor
for anything that produces them. Target: under 50 ms per decode-rank plan.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pdbridge.plan import RequestBlocks, plan_transfer
from pdbridge.spec import CacheConfig, EngineLayout, get_preset


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nemotron-h-8b")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--prefill-tp", type=int, default=2)
    ap.add_argument("--decode-tp", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    spec = get_preset(args.model)
    layouts = []
    for tp in (args.prefill_tp, args.decode_tp):
        bt = EngineLayout(spec, tp).block_tokens
        layouts.append(EngineLayout(spec, tp, CacheConfig(num_blocks=-(-args.tokens // bt) + 1)))
    prefill, decode = layouts
    blocks = [RequestBlocks(args.tokens, tuple(range(l.num_blocks - 1)), l.num_blocks - 1)
              for l in layouts]
    for l in layouts:                 # build the per-rank layouts once, as an engine would
        for r in range(l.tp_size):
            l.rank(r)
    print(f"{args.model}, {args.tokens} tokens, prefill TP {args.prefill_tp} -> decode TP "
          f"{args.decode_tp}, median of {args.repeats}")
    print(f"{'strategy':9s} {'rank':>4s} {'descriptors':>11s} {'ms / plan':>9s} "
          f"{'ms copy arrays':>14s} {'ratio':>7s}")
    for strategy in ("direct", "auto"):
        for j in range(decode.tp_size):
            plan_s = _median_s(lambda: plan_transfer(prefill, decode, j, *blocks, strategy),
                               args.repeats)
            plan = plan_transfer(prefill, decode, j, *blocks, strategy)
            arrays = (plan.src_rank, plan.src_region, plan.src_offset, plan.dst_region,
                      plan.dst_offset, plan.nbytes)
            copy_s = _median_s(lambda: [np.copy(a) for a in arrays], args.repeats)
            print(f"{strategy:9s} {j:4d} {plan.num_descriptors:11d} {plan_s * 1e3:9.2f} "
                  f"{copy_s * 1e3:14.3f} {plan_s / copy_s:7.0f}")


if __name__ == "__main__":
    main()
