#!/usr/bin/env bash
# One call on a 2-GPU machine: the expert-parallel MoE tests and benchmark under torchrun, then the
# single-GPU quantisation / pre-dispatch tests and benches on GPU 0.  Results go to OUTDIR.
#   PYTHONPATH=. bash scripts/gpu_ep_run.sh OUTDIR
set -uo pipefail
out="${1:-results}"; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
nproc_gpu=$(nvidia-smi -L | wc -l)
timeout "${EP_TEST_S:-180}" python3 -m torch.distributed.run --nproc-per-node "$nproc_gpu" tests/gpu/test_moe_ep_gpu.py > "$out/ep_test.log" 2>&1
echo "ep test rc $?"; grep -E "PASS|FAIL|Error|error" "$out/ep_test.log" | tail -30
timeout "${EP_BENCH_S:-150}" python3 -m torch.distributed.run --nproc-per-node "$nproc_gpu" benchmarks/bench_moe_ep.py "$out" > "$out/ep_bench.log" 2>&1
echo "ep bench rc $?"; tail -25 "$out/ep_bench.log"
timeout "${ONE_TEST_S:-100}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_quant_gpu.py tests/gpu/test_pre_dispatch_gpu.py tests/cpu/test_quant.py tests/cpu/test_mqa.py tests/cpu/test_pre_dispatch.py -k "not compile and not aot and not sm90a" > "$out/one_tests.log" 2>&1
echo "single-GPU tests rc $?"; grep -E "passed|failed|FAILED|Error" "$out/one_tests.log" | tail -15
timeout "${ONE_BENCH_S:-70}" python3 -m fp8gemm bench quant moe_act --out "$out" --tag quant > /dev/null 2> "$out/quant.err"
echo "quant bench rc $?"; cat "$out/quant.txt" 2>/dev/null
