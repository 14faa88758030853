#!/usr/bin/env bash
# Run the checks CI runs: install (cached), lint, then the whole test suite against real
# Redis and a real Label Studio started by the test harness. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
