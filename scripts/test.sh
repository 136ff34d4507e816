#!/usr/bin/env bash
# The whole test suite: set up the environment, then run pytest.
# The default run skips slow sweeps; `scripts/test.sh --slow` (or PDBRIDGE_SLOW=1) runs them too.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
