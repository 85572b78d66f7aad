#!/usr/bin/env bash
# One call on a GPU machine: GPU tests + benchmark, everything written to the folder given (default results/).
#   PYTHONPATH=. bash scripts/gpu_run.sh OUTDIR [pytest-selection] [bench suites...]
# Uses the machine's python3 (torch + triton preinstalled); installs nothing.
set -uo pipefail
out="${1:-results}"; shift || true
sel="${1:-tests}"; shift || true
suites="${*:-gemm}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q $sel -p no:cacheprovider --junitxml="$out/junit.xml" 2>&1 | tail -n 40 > "$out/tests.log"
test_rc=${PIPESTATUS[0]}
python3 -m fp8gemm bench $suites --out "$out" --tag bench ${BENCH_ARGS:-} 2>"$out/bench.err" | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "== tests (rc $test_rc) =="; tail -n 15 "$out/tests.log"
echo "== bench (rc $bench_rc) =="; tail -n 5 "$out/bench.err"
cat "$out/bench.log"
