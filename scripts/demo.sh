#!/usr/bin/env bash
# The main job: set up the environment, then run the end-to-end P/D demo.
# Extra arguments go to `pdbridge demo` (see `pdbridge demo --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
exec "$root/.venv/bin/pdbridge" demo "$@"
