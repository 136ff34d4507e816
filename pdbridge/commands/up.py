"""`pdbridge up`: a whole disaggregated deployment on this machine -- one prefill server, one
decode server per --decode-tp size, and the router in front -- then prints the URL.

The servers are child processes (`pdbridge serve`), sharing one side-channel secret that is
generated here (unless PDBRIDGE_SECRET / PDBRIDGE_SECRET_FILE is set); their output is
forwarded, prefixed with their role. Ctrl-C (or SIGTERM) stops everything. Each server gets
its own part of this machine's CPUs when there is one CPU per rank (`--cpu-affinity`,
engine/cpu_affinity.py), and its ranks split it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def add_arguments(parser) -> None:
    parser.add_argument("--model", metavar="DIR", help="HF model directory; default: the "
                        "embedded tiny hybrid model")
    parser.add_argument("--prefill-tp", type=int, default=1, metavar="P", help="default 1")
    parser.add_argument("--decode-tp", default="2", metavar="D[,D]",
                        help="one decode server per size (default 2)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, metavar="P",
                        help="the router's port (default 8000); the servers take the next ones")
    parser.add_argument("--num-blocks", type=int, default=256, metavar="N",
                        help="cache blocks per server (default 256)")
    parser.add_argument("--strategy", default="auto",
                        choices=("auto", "direct", "staging", "permute"))
    parser.add_argument("--on-failure", default="recompute", choices=("recompute", "fail"))
    parser.add_argument("--checksums", action="store_true")
    parser.add_argument("--pull-batch", type=int, default=16, metavar="N",
                        help="decode servers: requests pulled in one round trip (default 16)")
    parser.add_argument("--timeout-s", type=float, default=120.0, metavar="S",
                        help="the router's deadline per upstream call (default 120)")
    parser.add_argument("--cpu-affinity", default="auto", choices=("auto", "off"),
                        help="auto (default): each server's TP ranks on CPUs of their own, each "
                             "server its own part of this machine's CPUs where there are "
                             "enough for one per rank (else each server splits all of them: "
                             "the fastest transfers, but under load on a machine with fewer "
                             "CPUs than ranks slower than off, see the README); off: the OS "
                             "places every thread (`pdbridge serve --cpu-affinity`)")
    parser.add_argument("--floor-probe", type=int, default=0, metavar="K",
                        help="decode servers: every K-th pull first times a bare NIXL read "
                             "(`pdbridge serve --floor-probe`; default 0: never)")
    from pdbridge.commands.router import add_announce_argument
    add_announce_argument(parser)
    parser.add_argument("--log-level", default="warning",
                        choices=("critical", "error", "warning", "info", "debug"))


def check(args) -> tuple[str, list[int]]:
    try:
        dtps = [int(t) for t in args.decode_tp.split(",") if t.strip()]
    except ValueError:
        return f"--decode-tp {args.decode_tp!r}: want sizes like 2 or 1,4", []
    if not dtps:
        return "--decode-tp: at least one size", []
    for flag, tp in [("--prefill-tp", args.prefill_tp)] + [("--decode-tp", t) for t in dtps]:
        if tp < 1:
            return f"{flag} must be >= 1, got {tp}", []
    if not 0 < args.port < 65536 - 1 - len(dtps):
        return f"--port {args.port}: want 1..{65534 - len(dtps)}", []
    if args.num_blocks < 2:
        return f"--num-blocks must be >= 2, got {args.num_blocks}", []
    if args.pull_batch < 1:
        return f"--pull-batch must be >= 1, got {args.pull_batch}", []
    if args.floor_probe < 0:
        return f"--floor-probe must be >= 0 (0: off), got {args.floor_probe}", []
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        return f"--model {args.model!r}: no config.json there (want an HF model directory)", []
    return "", dtps


class Children:
    """The server processes: started, watched, and stopped in one place."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.ready: dict[str, threading.Event] = {}

    def start(self, name: str, argv: list[str], env: dict) -> None:
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        ev = self.ready[name] = threading.Event()
        self.procs.append((name, p))
        threading.Thread(target=self._forward, args=(name, p, ev), daemon=True).start()

    @staticmethod
    def _forward(name: str, p: subprocess.Popen, ready: threading.Event) -> None:
        for line in p.stderr:
            sys.stderr.write(f"[{name}] {line}")
            if " ready at http" in line:
                ready.set()

    def wait_ready(self, timeout_s: float) -> str:
        """"" once every server listens; else what went wrong."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, p in self.procs:
                if p.poll() is not None:
                    return f"the {name} server exited with status {p.returncode} (output above)"
            if all(e.is_set() for e in self.ready.values()):
                return ""
            time.sleep(0.1)
        return f"the servers were not ready after {timeout_s:.0f} s"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to each server alone: it stops its TP workers itself (Shutdown), so each
        rank closes what it opened (its rank channel's directory, its NIXL agent). Signalled
        with the server, as the group once was, a worker died at once and left its channel
        directory behind. Past grace_s, or afterwards for anything left: SIGKILL to the
        group, so nothing of a server outlives `pdbridge up`."""
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
            _signal_group(p, signal.SIGKILL)    # a worker its server could not stop


def _signal_group(p: subprocess.Popen, sig) -> None:
    try:
        os.killpg(p.pid, sig)           # the server and its TP workers
    except ProcessLookupError:
        pass


def run(args) -> int:
    prog = "pdbridge up"
    error, dtps = check(args)
    if error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    from pdbridge.transport.side_channel_key import ENV_SECRET, ENV_SECRET_FILE, generate_secret
    env = dict(os.environ)
    if ENV_SECRET not in env and ENV_SECRET_FILE not in env:
        env[ENV_SECRET] = generate_secret()         # shared by these servers only
    base = [sys.executable, "-m", "pdbridge.cli", "serve", "--host", args.host,
            "--num-blocks", str(args.num_blocks), "--log-level", args.log_level]
    if args.model:
        base += ["--model", args.model]
    if args.checksums:
        base += ["--checksums"]
    url = lambda port: f"http://{args.host}:{port}"      # noqa: E731
    prefill_port = args.port + 1
    servers = [("prefill", ["--role", "prefill", "--tp", str(args.prefill_tp),
                            "--port", str(prefill_port)], prefill_port)]
    for i, tp in enumerate(dtps):
        port = args.port + 2 + i
        servers.append((f"decode{i}", ["--role", "decode", "--tp", str(tp), "--port", str(port),
                                       "--strategy", args.strategy,
                                       "--pull-batch", str(args.pull_batch),
                                       "--on-failure", args.on_failure,
                                       "--floor-probe", str(args.floor_probe)], port))
    if args.cpu_affinity == "off":
        parts = ["off"] * len(servers)
    else:
        from pdbridge.engine.cpu_affinity import available_cpus, format_cpu_list, server_cpus
        split = server_cpus(available_cpus(), [args.prefill_tp, *dtps])
        parts = [format_cpu_list(p) for p in split] if split else ["auto"] * len(servers)
    children = Children()
    try:
        for (name, extra, _), cpus in zip(servers, parts):
            children.start(name, base + extra + ["--cpu-affinity", cpus], env)
        print(f"{prog}: starting prefill TP={args.prefill_tp} and decode TP="
              f"{','.join(map(str, dtps))} ...", file=sys.stderr, flush=True)
        error = children.wait_ready(600.0)
        if error:
            print(f"{prog}: {error}", file=sys.stderr)
            return 1
        print(f"{prog}: ready: {url(args.port)}/v1  (curl {url(args.port)}/v1/models)",
              file=sys.stderr, flush=True)
        from pdbridge.commands.router import run_router
        return run_router([url(prefill_port)], [url(p) for *_, p in servers[1:]], args.host,
                          args.port, args.timeout_s, 60.0, args.log_level, prog, args.announce)
    finally:
        children.stop()
