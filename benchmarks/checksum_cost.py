"""What do transfer checksums cost? One request's pull over NIXL, nemotron-h-8b, prefill TP 1
-> decode TP 2, at 512 and 4,096 tokens: the pull alone against the pull plus both checksum
sides (engine/checksums.py: the prefill ranks digest their source ranges, the decode ranks
plan the direct mapping if needed and digest their destination ranges).

Every agent lives in this process and the decode ranks run one after the other (the machine
has few cores), so each time is a sum over decode ranks of per-rank medians, as in
`pdbridge bench transfer`. On a deployment the prefill ranks digest in parallel, and the
decode ranks verify in parallel; host buffers here (device buffers copy one run at a time).
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

from pdbridge.commands.bench_transfer import BenchConfig, request_blocks
from pdbridge.engine import checksums
from pdbridge.plan import plan_transfer
from pdbridge.transport.chunks import layout_zones
from pdbridge.transport.copies import execute_plan
from pdbridge.transport.nixl import NixlTransport


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
    ap.add_argument("--prefill-tp", type=int, default=1)
    ap.add_argument("--decode-tp", type=int, default=2)
    ap.add_argument("--tokens", default="512,4096")
    ap.add_argument("--strategy", default="direct")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    cfg = BenchConfig(args.model, args.prefill_tp, args.decode_tp, tokens, (args.strategy,))
    p_layout, d_layout = cfg.layouts()
    rng = np.random.default_rng(0)
    p_regions = [[rng.integers(0, 256, r.nbytes, np.uint8) for r in p_layout.rank(p).regions]
                 for p in range(p_layout.tp_size)]
    d_regions = [[np.zeros(r.nbytes, np.uint8) for r in d_layout.rank(j).regions]
                 for j in range(d_layout.tp_size)]
    staging = [np.zeros(64 << 20, np.uint8) for _ in range(d_layout.tp_size)]
    p_agents = [NixlTransport(f"ck-P{p}") for p in range(p_layout.tp_size)]
    d_agents = [NixlTransport(f"ck-D{j}") for j in range(d_layout.tp_size)]
    try:
        for p, t in enumerate(p_agents):
            t.register_regions(p_regions[p], None, layout_zones(p_layout.rank(p)))
        for j, t in enumerate(d_agents):
            t.register_regions(d_regions[j], staging[j], layout_zones(d_layout.rank(j)))
            for p, pt in enumerate(p_agents):
                t.add_peer(f"ck-P{p}", pt.metadata())
        peers = {p: f"ck-P{p}" for p in range(p_layout.tp_size)}
        stop = threading.Event()

        def progress():             # the passive side must progress about every ms
            while not stop.is_set():
                for pt in p_agents:
                    pt.get_notifications()
                time.sleep(0.001)
        threading.Thread(target=progress, daemon=True).start()
        print(f"{args.model}: prefill TP {args.prefill_tp} -> decode TP {args.decode_tp}, "
              f"{args.strategy}, {checksums.ALGORITHM}, medians of {args.reps}")
        print(f"{'tokens':>7} {'MiB':>8} {'pull ms':>9} {'+checksums ms':>14} {'ratio':>6}")
        for n in tokens:
            pb, db = request_blocks(p_layout, n), request_blocks(d_layout, n)
            plain = with_ck = 0.0
            nbytes = 0
            for j, t in enumerate(d_agents):
                plan = plan_transfer(p_layout, d_layout, j, pb, db, args.strategy)
                nbytes += plan.total_nbytes

                def pull():
                    execute_plan(t, plan, peers, d_regions[j], staging[j], 120.0)

                def pull_checked():
                    digests = {}
                    for p in plan.source_ranks():      # prefill side (DigestReads)
                        ck = checksums.checksum_plan(p_layout, d_layout, j, pb, db)
                        digests[p] = checksums.source_digest(ck, p, p_regions[p])
                    pull()
                    ck = checksums.checksum_plan(p_layout, d_layout, j, pb, db, plan=plan)
                    checksums.verify(ck, d_regions[j], digests)
                pull_checked()                          # warm, and it must verify
                plain += _median_s(pull, args.reps)
                with_ck += _median_s(pull_checked, args.reps)
            print(f"{n:>7} {nbytes / 2**20:>8.1f} {plain * 1e3:>9.2f} {with_ck * 1e3:>14.2f} "
                  f"{with_ck / plain:>6.2f}")
        stop.set()
    finally:
        for t in d_agents + p_agents:
            t.close()


if __name__ == "__main__":
    main()
