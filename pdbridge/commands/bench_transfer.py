"""`pdbridge bench transfer`: one request's transfer, measured per strategy over NIXL.

Prefill and decode ranks are separate processes holding full-size per-rank buffers laid out
by EngineLayout (heads_across_blocks attention, page padding, contiguous block ids). The
parent drives them one decode rank at a time (the machine has few cores; concurrent ranks
would measure the scheduler), so each time is a sum over decode ranks of per-rank medians.
Each strategy is compared, in the same run and between the same processes, with
* `limit`: one single-descriptor read per (decode rank, source rank) of the same bytes,
  scratch to scratch: what the transport can do at best;
* `per_block`: the direct reads split at every (layer, block, segment) boundary and issued
  unmerged, one descriptor each, as established connectors issue them.
A strategy's time covers index building, submission, completion, decode_restore and (for
permute) the prefill reorder.
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from pdbridge.plan import SCRATCH, RequestBlocks, Strategy, TransferPlan, plan_transfer
from pdbridge.plan.direct_reads import direct_reads
from pdbridge.spec import BLOCK, CacheConfig, EngineLayout, get_preset

TIMEOUT_S = 120.0
LIMIT, PER_BLOCK = "limit", "per_block"


@dataclass(frozen=True)
class BenchConfig:
    model: str
    prefill_tp: int
    decode_tp: int
    tokens: tuple[int, ...]
    strategies: tuple[str, ...]
    conv_layout: str = "DS"
    reps: int = 5
    layer_interleave: bool = True       # one region per tensor shape (EngineLayout docstring)

    def layouts(self, layer_interleave: bool | None = None) -> tuple[EngineLayout, EngineLayout]:
        """(prefill, decode) layouts; the per-block baseline runs on one region per layer,
        the layout established connectors use."""
        spec = get_preset(self.model)
        interleave = self.layer_interleave if layer_interleave is None else layer_interleave
        out = []
        for tp in (self.prefill_tp, self.decode_tp):
            cache = CacheConfig(num_blocks=1, conv_layout=self.conv_layout,
                                attn_layout="heads_across_blocks", page_padding=True,
                                layer_interleave=interleave)
            bt = EngineLayout(spec, tp, cache).block_tokens
            blocks = -(-max(self.tokens) // bt) + 1          # + the state block
            out.append(EngineLayout(spec, tp, dataclasses.replace(cache, num_blocks=blocks)))
        return out[0], out[1]


@functools.lru_cache(maxsize=None)
def _layouts(cfg: BenchConfig) -> tuple[EngineLayout, EngineLayout]:
    return cfg.layouts()


def request_blocks(layout: EngineLayout, num_tokens: int) -> RequestBlocks:
    """Contiguous attention blocks from 0 (what a run-handing allocator gives), last = state."""
    n = -(-num_tokens // layout.block_tokens)
    return RequestBlocks(num_tokens, tuple(range(n)), layout.num_blocks - 1)


@functools.lru_cache(maxsize=None)
def plan_for(cfg: BenchConfig, num_tokens: int, mode: str, decode_rank: int) -> TransferPlan:
    p, d = _layouts(cfg)
    pb, db = request_blocks(p, num_tokens), request_blocks(d, num_tokens)
    if mode == PER_BLOCK:
        return per_block_plan(p, d, decode_rank, pb, db)
    return plan_transfer(p, d, decode_rank, pb, db, "direct" if mode == LIMIT else mode)


def per_block_plan(p: EngineLayout, d: EngineLayout, decode_rank: int, pb: RequestBlocks,
                   db: RequestBlocks) -> TransferPlan:
    """Direct reads, one per (layer, block, segment): paged runs cut at every block boundary
    of either side, state runs left per (layer, tensor, segment) as produced."""
    direct = direct_reads(p, d, decode_rank, pb, db)
    paged = direct.paged.coalesced()
    period_p = {tl.region: tl.axis(BLOCK).stride * p.kernel_blocks_per_block
                for r in range(p.tp_size) for tl in p.rank(r).tensors if tl.tensor.paged}
    period_d = {tl.region: tl.axis(BLOCK).stride * d.kernel_blocks_per_block
                for tl in d.rank(decode_rank).tensors if tl.tensor.paged}
    cols: list[list[int]] = [[] for _ in range(6)]
    for rank, sr, so, dr, do, n in zip(*(getattr(paged, f).tolist() for f in (
            "src_rank", "src_region", "src_offset", "dst_region", "dst_offset", "nbytes"))):
        while n > 0:
            step = min(n, period_p[sr] - so % period_p[sr], period_d[dr] - do % period_d[dr])
            for c, v in zip(cols, (rank, sr, so, dr, do, step)):
                c.append(v)
            so, do, n = so + step, do + step, n - step
    s = direct.state
    arr = [np.concatenate([np.asarray(c, dt), getattr(s, f).astype(dt)]) for c, f, dt in zip(
        cols, ("src_rank", "src_region", "src_offset", "dst_region", "dst_offset", "nbytes"),
        (np.int32, np.int32, np.int64, np.int32, np.int64, np.int64))]
    return TransferPlan(decode_rank, Strategy.DIRECT, *arr, minimal_nbytes=direct.minimal_nbytes)


def scratch_sizes(cfg: BenchConfig) -> tuple[dict[int, int], int]:
    """Prefill scratch per rank and decode staging: the largest any measured read needs."""
    pre = {p: 1 for p in range(cfg.prefill_tp)}
    stage = 1
    for n in cfg.tokens:
        for j in range(cfg.decode_tp):
            plan = plan_for(cfg, n, "direct", j)
            for p in plan.source_ranks():
                nb = int(plan.nbytes[plan.src_rank == p].sum())
                pre[p], stage = max(pre[p], nb), max(stage, nb)
            for s in cfg.strategies:
                plan = plan_for(cfg, n, s, j)
                stage = max(stage, plan.staging_nbytes)
                for p, nb in plan.prefill_scratch_nbytes.items():
                    pre[p] = max(pre[p], nb)
    return pre, stage


def _log(msg: str) -> None:
    sys.stderr.write(f"[bench transfer] {msg}\n")
    sys.stderr.flush()


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
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            t.get_notifications()          # passive progress (REFERENCE.md: every ~1 ms)
            if not conn.poll(0.001):
                continue
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            _, n, mode, j = cmd
            reorder = plan_for(cfg, n, mode, j).prefill_reorder.get(rank)
            t0 = time.perf_counter()
            if reorder is not None:
                run_copies(reorder, regions, scratch)
            conn.send(time.perf_counter() - t0)


def decode_worker(cfg: BenchConfig, rank: int, conn) -> None:
    from pdbridge.transport.chunks import layout_zones
    from pdbridge.transport.nixl import NixlTransport
    layout = _layouts(cfg)[1]
    regions = [np.zeros(r.nbytes, np.uint8) for r in layout.rank(rank).regions]
    staging = np.zeros(scratch_sizes(cfg)[1], np.uint8)
    with NixlTransport(f"bench-D{rank}") as t:
        t.register_regions(regions, staging, layout_zones(layout.rank(rank)))
        for p, md in enumerate(conn.recv()):
            t.add_peer(f"bench-P{p}", md)
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            _, n, mode = cmd
            plan = plan_for(cfg, n, mode, rank)
            conn.send(_measure_once(t, plan, mode, regions, staging))


def _measure_once(t, plan: TransferPlan, mode: str, regions, staging) -> dict:
    from pdbridge.transport.copies import run_copies
    from pdbridge.transport.transport import ReadList
    if mode == LIMIT:
        lists = {p: _single(int(plan.nbytes[plan.src_rank == p].sum())) for p in plan.source_ranks()}
    else:
        lists = {p: ReadList.from_plan(plan, p) for p in plan.source_ranks()}
    if mode == PER_BLOCK:       # its lists are prepared ahead, as connectors do at start-up
        prepared = [t.prepare_reads(f"bench-P{p}", rl) for p, rl in lists.items()]
        t0 = time.perf_counter()
        handles = [t.read_prepared(pr, b"done", merge=False) for pr in prepared]
        for h in handles:
            t.wait(h, TIMEOUT_S)
        elapsed = time.perf_counter() - t0
        for h in handles:
            t.release(h)
        n = sum(len(r) for r in lists.values())
        return {"time_s": elapsed, "descriptors": n, "indices": n,
                "nbytes": sum(r.total_nbytes for r in lists.values())}
    t0 = time.perf_counter()
    handles, indices = [], 0
    for p, rl in lists.items():
        si, di = t.indices(f"bench-P{p}", rl)
        indices += len(si)
        handles.append(t.read_indices(f"bench-P{p}", si, di, b"done", len(rl), rl.total_nbytes,
                                      merge=True))
    for h in handles:
        t.wait(h, TIMEOUT_S)
    if mode not in (LIMIT, PER_BLOCK):
        run_copies(plan.decode_restore, regions, staging)
    elapsed = time.perf_counter() - t0
    for h in handles:
        t.release(h)
    return {"time_s": elapsed, "descriptors": sum(len(r) for r in lists.values()),
            "indices": indices, "nbytes": sum(r.total_nbytes for r in lists.values())}


def _single(nbytes: int):
    from pdbridge.transport.transport import ReadList
    one = lambda v, dt: np.asarray([v], dt)   # noqa: E731
    return ReadList(one(SCRATCH, np.int32), one(0, np.int64), one(SCRATCH, np.int32),
                    one(0, np.int64), one(nbytes, np.int64))


# ---- driver --------------------------------------------------------------------------------

def run_bench(cfg: BenchConfig) -> list[dict]:
    """Our strategies against the single-read limit, and the per-(layer, block, segment)
    baseline against its own limit. With layers interleaved the baseline runs on the
    layout connectors use (one region per layer), in a second set of processes, since a
    per-layer scheme over interleaved layers would be needlessly fragmented."""
    if not cfg.layer_interleave:
        return _rows(_run_phase(cfg, (LIMIT, PER_BLOCK, *cfg.strategies)), None)
    ours = _run_phase(cfg, (LIMIT, *cfg.strategies))
    base = _run_phase(dataclasses.replace(cfg, layer_interleave=False, strategies=()),
                      (LIMIT, PER_BLOCK))
    return _rows(ours, base)


def _run_phase(cfg: BenchConfig, modes: tuple[str, ...]) -> dict[int, dict[str, dict]]:
    ctx = mp.get_context("spawn")
    procs, pconns, dconns = [], [], []
    try:
        for role, count, target, conns in (("P", cfg.prefill_tp, prefill_worker, pconns),
                                           ("D", cfg.decode_tp, decode_worker, dconns)):
            for r in range(count):
                parent, child = ctx.Pipe()
                procs.append(ctx.Process(target=target, args=(cfg, r, child), daemon=True))
                conns.append(parent)
        for pr in procs:
            pr.start()
        _log(f"started {cfg.prefill_tp} prefill and {cfg.decode_tp} decode processes "
             f"(layers {'interleaved' if cfg.layer_interleave else 'one region each'})")
        metadata = [_recv(c) for c in pconns]
        for c in dconns:
            c.send(metadata)
        return {n: _measure_tokens(cfg, n, modes, pconns, dconns) for n in cfg.tokens}
    finally:
        stop_processes(pconns + dconns, procs)


def stop_processes(conns, procs) -> None:
    """Tell every bench process to stop, then make sure it did (one owner ends them all)."""
    for c in conns:
        try:
            c.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
    for pr in procs:
        pr.join(timeout=10)
        if pr.is_alive():
            pr.kill()
            pr.join()


def _measure_tokens(cfg: BenchConfig, n: int, modes: tuple[str, ...], pconns, dconns
                    ) -> dict[str, dict]:
    """Every mode once per repetition, back to back, so load from other processes hits all
    modes alike; a repetition's time is the sum over decode ranks (measured one at a time).
    The first repetition warms up and is dropped."""
    per_rep = {m: [] for m in modes}
    info: dict[str, dict] = {}
    for rep in range(cfg.reps + 1):
        for m in modes:
            total = 0.0
            for j, dc in enumerate(dconns):
                for pc in pconns:
                    pc.send(("reorder", n, m, j))
                reorder_s = max([_recv(pc) for pc in pconns])   # ranks reorder in parallel
                dc.send(("measure", n, m))
                r = _recv(dc)
                total += r["time_s"] + reorder_s
                if rep == 0:
                    acc = info.setdefault(m, {"descriptors": 0, "indices": 0, "nbytes": 0})
                    for k in acc:
                        acc[k] += r[k]
            if rep:
                per_rep[m].append(total)
    out = {}
    for m in modes:
        ratios = [lim / t for lim, t in zip(per_rep[LIMIT], per_rep[m])]
        out[m] = {**info[m], "time_s": statistics.median(per_rep[m]),
                  "limit_ratio": statistics.median(ratios), "reps_s": per_rep[m]}
        if PER_BLOCK in per_rep:
            out[m]["vs_per_block"] = statistics.median(
                b / t for b, t in zip(per_rep[PER_BLOCK], per_rep[m]))
        _log(f"tokens={n} {m}: {out[m]['time_s'] * 1e3:.2f} ms, "
             f"{out[m]['descriptors']} descriptors, {out[m]['limit_ratio']:.3f} of the limit")
    return out


def _recv(conn):
    if not conn.poll(TIMEOUT_S):
        raise TimeoutError("a rank process did not answer")
    msg = conn.recv()
    return msg


def _rows(ours: dict[int, dict[str, dict]], base: dict[int, dict[str, dict]] | None) -> list[dict]:
    """Table rows; with a separate baseline phase its per_block row joins ours, and each
    strategy's `vs_per_block` is the ratio of median times across the two phases."""
    rows = []
    for n, results in ours.items():
        results = dict(results)
        if base is not None:
            pb = base[n][PER_BLOCK]
            results[PER_BLOCK] = {**pb, "vs_per_block": 1.0}
            for m, r in results.items():
                r.setdefault("vs_per_block", pb["time_s"] / r["time_s"])
        order = [LIMIT, PER_BLOCK] + [m for m in results if m not in (LIMIT, PER_BLOCK)]
        rows += [{"tokens": n, "strategy": m, "descriptors": results[m]["descriptors"],
                  "indices": results[m]["indices"], "nbytes": results[m]["nbytes"],
                  "time_ms": results[m]["time_s"] * 1e3,
                  "gb_per_s": results[m]["nbytes"] / results[m]["time_s"] / 1e9,
                  "limit_ratio": results[m]["limit_ratio"],
                  "vs_per_block": results[m]["vs_per_block"]} for m in order if m in results]
    return rows
