#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv). Sourced by demo.sh and test.sh.
# Installs exactly the versions in requirements.lock (runtime and test, the build backend
# included), so every machine tests what CI tests; `bash scripts/lock.sh` refreshes the lock.
# Re-installs only when pyproject.toml, constraints.txt or requirements.lock changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "[setup] requirements.lock is resolved for Python 3.11; $py is $("$py" --version 2>&1)." \
         "Set PYTHON=python3.11 (or refresh the lock: bash scripts/lock.sh)" >&2
    exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $venv" >&2
    "$py" -m venv "$venv"
fi
stamp="$venv/.pdbridge-installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" "$root/requirements.lock" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing the locked dependencies (requirements.lock) and pdbridge" >&2
    pip=("$venv/bin/python" -m pip install -q -c "$root/constraints.txt")
    # torch first, from the pinned local CPU wheel, so nothing else can pull another build.
    "${pip[@]}" "torch==2.13.0"
    "${pip[@]}" -r "$root/requirements.lock"
    # The project itself: no resolving (its dependencies are the lock's) and no build
    # isolation (which would fetch the newest setuptools; the lock pins it).
    "${pip[@]}" --no-deps --no-build-isolation -e "$root"
    "$venv/bin/python" "$root/scripts/check_lock.py"
    echo "$want" > "$stamp"
fi
