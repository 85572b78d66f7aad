#!/usr/bin/env bash
# One multi-GPU call's worth of EP work (#7): the EP GPU tests under torchrun on every GPU, then the layer
# benchmark three times, alternating the combine's tail launch (default L/8 tail experts, then 0, then the
# default again), the first run with --trace; or (STEPS=tests,fp8,bf16,fp8b) the FP8 combine payload against
# BF16, alternating.  Each step has its own time limit and log under OUT.
#
#   PYTHONPATH=. bash benchmarks/ep_gpu_round.sh OUT [TOKENS]
set -u
out=${1:?usage: ep_gpu_round.sh OUT [TOKENS]}
tokens=${2:-32,128,256}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=$(nvidia-smi -L | wc -l)
start=$(date +%s)
steps=${STEPS:-tests,tail_default,tail_0,tail_default2}
step() {   # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2; shift 2
    [[ ",$steps," == *",$name,"* ]] || return 0
    echo "== $name (limit ${limit} s, at $(( $(date +%s) - start )) s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "   rc=$? ($(( $(date +%s) - start )) s)"
    grep -E "ALL PASS|FAIL|MISMATCH|Error" "$out/$name.log" | head -n 5
}
bench=(torchrun --nproc-per-node "$n" benchmarks/bench_moe_ep.py)
step tests 150 torchrun --nproc-per-node "$n" tests/gpu/test_moe_ep_gpu.py
step tail_default 180 "${bench[@]}" "$out/tail_default" --tokens "$tokens" --trace
step tail_0 130 "${bench[@]}" "$out/tail_0" --tokens "$tokens" --tail-experts 0
(( $(date +%s) - start < 440 )) && step tail_default2 120 "${bench[@]}" "$out/tail_default2" --tokens "$tokens"
# the FP8 combine payload against BF16, alternating (STEPS=tests,fp8,bf16,fp8b)
step fp8 150 "${bench[@]}" "$out/fp8" --tokens "$tokens" --combine-payload fp8 --trace
step bf16 130 "${bench[@]}" "$out/bf16" --tokens "$tokens"
(( $(date +%s) - start < 470 )) && step fp8b 120 "${bench[@]}" "$out/fp8b" --tokens "$tokens" --combine-payload fp8
echo "== summary ($n GPUs)"
for s in tail_default tail_0 tail_default2 fp8 bf16 fp8b; do
    [[ -f $out/$s.log ]] || continue
    echo "-- $s"; grep -A 12 "^MoE EP layer" "$out/$s.log" | grep -vE "^bytes per rank"
    grep "^\[bench\] trace" "$out/$s.log"
done
# the device returns at most 8 files: one log, the three JSONs, the first timeline
for s in tests tail_default tail_0 tail_default2 fp8 bf16 fp8b; do
    [[ -f $out/$s.log ]] && { echo "##### $s"; cat "$out/$s.log"; rm "$out/$s.log"; }
done > "$out/logs.txt"
rm -f "$out"/{tail_0,tail_default2,bf16,fp8b}/moe_ep_timeline.png
exit 0
