"""A/B: the dense Gluon GEMM's tile order, GROUP_M m-blocks sweeping the n-blocks together (8, the default since
v1) against wider groups up to every m-block of the call (n-outer order: A stays in L2, B streams through once).

    PYTHONPATH=. python3 benchmarks/raster_ab.py [--ms 4096] [--groups 8,16,all] [--out DIR]

Why: with GROUP_M = 8 and m = 4096 (32 m-blocks) B is read from DRAM once per group of 8 m-blocks, four times in
all, while the 268 MB (n32768) / 201 MB (n24576) of output written in between evicts it from L2; where A is small
(k <= 2048: 2-8 MB) sweeping all 32 m-blocks per n-block keeps A resident and reads B once.  Session 12's
prediction (written before the run): n32768 k512 3-8% faster, n24576 k1536 2-6%, n7168 k2048 1-4%, the k >= 7168
rows level or slower (A is 29-67 MB there and would be re-read each wave).  The v2 sweep (GROUP_M 4/8/16, H200,
host-bound timings then) saw no difference on the large-K shapes.

Every run is NaN-poisoned and checked against the reference, then timed in interleaved rounds (CUDA-graph replays,
L2 flushed); A's scales MN-major (DeepGEMM's layout), DeepGEMM beside where ``import deep_gemm`` works, cuBLAS as
the baseline.  An explicit config is passed, so launch's two-launch split of a ragged N (n2112) is off in every run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import ab_header, ab_rounds  # noqa: E402
from fp8gemm.bench.suite_gemm import cublas_us, dense_ab_args, dense_operands  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402


def main():
    args, cases = dense_ab_args(groups="8,16,all")
    num_sms, dg = ab_header()
    rows = []
    for m, n, k in cases:
        a, sfa, b, sfb, d = dense_operands(m, n, k)
        cfg = G._config_for("dense", a, b, d, None, None, 256, num_sms)
        num_m = math.ceil(m / cfg.block_m)
        runs = {}
        for gtag in args.groups.split(","):
            gm = num_m if gtag == "all" else int(gtag)
            if gm > num_m:
                continue
            c = dataclasses.replace(cfg, group_m=gm)
            runs[f"group_m {gm}{' (all)' if gm == num_m else ''}"] = (
                lambda c=c: G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms, config=c))
        if dg is not None:
            runs["DeepGEMM"] = lambda: dg.fp8_gemm_nt((a, sfa), (b, sfb), d)
        rows += ab_rounds(f"m{m} n{n} k{k} ({cfg.block_m}x{cfg.block_n}{' tail' if cfg.bn_tail else ''})",
                          runs, d, R.fp8_gemm_nt(a, sfa, b, sfb), args.rounds, flops=2.0 * m * n * k,
                          baseline_us=cublas_us(a, sfa, b, sfb))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "raster_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
