#!/usr/bin/env bash
# README command 2: set up everything on a fresh machine, then run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k pipeline`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m ruff check .
python -m pytest tests "$@"
