"""PdbridgeConnector against vLLM's own NixlConnector, one run, same model and prompts.

Both run a tiny NemotronH (n_groups given, default 1) as `vllm serve` prefill TP=1 -> decode
TP=2 (or --p-tp/--d-tp) with the DS conv layout (NixlConnector asserts DS). For each
connector and prompt it times the decode call with max_tokens=1 right after the prefill call
returned (= prefill return -> first decode token, HTTP included), counts descriptors per
request (ours: the connector's read totals, PDBRIDGE_VLLM_STATS; theirs: the decode server's
vllm:nixl_num_descriptors histogram), and checks greedy tokens against transformers. Prints
the ratios ours / theirs. Needs .venv-vllm (bash scripts/setup_vllm.sh).

    .venv/bin/python benchmarks/vllm_connectors.py [--requests 12] [--n-groups 1]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm"))
from vllm_stack import NIXL, PDBRIDGE, VLLM_VENV, Server, pd_generate, vllm_missing  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "tests" / "vllm" / "tiny_model.py"


def descriptors_nixl(server: Server) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^vllm:nixl_num_descriptors_sum\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def run(name, connector, model, args, tmp: Path, prompts, ref):
    stats = tmp / f"{name}-stats"
    env = {"PDBRIDGE_VLLM_STATS": str(stats)}
    p = Server(model, args.p_tp, connector, tmp / f"{name}-prefill.log", "DS", env)
    d = Server(model, args.d_tp, connector, tmp / f"{name}-decode.log", "DS", env)
    try:
        p.wait_ready(), d.wait_ready()
        pd_generate(p, d, prompts[0], 1)        # warm-up: handshakes, first-call costs
        times, right = [], 0
        for prompt, want in zip(prompts, ref):
            first = p.complete(prompt, 1, {"do_remote_decode": True})
            import time
            t0 = time.perf_counter()
            out = d.complete(prompt, 1, first["kv_transfer_params"])
            times.append(time.perf_counter() - t0)
            right += out["choices"][0]["token_ids"] == want[:1]
        if connector is PDBRIDGE:
            totals = [json.loads(f.read_text()) for f in tmp.glob(f"{name}-stats.*.json")]
            desc = sum(t["descriptors"] for t in totals)
        else:
            desc = descriptors_nixl(d)
        n = len(prompts) + 1
        return {"ttft_ms_p50": 1e3 * statistics.median(times), "desc_per_req": desc / n,
                "first_token_right": f"{right}/{len(prompts)}"}
    finally:
        p.stop(), d.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--n-groups", type=int, default=1)
    ap.add_argument("--p-tp", type=int, default=1)
    ap.add_argument("--d-tp", type=int, default=2)
    args = ap.parse_args()
    if vllm_missing():
        print(vllm_missing(), file=sys.stderr)
        return 2
    py = str(VLLM_VENV / "bin" / "python")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        model = str(tmp / "model")
        subprocess.run([py, str(TINY), "make", model, str(args.n_groups)], check=True,
                       capture_output=True)
        prompts = [[(7 * i + 3 * k) % 250 + 3 for i in range(20 + 37 * k)]
                   for k in range(args.requests)]
        ref = json.loads(subprocess.run([py, str(TINY), "greedy", model, "1", json.dumps(prompts)],
                                        check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"[vllm-bench] NemotronH n_groups={args.n_groups}, P TP={args.p_tp} -> D TP="
              f"{args.d_tp}, {args.requests} prompts of 20-{20 + 37 * (args.requests - 1)} tokens",
              file=sys.stderr)
        ours = run("pdbridge", PDBRIDGE, model, args, tmp, prompts, ref)
        theirs = run("nixl", NIXL, model, args, tmp, prompts, ref)
    print(f"{'':28}{'pdbridge':>12}{'NixlConnector':>15}{'ours/theirs':>13}")
    print(f"{'decode TTFT p50 (ms)':28}{ours['ttft_ms_p50']:>12.1f}{theirs['ttft_ms_p50']:>15.1f}"
          f"{ours['ttft_ms_p50'] / theirs['ttft_ms_p50']:>13.2f}")
    print(f"{'descriptors per request':28}{ours['desc_per_req']:>12.1f}{theirs['desc_per_req']:>15.1f}"
          f"{ours['desc_per_req'] / theirs['desc_per_req'] if theirs['desc_per_req'] else float('nan'):>13.2f}")
    print(f"{'first token = transformers':28}{ours['first_token_right']:>12}{theirs['first_token_right']:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
