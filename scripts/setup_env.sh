#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install sdt-diffusion into it.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (it skips what is already done).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SDT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
fi
STAMP="$VENV/.sdt-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing torch, torchvision and sdt-diffusion[test] with every extra (first run takes a few minutes)"
  # torch and torchvision first, as a matching pair from one index; then the package with the test extra,
  # which pulls in all the others.
  "$VENV/bin/python" -m pip install -q torch torchvision 2>&1 | grep -v "^WARNING: Location" || true
  # An editable install of a package-dir mapping (pipelines/ -> sdt_diffusion.pipelines) goes through
  # setuptools' import hook, which always ends with an information-only "Editable installation." notice
  # about folders named like the package; ours is the package itself, so the notice is silenced.
  PYTHONWARNINGS="ignore:Editable installation" \
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import sdt_diffusion, torchvision, torch_fidelity, scipy, sklearn, matplotlib, timm, transformers, pytest" || {
    echo "[setup] installation failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
