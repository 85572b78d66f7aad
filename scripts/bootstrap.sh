#!/usr/bin/env bash
# Set up fp8gemm in ./.venv (idempotent) and run one job: `demo` or `test` (extra args go to it).
#   bash scripts/bootstrap.sh demo   # the kernels on the GPU, or through the Triton interpreter without one
#   bash scripts/bootstrap.sh test   # the test suite (GPU tests are skipped without a GPU)
# Needs only python3 (>= 3.10). Without an NVIDIA GPU it installs torch's CPU build (FP8GEMM_TORCH to override).
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"; shift || true
PY="${PYTHON:-python3}"
VENV=".venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.fp8gemm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_spec="${FP8GEMM_TORCH:-torch>=2.9}"      # a CUDA build from PyPI
  else
    torch_spec="${FP8GEMM_TORCH:-torch==2.13.0}"   # CPU machines of this project carry this build locally
  fi
  "$VPY" -m pip install -q "$torch_spec" "triton==3.6.0" "numpy<2.3" pytest tqdm
  "$VPY" -m pip install -q --no-deps -e .
  touch "$stamp"
fi
case "$job" in
  demo) exec "$VPY" -m fp8gemm demo "$@" ;;
  test) exec "$VPY" -m pytest -q tests "$@" ;;
  bench) exec "$VPY" -m fp8gemm bench "$@" ;;
  *) echo "unknown job '$job' (demo, test or bench)" >&2; exit 2 ;;
esac
