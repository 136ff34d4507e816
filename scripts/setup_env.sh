#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv). Sourced by demo.sh and test.sh.
# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $venv" >&2
    "$py" -m venv "$venv"
fi
stamp="$venv/.pdbridge-installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing pdbridge and its dependencies (torch pinned by constraints.txt)" >&2
    # torch first, from the pinned CPU wheel, so nixl's resolver does not pick another build.
    "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" "torch==2.13.0"
    "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[test]"
    echo "$want" > "$stamp"
fi
