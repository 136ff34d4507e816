"""`pdbridge router`: the OpenAI-compatible endpoint over prefill and decode servers
(`pdbridge serve --role prefill|decode`): /v1/completions, /v1/chat/completions, /v1/models,
streaming, /health, /metrics. Each request goes to the least-loaded decode server and a
prefill server; the state moves between them over NIXL, not through the router.
"""
from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("--prefill", required=True, metavar="URL[,URL]",
                        help="prefill servers, e.g. http://127.0.0.1:8101")
    parser.add_argument("--decode", required=True, metavar="URL[,URL]",
                        help="decode servers, e.g. http://127.0.0.1:8102,http://127.0.0.1:8103")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, metavar="P", help="default 8000")
    parser.add_argument("--timeout-s", type=float, default=120.0, metavar="S",
                        help="deadline of each upstream call, a whole generation included "
                             "(default 120)")
    parser.add_argument("--wait-s", type=float, default=600.0, metavar="S",
                        help="how long to wait for the servers to answer at start (default 600)")
    add_announce_argument(parser)
    parser.add_argument("--log-level", default="warning",
                        choices=("critical", "error", "warning", "info", "debug"))


def add_announce_argument(parser) -> None:
    parser.add_argument("--no-announce", dest="announce", action="store_false",
                        help="hand a request to its decode server only once its prefill is "
                             "computed (default: as soon as its prefill server announces "
                             "its blocks, just before its last prefill step, so the decode "
                             "server allocates and plans its reads while that step runs)")


def urls(text: str, flag: str) -> list[str]:
    out = [u.strip() for u in text.split(",") if u.strip()]
    bad = [u for u in out if not u.startswith(("http://", "https://"))]
    if not out or bad:
        raise ValueError(f"{flag} {text!r}: want comma-separated http:// URLs")
    return out


def run(args) -> int:
    prog = "pdbridge router"
    try:
        pre, dec = urls(args.prefill, "--prefill"), urls(args.decode, "--decode")
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if args.timeout_s <= 0:
        print(f"{prog}: --timeout-s must be > 0, got {args.timeout_s}", file=sys.stderr)
        return 2
    return run_router(pre, dec, args.host, args.port, args.timeout_s, args.wait_s,
                      args.log_level, prog, args.announce)


def run_router(pre, dec, host, port, timeout_s, wait_s, log_level, prog,
               announce: bool = True) -> int:
    from pdbridge.commands.serve import serve_app
    from pdbridge.serve.http_router import PDBackend, RouterConfigError, build_router_app
    backend = PDBackend(pre, dec, timeout_s=timeout_s, announce=announce)
    app = build_router_app(backend)
    try:
        return serve_app(app, host, port, log_level, prog,
                         f"router over {len(pre)} prefill + {len(dec)} decode servers",
                         before=lambda: backend.start(wait_s), after=backend.close)
    except RouterConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
