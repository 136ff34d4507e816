"""`pdbridge serve`: one engine behind HTTP (FastAPI + uvicorn).

--role prefill: computes prompts and serves their state to decode servers (over NIXL);
--role decode: pulls a prompt's state from a prefill server and generates;
--role both: one monolithic engine with the OpenAI routes (/v1/completions, ...).
Prefill and decode servers are meant to sit behind `pdbridge router` (or `pdbridge up`).
The engine loop runs continuously: requests that arrive while others run join the batch.
"""
from __future__ import annotations

import os
import sys

ROLES = ("prefill", "decode", "both")


def add_arguments(parser) -> None:
    parser.add_argument("--role", required=True, choices=ROLES, help="what this server does")
    parser.add_argument("--model", metavar="DIR", help="HF model directory (config.json, "
                        "*.safetensors, tokenizer.json); default: the embedded tiny model")
    parser.add_argument("--model-name", metavar="NAME",
                        help="the model id clients send (default: the directory's name)")
    parser.add_argument("--tp", type=int, default=1, metavar="T", help="tensor-parallel size")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8100, metavar="P", help="default 8100")
    parser.add_argument("--num-blocks", type=int, default=256, metavar="N",
                        help="cache blocks (default 256)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--strategy", default="auto",
                        choices=("auto", "direct", "staging", "permute"),
                        help="decode: how ranks read Mamba conv state (default auto)")
    parser.add_argument("--on-failure", default="recompute", choices=("recompute", "fail"),
                        help="decode: a failed transfer recomputes the prompt (default) or "
                             "fails the request")
    parser.add_argument("--lease-s", type=float, default=30.0, metavar="S",
                        help="prefill: how long prefilled blocks wait for their readers "
                             "(renewed while they read; default 30)")
    parser.add_argument("--pull-timeout-s", type=float, default=30.0, metavar="S",
                        help="decode: deadline of one pull (default 30)")
    parser.add_argument("--checksums", action="store_true",
                        help="prefill and decode: digest and compare every transferred byte")
    parser.add_argument("--pull-batch", type=int, default=16, metavar="N",
                        help="decode: pull up to N waiting requests in one round trip to the "
                             "ranks, their reads in flight together (default 16; 1: one at a "
                             "time)")
    parser.add_argument("--side-channel-host", metavar="ADDR",
                        help="prefill: the address its ranks' metadata servers bind, which "
                             "decode servers on other hosts must reach (default: --host). "
                             "NIXL's own traffic uses the interfaces in UCX_NET_DEVICES "
                             "(default lo): name the interface of that address there")
    parser.add_argument("--cpu-affinity", default="auto", metavar="auto|off|LIST",
                        help="the CPUs this server's TP ranks split, one contiguous part each, "
                             "every thread of a rank on its part: auto (default) all the CPUs "
                             "this process may use, off the OS places every thread, or a list "
                             "like 0-3,8 (one rank woken by another otherwise tends to run on "
                             "the waker's CPU, one after the other)")
    parser.add_argument("--floor-probe", type=int, default=0, metavar="K",
                        help="decode: every K-th pull first times, on each rank, one bare "
                             "NIXL read of the last pull's bytes plus its notification, into "
                             "/metrics (pdbridge_probe_seconds; the probed requests' stages "
                             "kept apart): the floor `pdbridge bench serve` divides the "
                             "transfer stage by, on the same agents and cores at the same "
                             "moment (default 0: never)")
    parser.add_argument("--prefill-wait-s", type=float, default=300.0, metavar="S",
                        help="decode: how long a request the router announced before its "
                             "prefill was computed (its blocks allocated, its reads planned) "
                             "waits for the word that it was, before the failure policy "
                             "(--on-failure) takes it (default 300)")
    parser.add_argument("--log-level", default="warning",
                        choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default warning)")


def check(args) -> str:
    """One line naming the bad flag, or ""."""
    if args.tp < 1:
        return f"--tp must be >= 1, got {args.tp}"
    if args.num_blocks < 2:
        return f"--num-blocks must be >= 2, got {args.num_blocks}"
    if not 0 < args.port < 65536:
        return f"--port must be in 1..65535, got {args.port}"
    if args.lease_s <= 0 or args.pull_timeout_s <= 0:
        return "--lease-s and --pull-timeout-s must be > 0"
    if not args.prefill_wait_s > 0:
        return f"--prefill-wait-s must be > 0, got {args.prefill_wait_s}"
    if args.pull_batch < 1:
        return f"--pull-batch must be >= 1, got {args.pull_batch}"
    if args.floor_probe < 0:
        return f"--floor-probe must be >= 0 (0: off), got {args.floor_probe}"
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        return f"--model {args.model!r}: no config.json there (want an HF model directory)"
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        return f"--device {args.device!r}; allowed: cpu, cuda"
    from pdbridge.transport.side_channel_key import ENV_SECRET, ENV_SECRET_FILE
    if args.role != "both" and not (os.environ.get(ENV_SECRET) or os.environ.get(ENV_SECRET_FILE)):
        return (f"--role {args.role}: set {ENV_SECRET} or {ENV_SECRET_FILE}, the same on every "
                f"prefill and decode server (their side channel proves it; `pdbridge up` makes "
                f"one; a new one: python -c \"from pdbridge.transport.side_channel_key import "
                f"generate_secret as g; print(g())\")")
    if args.device != "cpu" and args.role != "both":
        return f"--device {args.device}: only --role both runs on another device today"
    from pdbridge.engine.cpu_affinity import check_cpus
    return check_cpus(args.cpu_affinity, "--cpu-affinity")[0]


def run(args) -> int:
    prog = "pdbridge serve"
    error = check(args)
    if not error:
        from pdbridge.commands.preflight import check_device, check_model
        from pdbridge.spec import CacheConfig
        cache = CacheConfig(num_blocks=args.num_blocks)
        error = check_device(args.device) or check_model(args.model, [("--tp", args.tp)], cache)
    if error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    from pdbridge.engine.cpu_affinity import check_cpus, format_cpu_list, pin_process, rank_cpus
    from pdbridge.serve.node_service import NodeConfig, NodeService
    from pdbridge.serve.decode_node import OnFailure
    from pdbridge.serve.wire import Role
    cpus = check_cpus(args.cpu_affinity, "--cpu-affinity")[1]
    if cpus:        # rank 0 is this process: pinned before it starts any thread
        why = pin_process(rank_cpus(cpus, args.tp, 0))
        if why:
            print(f"{prog}: --cpu-affinity: {why}; running unpinned", file=sys.stderr)
    config = NodeConfig(role=Role(args.role), model_dir=args.model, tp_size=args.tp,
                        cache=cache, model_name=args.model_name, device=args.device,
                        strategy=args.strategy, on_failure=OnFailure(args.on_failure),
                        lease_s=args.lease_s, pull_timeout_s=args.pull_timeout_s,
                        checksums=args.checksums, pull_batch=args.pull_batch,
                        side_channel_host=args.side_channel_host or args.host, cpus=cpus,
                        probe_every=args.floor_probe, prefill_wait_s=args.prefill_wait_s)
    placed = "ranks on CPUs " + " | ".join(format_cpu_list(rank_cpus(cpus, args.tp, r))
                                           for r in range(args.tp)) if cpus else \
        "ranks on any CPU: --cpu-affinity off"
    print(f"{prog}: starting the {args.role} engine (TP={args.tp}, {placed}) ...",
          file=sys.stderr, flush=True)
    service = NodeService(config)
    try:
        from pdbridge.serve.node_app import build_app
        app = build_app(service)
        return serve_app(app, args.host, args.port, args.log_level, prog,
                         f"{args.role} server (model {service.model_name}, TP={args.tp})")
    finally:
        service.close()


def serve_app(app, host: str, port: int, log_level: str, prog: str, what: str,
              before=None, after=None) -> int:
    """Run `app` under uvicorn until SIGINT/SIGTERM; prints one `ready` line to stderr once
    it listens (`pdbridge up` and the tests wait for it). `before`: awaited first; `after`:
    awaited once the server has stopped, whatever happened (it closes what `before` opened)."""
    import asyncio

    import uvicorn
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=log_level in ("info", "debug"), lifespan="off")
    server = uvicorn.Server(config)

    async def main():
        try:
            if before is not None:
                await before()
            task = asyncio.create_task(server.serve())     # handles SIGINT / SIGTERM itself
            while not server.started and not task.done():
                await asyncio.sleep(0.05)
            if server.started:
                print(f"{prog}: {what} ready at http://{host}:{port}", file=sys.stderr,
                      flush=True)
            await task
            return server.started
        finally:
            if after is not None:
                await after()

    try:
        ok = asyncio.run(main())
    except (OSError, SystemExit) as e:      # uvicorn exits when it cannot bind
        print(f"{prog}: could not listen on {host}:{port} ({e or 'in use?'})", file=sys.stderr)
        return 2
    if not ok:
        print(f"{prog}: could not listen on {host}:{port} (in use?)", file=sys.stderr)
        return 2
    return 0
