"""`pdbridge ...`: thin argument parsing; each subcommand lives in pdbridge/commands/<name>.py.

A command module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only
when its subcommand runs, so `pdbridge plan` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

COMMANDS = {
    "plan": ("plan", "print the transfer plan between a prefill and a decode TP size"),
    "bench": ("bench", "benchmarks (`pdbridge bench transfer`, `pdbridge bench engine`)"),
    "generate": ("generate", "run one monolithic engine and print the generated tokens"),
    "demo": ("demo", "end-to-end prefill -> transfer -> decode against a monolithic engine"),
    "serve": ("serve", "one engine behind HTTP: --role prefill, decode or both"),
    "router": ("router", "the OpenAI-compatible endpoint over prefill and decode servers"),
    "up": ("up", "router + prefill + decode servers on this machine; prints the URL"),
}


class _Parser(argparse.ArgumentParser):
    """Bad flags: a one-line error, then the usage, exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        self.print_usage(sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pdbridge", description=__doc__.splitlines()[0].strip("`: "))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(f"pdbridge.commands.{module}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C: every `finally` runs (servers stop their children)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    # SIGTERM's default ends the process where it stands, skipping every `finally`; uvicorn
    # also re-raises it once its server stopped. Unwind instead (status 143).
    main_thread = threading.current_thread() is threading.main_thread()   # signals: only there
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(_load(args._module).run(args) or 0)
    except KeyboardInterrupt as e:  # engines closed on the way out (their context managers)
        term = isinstance(e, Terminated)
        print(f"pdbridge {args.command}: {'terminated' if term else 'interrupted'}",
              file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit here: an interrupt that landed in C-run Python code (torch's import) leaves
        # CPython's "unhandled KeyboardInterrupt" flag set although it was handled, and the
        # interpreter would then end itself with SIGINT (-2) instead of status 130.
        os._exit(143 if term else 130)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
