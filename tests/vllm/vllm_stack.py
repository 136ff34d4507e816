"""Start `vllm serve` processes (from the .venv-vllm that scripts/setup_vllm.sh makes) and
drive vLLM's P/D request flow against them; used by the slow vLLM tests and the benchmark."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from http_stack import free_ports  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("PDBRIDGE_VLLM_VENV", ROOT / ".venv-vllm"))
VLLM_BIN = VLLM_VENV / "bin" / "vllm"
PDBRIDGE = {"kv_connector": "PdbridgeConnector", "kv_connector_module_path": "pdbridge.vllm",
            "kv_role": "kv_both", "kv_buffer_device": "cpu"}
NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}


def vllm_missing() -> str:
    return "" if VLLM_BIN.exists() else (f"no vLLM at {VLLM_BIN}: run bash scripts/setup_vllm.sh")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, tp: int, connector: dict | None, log_path: Path,
                 conv_layout: str = "SD", env: dict | None = None, blocks: int = 64):
        # Side channels below Linux's ephemeral range (32768+), where vLLM's own ephemeral
        # sockets cannot take them between this check and the bind.
        self.port, self.side_port = free_port(), free_ports(8, high=32000)
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(VLLM_BIN), "serve", model, "--dtype", "float32", "--enforce-eager",
               "-tp", str(tp), "--distributed-executor-backend", "mp", "--host", "127.0.0.1",
               "--port", str(self.port), "--max-model-len", "512", "--max-num-seqs", "8",
               "--num-gpu-blocks-override", str(blocks), "--no-enable-prefix-caching",
               "--seed", "0"]
        if connector:
            cmd += ["--kv-transfer-config", json.dumps(connector)]
        full_env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
                    "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_SSM_CONV_STATE_LAYOUT": conv_layout,
                    "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                    "VLLM_NIXL_SIDE_CHANNEL_PORT": str(self.side_port),
                    "VLLM_HOST_IP": "127.0.0.1", "OMP_NUM_THREADS": "1",
                    "PDBRIDGE_SECRET": os.environ.get("PDBRIDGE_SECRET", "vllm-test-secret"),
                    **(env or {})}
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env, start_new_session=True)

    def wait_ready(self, timeout_s: float = 420) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not ready in {timeout_s} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def complete(self, prompt: list[int], max_tokens: int, params: dict | None = None) -> dict:
        body = {"model": self.model_name(), "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "return_token_ids": True, "ignore_eos": True}
        if params is not None:
            body["kv_transfer_params"] = params
        req = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def model_name(self) -> str:
        if not getattr(self, "_model", None):
            with urllib.request.urlopen(self.url + "/v1/models", timeout=120) as r:
                self._model = json.loads(r.read())["data"][0]["id"]
        return self._model

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@contextmanager
def servers(specs, tmp: Path):
    """Start every (name, model, tp, connector, conv_layout) at once; stop them all after."""
    started = {}
    try:
        for name, model, tp, connector, conv in specs:
            started[name] = Server(model, tp, connector, tmp / f"{name}.log", conv)
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.stop()


def pd_generate(prefill: Server, decode: Server, prompt: list[int], max_tokens: int):
    """vLLM's P/D flow: prefill with do_remote_decode and max_tokens 1, then decode with the
    kv_transfer_params prefill returned. Returns (token ids, seconds the decode call took)."""
    first = prefill.complete(prompt, 1, {"do_remote_decode": True})
    params = first["kv_transfer_params"]
    assert params, f"prefill returned no kv_transfer_params: {first}"
    t0 = time.perf_counter()
    out = decode.complete(prompt, max_tokens, params)
    return out["choices"][0]["token_ids"], time.perf_counter() - t0


if __name__ == "__main__":      # manual: python vllm_stack.py MODEL P_TP D_TP [conv]
    model, p_tp, d_tp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    conv = sys.argv[4] if len(sys.argv) > 4 else "SD"
    tmp = Path("/tmp/vstack"); tmp.mkdir(exist_ok=True)
    with servers([("prefill", model, p_tp, PDBRIDGE, conv), ("decode", model, d_tp, PDBRIDGE, conv)], tmp) as s:
        for n in (37, 150):
            prompt = [(7 * i + 3) % 250 + 3 for i in range(n)]
            print(n, pd_generate(s["prefill"], s["decode"], prompt, 8))
            print(n, "decode alone", s["decode"].complete(prompt, 8)["choices"][0]["token_ids"])
