"""`pdbridge bench serve`: flags refused in one line; the bare-read reference; one small run
of both deployments (slow: it starts three servers)."""
from __future__ import annotations

import json

import pytest

from pdbridge.cli import main
from pdbridge.commands.bench_serve import ServeBenchConfig, _prompts, bare_read_s


@pytest.mark.parametrize("argv,needle", [
    (["--clients", "0"], "--clients"),
    (["--prompt-tokens", "9,3"], "--prompt-tokens"),
    (["--prompt-tokens", "x"], "--prompt-tokens"),
    (["--plot", "/no/such/dir/x.png"], "--plot"),
])
def test_bad_flags_are_one_line(capsys, argv, needle):
    assert main(["bench", "serve", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_prompts_are_mixed_and_repeatable():
    cfg = ServeBenchConfig(requests=200, min_prompt=8, max_prompt=512)
    a, b = _prompts(cfg), _prompts(cfg)
    assert a == b
    lengths = [len(p) for p in a]
    assert min(lengths) >= 8 and max(lengths) <= 512 and len(set(lengths)) > 50


def test_peak_memory_counts_the_process_tree():
    import os
    import subprocess
    import sys
    from pdbridge.commands.bench_serve import tree_peak_rss_mib
    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(b'x' * (200 << 20)); "
                              "print('ready', flush=True); import time; time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        alone = tree_peak_rss_mib(os.getpid()) - tree_peak_rss_mib(child.pid)
        assert tree_peak_rss_mib(child.pid) > 200
        assert tree_peak_rss_mib(os.getpid()) >= alone + 200
    finally:
        child.kill()
        child.wait()


def test_bare_read_moves_the_bytes_and_takes_time():
    assert bare_read_s(1 << 16, reps=5) > 0
    assert bare_read_s(1 << 16, reps=3, idle_s=0.01) > 0


def test_the_floor_in_place_heads_the_ratios_and_the_bench_floors_follow():
    from pdbridge.commands.bench_serve import format_table, measure_bare
    cfg = ServeBenchConfig(requests=10, clients=1)
    pd = {"transfer_bytes_mean": 4096.0, "wall_s": 0.2, "transfer_s_mean": 0.003,
          "transfer_s_p50": 0.002, "pull_s_mean": 0.002, "pull_s_p50": 0.001,
          "probes": 5, "probe_s_mean": 0.0005, "probe_s_p50": 0.0004, "probe_bytes_mean": 2048.0}
    measure_bare(pd, cfg)
    assert pd["idle_gap_s"] == pytest.approx(0.02)
    # In place: mean over mean, median over median.
    assert pd["transfer_over_bare_probe"] == pytest.approx(6.0)
    assert pd["pull_p50_over_bare_probe"] == pytest.approx(2.5)
    assert pd["transfer_over_bare_idle"] == pytest.approx(0.003 / pd["bare_read_idle_s"])
    assert pd["pull_p50_over_bare"] == pytest.approx(0.001 / pd["bare_read_s"])
    mono = {"ttft_p50_s": 0.01, "ttft_p99_s": 0.02, "tokens_per_s": 1.0, "wall_s": 1.0,
            "peak_rss_mib": 1.0}
    pd.update(mono, recomputed=0, transfer_queued_s_mean=0.0)
    text = format_table({"config": cfg.__dict__, "pd": pd, "both": mono,
                         "prompt_tokens": [8, 9]})
    stage = next(line for line in text.splitlines() if line.startswith("transfer stage"))
    assert stage.index("over the floor in place 6.0 (median 5.0)") \
        < stage.index("after the same idle") < stage.index("back to back")
    assert "over 5 probes" in text
    plain = {k: v for k, v in pd.items() if "probe" not in k}   # a run without probes
    measure_bare(plain, cfg)
    assert "floor in place" not in format_table({"config": cfg.__dict__, "pd": plain,
                                                 "both": mono, "prompt_tokens": [8, 9]})


@pytest.mark.slow
def test_bench_serve_runs_both_deployments(capsys, tmp_path):
    plot = tmp_path / "ttft.png"
    assert main(["bench", "serve", "--requests", "8", "--clients", "4", "--prompt-tokens",
                 "8,64", "--max-tokens", "4", "--json", "--plot", str(plot)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["pd"]["requests"] == res["both"]["requests"] == 8
    assert res["pd"]["recomputed"] == 0 and res["pd"]["transfer_over_bare"] > 0
    assert res["pd"]["probes"] > 0 and res["pd"]["transfer_over_bare_probe"] > 0
    # The decode ranks' pull is a part of the end-to-end stage, and so is the queueing.
    assert 0 < res["pd"]["pull_s_mean"] <= res["pd"]["transfer_s_mean"]
    assert 0 <= res["pd"]["transfer_queued_s_mean"] <= res["pd"]["transfer_s_mean"]
    parts = res["pd"]["pull_parts_s_mean"]          # the pull in parts, through /metrics
    assert parts["read"] > 0 and sum(parts.values()) == pytest.approx(res["pd"]["pull_s_mean"])
    assert plot.stat().st_size > 0
    assert res["pd"]["peak_rss_mib"] > res["both"]["peak_rss_mib"] > 0    # 3 servers vs 1


def test_histogram_median_interpolates_inside_the_bucket():
    from pdbridge.commands.bench_serve import histogram_median

    def scrape(counts):
        return "\n".join(f'pdbridge_pull_seconds_bucket{{le="{le}"}} {c}'
                         for le, c in zip(("0.001", "0.002", "0.004", "+Inf"), counts))
    before = scrape([1, 1, 1, 1])
    # 10 new observations: 2 below 1 ms, 4 in (1, 2] ms, 4 in (2, 4] ms: the 5th is in
    # the second bucket, 3/4 of the way through it.
    after = scrape([3, 7, 11, 11])
    assert histogram_median(before, after, "pdbridge_pull_seconds") == pytest.approx(0.00175)
    assert histogram_median(before, before, "pdbridge_pull_seconds") != \
        histogram_median(before, before, "pdbridge_pull_seconds")      # nothing observed: nan
