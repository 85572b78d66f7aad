#!/usr/bin/env bash
# One GPU call's worth of GEMM work, in order of what the next decision needs (see benchmarks/RESULTS.md,
# session 8, "Not yet run on a GPU"): the Gluon GEMM and PDL GPU tests (their SA_SMEM and grouped-TMA-under-PDL
# variants included), the SA_SMEM A/B, then the GEMM suite in interleaved rounds.  DeepGEMM joins every step
# where `import deep_gemm` works (this script does not build it); its kernels are compiled first, in the
# foreground, so that no timed row pays for them.
#
#   PYTHONPATH=. [STEPS=tests,sa_smem_ab,transpose_ab,ep_a2_ab,bench] bash benchmarks/gemm_gpu_round.sh OUT [SUITE_FILTER]
#
# Each step has its own time limit and writes its log under OUT; a short summary is printed last.  All three
# steps take about 8-10 minutes on an H100 (estimate), more than one device call allows: run `STEPS=tests,sa_smem_ab`
# and `STEPS=bench` as two calls.
set -u
out=${1:?usage: gemm_gpu_round.sh OUT [SUITE_FILTER]}
filter=${2:-'^(m4096|m64|m128) |^g\d+ e(192|1024|20) |m~'}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
steps=${STEPS:-tests,sa_smem_ab,bench}
step() {   # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2; shift 2
    [[ ",$steps," == *",$name,"* || ( $name == dg_prewarm && ",$steps," == *",bench,"* ) ]] || return 0
    echo "== $name (limit ${limit} s, at $(( $(date +%s) - start )) s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "   rc=$? ($(( $(date +%s) - start )) s)"
}
step tests 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gemm_gluon_gpu.py tests/gpu/test_pdl_gpu.py
step sa_smem_ab 240 python3 benchmarks/sa_smem_ab.py --out "$out"
# row-major scales copied MN-major per call (gemm_gluon.TRANSPOSE_ROW_MAJOR_FOR_SA) against the plain kernel
step transpose_ab 150 python3 benchmarks/sa_smem_ab.py --ms 4096 --only dense,contiguous --out "$out/transpose"
# the MoE layer's L2 scales MN-major against row-major, alternating, on the one-GPU test bed (64 experts)
ep_bed() { torchrun --nproc-per-node 1 benchmarks/bench_moe_ep.py "$@"; }
export -f ep_bed
step ep_a2_ab 200 bash -c 'for l in mn row mn row; do ep_bed /tmp/ep_$l --tokens 128,256 --experts 64 --a2-scales $l \
    | grep -E "^ +(128|256) |L2 A scales"; done'
if python3 -c "import deep_gemm" 2>/dev/null; then
    step dg_prewarm 150 python3 benchmarks/dg_prewarm.py --procs 3 --suites gemm --filter "$filter"
fi
step bench 360 python3 -m fp8gemm bench gemm --rounds 3 --filter "$filter" --out "$out" --tag gemm_rounds3
echo "== summary"
[[ -f $out/tests.log ]] && tail -n 4 "$out/tests.log"
[[ -f $out/sa_smem_ab.log ]] && grep -E "sa_global|sa_smem|DeepGEMM" "$out/sa_smem_ab.log" | head -n 60
[[ -f $out/transpose_ab.log ]] && grep -E "row sa_global|row->mn|mn sa_smem" "$out/transpose_ab.log"
[[ -f $out/ep_a2_ab.log ]] && cat "$out/ep_a2_ab.log"
[[ -f $out/bench.log ]] && grep -vE "^\[case|^.bench" "$out/bench.log" | tail -n 45
exit 0
