"""Check that this Python environment holds exactly the distributions requirements.lock names.

Run by scripts/setup_env.sh after installing, so a machine that would test other versions
than CI's refuses with one line instead of failing somewhere later. Exit 0 when they agree,
1 (naming each difference) when not.

    python scripts/check_lock.py [--lock requirements.lock]
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOT_LOCKED = {"pip", "pdbridge"}     # the installer itself, and the project (editable)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()          # PEP 503


def read_lock(path: pathlib.Path) -> dict[str, str]:
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s;]+)", line)
        if not m:
            raise SystemExit(f"{path}:{n}: expected 'name==version', got {line!r}")
        pins[canonical(m[1])] = m[2]
    return pins


def installed() -> dict[str, str]:
    # The local label (torch's +cpu) is not part of the pin (scripts/lock.sh drops it).
    return {canonical(d.metadata["Name"]): d.version.split("+", 1)[0]
            for d in md.distributions() if canonical(d.metadata["Name"]) not in NOT_LOCKED}


def differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    out = [f"{n}: lock {v}, installed {have[n]}" for n, v in sorted(pins.items())
           if n in have and have[n] != v]
    out += [f"{n}: in the lock, not installed" for n in sorted(pins.keys() - have.keys())]
    out += [f"{n}=={have[n]}: installed, not in the lock" for n in sorted(have.keys() - pins.keys())]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", type=pathlib.Path, default=ROOT / "requirements.lock",
                    help="the lock file to compare with (default: requirements.lock)")
    args = ap.parse_args(argv)
    diff = differences(read_lock(args.lock), installed())
    if diff:
        print(f"environment differs from {args.lock.name} "
              f"(reinstall: rm -rf .venv; or refresh: bash scripts/lock.sh): " + "; ".join(diff),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
