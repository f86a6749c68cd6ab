#!/usr/bin/env bash
# README command 1: set up everything on a fresh machine, then run the end-to-end CPU demo
# (train SDT-P on scikit-learn's digits through training/train.py, export, sample, pictures).
# Extra arguments go to the demo (e.g. `bash scripts/demo.sh --fresh --steps 800`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m sdt_diffusion.tools.demo "$@"
