"""`pdbridge bench serve`: N concurrent streaming clients with mixed prompt lengths against
`pdbridge up` (P/D disaggregated) and against one `pdbridge serve --role both` on the same
machine, in one run: time to first token p50 / p99, output tokens/s, and the transfer stage
divided by one bare NIXL read of the same bytes plus its notification measured in the same
run: in place (every 2nd pull's decode ranks time one first, on the same agents and cores),
and on agents of the bench's own, back to back and after the run's idle gap (measure_bare);
and the peak resident memory of each deployment's processes (servers and TP workers
together).

The transfer stage is reported two ways, side by side: end to end (the decode server: request
received, or for a request the router announced the word that its prefill was computed ->
its state in place, i.e. every rank's pull returned: waiting for the engine loop
and the transfer thread, the prefill side's part where a rank needs one, the pulls over the
rank channel), with the part spent waiting (for the engine loop and the transfer thread:
steps, earlier transfers); and the decode ranks' own pull (the slowest rank: plan, metadata,
reads, ReadDone).

Each deployment runs alone (started, measured, stopped), so the two do not share cores.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from pdbridge.serve.wire import PULL_PARTS


@dataclass(frozen=True)
class ServeBenchConfig:
    clients: int = 16               # concurrent requests
    requests: int = 64
    min_prompt: int = 8
    max_prompt: int = 512
    max_tokens: int = 16
    prefill_tp: int = 1
    decode_tp: int = 2
    model: str | None = None
    seed: int = 0
    num_blocks: int = 512


def _prompts(cfg: ServeBenchConfig) -> list[list[int]]:
    """Mixed lengths, log-uniform between min_prompt and max_prompt; printable byte ids."""
    rng = random.Random(cfg.seed)
    lo, hi = np.log(cfg.min_prompt), np.log(cfg.max_prompt)
    return [[rng.randrange(32, 127) for _ in range(int(round(np.exp(rng.uniform(lo, hi)))))]
            for _ in range(cfg.requests)]


async def _client_run(url: str, prompts, cfg: ServeBenchConfig) -> dict:
    import httpx
    sem = asyncio.Semaphore(cfg.clients)
    results = []

    async def one(client, ids):
        async with sem:
            t0 = time.perf_counter()
            ttft, n = None, 0
            body = {"prompt": ids, "max_tokens": cfg.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        raise RuntimeError(ev["error"]["message"])
                    got = len(ev["choices"][0].get("token_ids", []))
                    if got and ttft is None:
                        ttft = time.perf_counter() - t0
                    n += got
            results.append((ttft, n, time.perf_counter() - t0))

    limits = httpx.Limits(max_connections=cfg.clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, p) for p in prompts))
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"requests": len(results), "wall_s": wall, "output_tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_p50_s": _pct(ttfts, 50),
            "ttft_p99_s": _pct(ttfts, 99), "ttfts_s": ttfts}


def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _buckets(text: str, name: str) -> dict[float, float]:
    """A Prometheus histogram's cumulative bucket counts: upper bound -> count."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def histogram_median(before: str, after: str, name: str) -> float:
    """The median of what a histogram observed between two scrapes, interpolated linearly
    inside its bucket (so as fine as the buckets: 0.05-0.25 ms up to 2 ms for the transfer
    histograms, metrics._FINE_BUCKETS)."""
    b0, b1 = _buckets(before, name), _buckets(after, name)
    bounds = sorted(b1)
    counts = [b1[le] - b0.get(le, 0.0) for le in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    half, lo, below = counts[-1] / 2, 0.0, 0.0
    for le, c in zip(bounds, counts):
        if c >= half:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * (half - below) / max(c - below, 1e-12)
        lo, below = le, c
    return lo


def bare_read_s(nbytes: int, reps: int = 50, idle_s: float = 0.0) -> float:
    """Median time of one single-descriptor NIXL read of nbytes plus its notification
    arriving at the other agent (the least any transfer stage can take on this transport),
    each read back to back, or (idle_s > 0) each after this process slept idle_s, as a
    server's transfer comes after the gap since the one before."""
    from pdbridge.transport.nixl import NixlTransport
    from pdbridge.transport.transport import ReadList, XferState
    nbytes = max(1, int(nbytes))
    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    a, b = NixlTransport("bench-bare-src"), NixlTransport("bench-bare-dst")
    try:
        a.register_regions([src])
        b.register_regions([dst])
        b.add_peer("bench-bare-src", a.metadata())
        a.add_peer("bench-bare-dst", b.metadata())
        one = lambda v, dt: np.asarray([v], dt)     # noqa: E731
        rl = ReadList(one(0, np.int32), one(0, np.int64), one(0, np.int32), one(0, np.int64),
                      one(nbytes, np.int64))
        times = []
        for i in range(reps + 3):
            if idle_s > 0:
                time.sleep(idle_s)
            t0 = time.perf_counter()
            h = b.read("bench-bare-src", rl)
            deadline = time.monotonic() + 30.0
            while b.poll(h).state is XferState.PENDING:      # both agents progress (no threads)
                a.get_notifications()
                if time.monotonic() > deadline:
                    raise TimeoutError("bare NIXL read: no completion in 30 s")
            b.release(h)
            b.notify("bench-bare-src", b"done")
            while not a.get_notifications():
                b.get_notifications()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        assert bytes(dst[:16]) == bytes(src[:16])
        return statistics.median(times)
    finally:
        a.close()
        b.close()


def _start(argv: list[str], env: dict, ready: str):
    import subprocess
    p = subprocess.Popen([sys.executable, "-m", "pdbridge.cli", *argv], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    lines = []
    deadline = time.monotonic() + 600
    for line in p.stderr:
        lines.append(line)
        if ready in line:
            break
        if time.monotonic() > deadline:
            break
    else:
        raise RuntimeError(f"pdbridge {argv[0]} exited:\n{''.join(lines)}")
    import threading
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p


def _stop(p) -> None:
    import signal
    import subprocess
    try:
        os.killpg(p.pid, signal.SIGINT)
        p.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    except ProcessLookupError:
        pass


def tree_peak_rss_mib(pid: int) -> float:
    """Sum of the peak resident memory (VmHWM) of `pid` and all its descendants, in MiB: the
    deployment's servers and their TP worker processes (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total_kib, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                total_kib += next((int(line.split()[1]) for line in f
                                   if line.startswith("VmHWM:")), 0)
        except OSError:
            pass
    return total_kib / 1024


def _port() -> int:
    import socket
    for _ in range(100):
        base = random.randrange(20000, 60000)
        try:
            for p in range(base, base + 4):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def run_bench(cfg: ServeBenchConfig, progress=lambda m: None) -> dict:
    import httpx
    from pdbridge.transport.side_channel_key import generate_secret
    prompts = _prompts(cfg)
    env = dict(os.environ, PDBRIDGE_SECRET=generate_secret())
    model = ["--model", cfg.model] if cfg.model else []
    out = {"config": cfg.__dict__, "prompt_tokens": [len(p) for p in prompts]}

    port = _port()
    progress(f"starting pdbridge up (prefill TP={cfg.prefill_tp}, decode TP={cfg.decode_tp})")
    up = _start(["up", "--port", str(port), "--prefill-tp", str(cfg.prefill_tp),
                 "--decode-tp", str(cfg.decode_tp), "--num-blocks", str(cfg.num_blocks),
                 "--floor-probe", str(PROBE_EVERY), *model], env, "router over")
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_client_run(url, prompts[:cfg.clients], cfg))      # warm-up
        before = httpx.get(url + "/metrics").text
        progress(f"P/D: {cfg.requests} requests, {cfg.clients} at a time")
        pd = asyncio.run(_client_run(url, prompts, cfg))
        after = httpx.get(url + "/metrics").text
        pd_peak = tree_peak_rss_mib(up.pid)
    finally:
        _stop(up)
    d = {k: _metric(after, k) - _metric(before, k) for k in (
        "pdbridge_transfer_seconds_sum", "pdbridge_transfer_seconds_count",
        "pdbridge_transfer_queued_seconds_sum", "pdbridge_pull_seconds_sum",
        "pdbridge_transfer_bytes_total", "pdbridge_recomputed_total",
        "pdbridge_probe_seconds_sum", "pdbridge_probe_seconds_count", "pdbridge_probe_bytes_total",
        "pdbridge_probed_transfer_seconds_count")}
    # The stage and pull figures are the plain requests' (the probed ones are apart).
    n = max(1, d["pdbridge_transfer_seconds_count"])
    probes = d["pdbridge_probe_seconds_count"]
    pd["probes"] = int(probes)
    pd["probe_s_mean"] = d["pdbridge_probe_seconds_sum"] / max(1, probes)
    pd["probe_s_p50"] = histogram_median(before, after, "pdbridge_probe_seconds")
    pd["probe_bytes_mean"] = d["pdbridge_probe_bytes_total"] / max(1, probes)
    pd["transfer_s_mean"] = d["pdbridge_transfer_seconds_sum"] / n
    pd["transfer_queued_s_mean"] = d["pdbridge_transfer_queued_seconds_sum"] / n
    pd["pull_s_mean"] = d["pdbridge_pull_seconds_sum"] / n
    pd["pull_parts_s_mean"] = {
        part: (_metric(after, f'pdbridge_pull_part_seconds_total{{part="{part}"}}')
               - _metric(before, f'pdbridge_pull_part_seconds_total{{part="{part}"}}')) / n
        for part in PULL_PARTS}
    pd["transfer_s_p50"] = histogram_median(before, after, "pdbridge_transfer_seconds")
    pd["pull_s_p50"] = histogram_median(before, after, "pdbridge_pull_seconds")
    pd["transfer_bytes_mean"] = d["pdbridge_transfer_bytes_total"] / max(
        1, d["pdbridge_transfer_seconds_count"] + d["pdbridge_probed_transfer_seconds_count"])
    pd["recomputed"] = int(d["pdbridge_recomputed_total"])
    pd["peak_rss_mib"] = pd_peak
    progress("bare NIXL read + notification of the mean request's bytes")
    measure_bare(pd, cfg)

    port = _port()
    progress(f"starting pdbridge serve --role both (TP={cfg.decode_tp})")
    both = _start(["serve", "--role", "both", "--port", str(port), "--tp", str(cfg.decode_tp),
                   "--num-blocks", str(cfg.num_blocks), *model], env, "ready at")
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_client_run(url, prompts[:cfg.clients], cfg))
        progress(f"both: {cfg.requests} requests, {cfg.clients} at a time")
        mono = asyncio.run(_client_run(url, prompts, cfg))
        mono["peak_rss_mib"] = tree_peak_rss_mib(both.pid)
    finally:
        _stop(both)
    out["pd"], out["both"] = pd, mono
    return out


IDLE_REPS = 20             # bare reads after the run's gap (each waits that gap first)
MAX_IDLE_S = 0.5
PROBE_EVERY = 2            # every 2nd pull of the P/D run is probed (serve --floor-probe)
FLOORS = {"_probe": "the floor in place", "_idle": "bare after the same idle",
          "": "bare back to back"}


def measure_bare(pd: dict, cfg: ServeBenchConfig) -> None:
    """The stage and the pull over three floors, mean over mean and median over median.

    In place, the one that compares like with like: every PROBE_EVERY-th pull of the run
    first times one bare read of the pull's bytes and its notification on each decode rank,
    where that pull starts (DecodeRank._probe), so on the same agents and cores, after the
    same wakeup, in the same host state as the plain requests' stages between them (those
    exclude the probed requests). Two more on agents of the bench's own, after the stack
    stopped, for context: back to back (a hot core: the least there is), and each read after
    the run's mean gap between requests. Those share neither the servers' cores nor the
    host's state: here a read after 175 ms asleep took 5.4 ms one hour and 0.6 ms another
    (issue 10), and the servers' threads never sleep that long (the engine loop's tick)."""
    nbytes = pd["transfer_bytes_mean"]
    pd["idle_gap_s"] = min(MAX_IDLE_S, pd["wall_s"] / max(1, cfg.requests))
    floors = {}
    if pd.get("probes"):
        floors["_probe"] = (pd["probe_s_mean"], pd["probe_s_p50"])
    for suffix, bare in (("_idle", bare_read_s(nbytes, IDLE_REPS, pd["idle_gap_s"])),
                         ("", bare_read_s(nbytes))):
        pd[f"bare_read{suffix}_s"] = bare
        floors[suffix] = (bare, bare)
    for suffix, (mean, p50) in floors.items():
        for stage in ("transfer", "pull"):
            pd[f"{stage}_over_bare{suffix}"] = pd[f"{stage}_s_mean"] / mean
            pd[f"{stage}_p50_over_bare{suffix}"] = pd[f"{stage}_s_p50"] / p50


def format_table(res: dict) -> str:
    cfg, pd, mono = res["config"], res["pd"], res["both"]
    lines = [f"{cfg['requests']} requests, {cfg['clients']} concurrent, prompts "
             f"{min(res['prompt_tokens'])}-{max(res['prompt_tokens'])} tokens, "
             f"{cfg['max_tokens']} output tokens each",
             "| deployment | TTFT p50 ms | TTFT p99 ms | output tok/s | wall s | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for name, r in ((f"P/D up (P={cfg['prefill_tp']}, D={cfg['decode_tp']})", pd),
                    (f"both (TP={cfg['decode_tp']})", mono)):
        lines.append(f"| {name} | {r['ttft_p50_s'] * 1e3:.1f} | {r['ttft_p99_s'] * 1e3:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {r['wall_s']:.2f} | {r['peak_rss_mib']:.0f} |")
    lines.append(f"P/D / both: TTFT p50 {pd['ttft_p50_s'] / mono['ttft_p50_s']:.2f}x, "
                 f"throughput {pd['tokens_per_s'] / mono['tokens_per_s']:.2f}x")

    def ratios(stage: str) -> str:
        return "; ".join(f"over {name} {pd[f'{stage}_over_bare{suffix}']:.1f} (median "
                         f"{pd[f'{stage}_p50_over_bare{suffix}']:.1f})"
                         for suffix, name in FLOORS.items() if f"{stage}_over_bare{suffix}" in pd)
    if pd.get("probes"):
        lines.append(f"the floor in place (in one pull of every {PROBE_EVERY}, the decode "
                     f"ranks first time one bare NIXL read of the pull's bytes + its "
                     f"notification, where the pull starts; the slowest rank): mean "
                     f"{pd['probe_s_mean'] * 1e3:.3f} ms, median "
                     f"{pd['probe_s_p50'] * 1e3:.3f} ms over {pd['probes']} probes of "
                     f"{pd['probe_bytes_mean'] / 2**20:.3f} MiB")
    idle = "bare_read_idle_s" in pd
    lines.append(f"one bare NIXL read + notification on the bench's own agents of the mean "
                 f"request's {pd['transfer_bytes_mean'] / 2**20:.3f} MiB: "
                 f"{pd['bare_read_s'] * 1e3:.3f} ms back to back"
                 + (f", {pd['bare_read_idle_s'] * 1e3:.3f} ms each after "
                    f"{pd['idle_gap_s'] * 1e3:.0f} ms idle (the run's mean gap between "
                    f"requests)" if idle else "") + f" (recomputed: {pd['recomputed']})")
    lines.append(f"transfer stage, end to end (decode server: request received, or announced "
                 f"its prefill's word -> state in place; the plain requests): mean {pd['transfer_s_mean'] * 1e3:.2f} ms, "
                 f"median {pd['transfer_s_p50'] * 1e3:.2f} ms; {ratios('transfer')}; of the "
                 f"mean, waiting (engine loop, transfer thread) "
                 f"{pd['transfer_queued_s_mean'] * 1e3:.2f} ms")
    lines.append(f"decode ranks' own pull (slowest rank: plan, metadata, reads, ReadDone): "
                 f"mean {pd['pull_s_mean'] * 1e3:.2f} ms, median {pd['pull_s_p50'] * 1e3:.2f} "
                 f"ms; {ratios('pull')}")
    parts = pd.get("pull_parts_s_mean") or {}
    if any(parts.values()):
        lines.append("of the pull mean, ms: " + ", ".join(
            f"{part} {parts[part] * 1e3:.2f}" for part in PULL_PARTS if part in parts))
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in (("P/D (pdbridge up)", res["pd"]), ("both (one engine)", res["both"])):
        xs = np.asarray(r["ttfts_s"]) * 1e3
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
    ax.set_xlabel("time to first token, ms")
    ax.set_ylabel("fraction of requests")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("TTFT distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
