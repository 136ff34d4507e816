"""`pdbridge bench transfer --mode ...,push`: pull against push, side by side, in one set of
processes, as the time from the END OF PREFILL to the decode rank holding all its bytes.

The prefill forward is simulated: layer l "computes" until `t0 + (l + 1) * layer_s` (its
transport progressed meanwhile), then in push mode its final runs are written at once
(plan.push_batches), so a slow write eats into the next layer's compute, never lengthens
it: the overlap a GPU's copy engines or NIC give, with the copies done here by UCX's
cross-process copy on the CPU. Prefill ends after the last layer's compute; push is done
when the decode rank has every prefill rank's notification (each sent once its writes
completed), on the host-wide monotonic clock both processes read. Pull starts when prefill
ends and takes its read time (bench_transfer._measure_once): the control hop that would
start it is not counted, in pull's favour. Regions are one per layer (layer_interleave
off): interleaved stacks are final only after their last layer, which would leave push
nothing to overlap. Per decode rank, one at a time; times are summed over decode ranks,
ratios are the single-read limit's time over each mode's, median over repetitions.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import statistics
import time

import numpy as np

from pdbridge.plan import push_batches

from .bench_transfer import (LIMIT, TIMEOUT_S, BenchConfig, _layouts, _log, _measure_once, _recv,
                             plan_for, scratch_sizes, stop_processes)

PUSH = "push:direct"


def push_config(cfg: BenchConfig) -> BenchConfig:
    return dataclasses.replace(cfg, layer_interleave=False)


def layer_seconds(cfg: BenchConfig, n: int, us_per_token: float) -> float:
    return us_per_token * 1e-6 * n


def _num_layers(cfg: BenchConfig) -> int:
    return len(_layouts(cfg)[0].model.layers)


# ---- rank processes ------------------------------------------------------------------------

def prefill_worker(cfg: BenchConfig, rank: int, conn) -> None:
    from pdbridge.transport.chunks import layout_zones
    from pdbridge.transport.copies import run_copies
    from pdbridge.transport.nixl import NixlTransport
    layout = _layouts(cfg)[0]
    regions = [np.full(r.nbytes, rank + 1, np.uint8) for r in layout.rank(rank).regions]
    scratch = np.ones(scratch_sizes(cfg)[0][rank], np.uint8)
    with NixlTransport(f"bench-P{rank}") as t:
        t.register_regions(regions, scratch, layout_zones(layout.rank(rank)))
        conn.send(t.metadata())
        for d, md in enumerate(conn.recv()):
            t.add_peer(f"bench-D{d}", md)
        while True:
            t.get_notifications()
            if not conn.poll(0.001):
                continue
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            if cmd[0] == "reorder":
                _, n, mode, j = cmd
                reorder = plan_for(cfg, n, mode, j).prefill_reorder.get(rank)
                t0 = time.perf_counter()
                if reorder is not None:
                    run_copies(reorder, regions, scratch)
                conn.send(time.perf_counter() - t0)
            else:
                _, n, j, layer_s = cmd
                conn.send(_push(t, cfg, rank, n, j, layer_s))


def _push(t, cfg: BenchConfig, rank: int, n: int, j: int, layer_s: float) -> float:
    """Simulated prefill with layer-by-layer writes to decode rank j; returns when (host
    monotonic clock) the prefill ended."""
    from pdbridge.transport.transport import ReadList
    plan = plan_for(cfg, n, "direct", j)
    batches = {b.after_layer: ReadList(plan.src_region[b.runs], plan.src_offset[b.runs],
                                       plan.dst_region[b.runs], plan.dst_offset[b.runs],
                                       plan.nbytes[b.runs])
               for b in push_batches(plan, _layouts(cfg)[0], rank)}
    peer, handles = f"bench-D{j}", []
    t0 = time.monotonic()
    for layer in range(_num_layers(cfg)):
        while time.monotonic() < t0 + (layer + 1) * layer_s:     # this layer computes
            for h in handles:
                t.poll(h)
            time.sleep(5e-5)            # a spinning rank would starve the others here
        if layer == _num_layers(cfg) - 1:
            t_end = time.monotonic()
        if layer in batches:
            handles.append(t.write(peer, batches[layer]))
    for h in handles:
        t.wait(h, TIMEOUT_S)
        t.release(h)
    t.notify(peer, b"pushed")
    return t_end


def decode_worker(cfg: BenchConfig, rank: int, conn) -> None:
    from pdbridge.transport.chunks import layout_zones
    from pdbridge.transport.nixl import NixlTransport
    layout = _layouts(cfg)[1]
    regions = [np.zeros(r.nbytes, np.uint8) for r in layout.rank(rank).regions]
    staging = np.zeros(scratch_sizes(cfg)[1], np.uint8)
    with NixlTransport(f"bench-D{rank}") as t:
        t.register_regions(regions, staging, layout_zones(layout.rank(rank)))
        conn.send(t.metadata())
        for p, md in enumerate(conn.recv()):
            t.add_peer(f"bench-P{p}", md)
        while True:
            t.get_notifications()       # passive progress: push writes land here
            if not conn.poll(0.001):
                continue
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            if cmd[0] == "measure":
                _, n, mode = cmd
                conn.send(_measure_once(t, plan_for(cfg, n, mode, rank), mode, regions, staging))
            else:
                _, n, sources = cmd
                conn.send(_await_pushes(t, sources))


def _await_pushes(t, sources: int) -> float:
    got, deadline = 0, time.monotonic() + TIMEOUT_S
    while got < sources:
        got += sum(m == b"pushed" for _, m in t.get_notifications())
        if time.monotonic() > deadline:
            raise TimeoutError("pushes did not arrive")
    return time.monotonic()


# ---- driver --------------------------------------------------------------------------------

def run_push_bench(cfg: BenchConfig, us_per_token: float) -> list[dict]:
    """Rows: per token count, the limit, pull per strategy and push (direct), one layout."""
    cfg = push_config(cfg)
    modes = (LIMIT, *cfg.strategies)
    ctx = mp.get_context("spawn")
    procs, pconns, dconns = [], [], []
    try:
        for count, target, conns in ((cfg.prefill_tp, prefill_worker, pconns),
                                     (cfg.decode_tp, decode_worker, dconns)):
            for r in range(count):
                parent, child = ctx.Pipe()
                procs.append(ctx.Process(target=target, args=(cfg, r, child), daemon=True))
                conns.append(parent)
        for pr in procs:
            pr.start()
        _log(f"push phase: {cfg.prefill_tp} prefill and {cfg.decode_tp} decode processes, "
             f"one region per layer, prefill {us_per_token:g} us per token per layer")
        pmd, dmd = [_recv(c) for c in pconns], [_recv(c) for c in dconns]
        for c in pconns:
            c.send(dmd)
        for c in dconns:
            c.send(pmd)
        rows = []
        for n in cfg.tokens:
            rows += _measure(cfg, n, modes, layer_seconds(cfg, n, us_per_token), pconns, dconns)
        return rows
    finally:
        stop_processes(pconns + dconns, procs)


def _measure(cfg: BenchConfig, n: int, modes: tuple[str, ...], layer_s: float, pconns,
             dconns) -> list[dict]:
    per_rep = {m: [] for m in (*modes, PUSH)}
    info = {m: {"descriptors": 0, "nbytes": 0} for m in per_rep}
    for rep in range(cfg.reps + 1):             # the first repetition warms up, dropped
        for m in per_rep:
            total = 0.0
            for j, dc in enumerate(dconns):
                plan = plan_for(cfg, n, "direct" if m == PUSH else m, j)
                total += _push_once(plan, j, n, layer_s, pconns, dc) if m == PUSH else \
                    _pull_once(m, n, j, pconns, dc)
                if rep == 0:
                    info[m]["descriptors"] += 1 if m == LIMIT else plan.num_descriptors
                    info[m]["nbytes"] += plan.total_nbytes
            if rep:
                per_rep[m].append(total)
    rows = []
    for m, times in per_rep.items():
        ratio = statistics.median(lim / t for lim, t in zip(per_rep[LIMIT], times))
        mode, strategy = ("push", "direct") if m == PUSH else ("pull", m)
        rows.append({"tokens": n, "mode": mode, "strategy": strategy, **info[m],
                     "time_ms": statistics.median(times) * 1e3, "limit_ratio": ratio,
                     "prefill_ms": layer_s * _num_layers(cfg) * 1e3})
        _log(f"tokens={n} {mode} {strategy}: {rows[-1]['time_ms']:.2f} ms after prefill, "
             f"{ratio:.3f} of the limit")
    return rows


def _pull_once(mode: str, n: int, j: int, pconns, dc) -> float:
    for pc in pconns:
        pc.send(("reorder", n, mode, j))
    reorder_s = max(_recv(pc) for pc in pconns)
    dc.send(("measure", n, mode))
    return _recv(dc)["time_s"] + reorder_s


def _push_once(plan, j: int, n: int, layer_s: float, pconns, dc) -> float:
    sources = plan.source_ranks()
    dc.send(("await", n, len(sources)))
    for p in sources:
        pconns[p].send(("push", n, j, layer_s))
    t_end = max(_recv(pconns[p]) for p in sources)
    return max(0.0, _recv(dc) - t_end)
