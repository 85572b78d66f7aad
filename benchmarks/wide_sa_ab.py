"""A/B: the opt-in 128x256 ("wide") and split 128x128 dense tiles with A's scales through shared memory (SA_SMEM,
session 12) against the production 128x128 kernel, on the dense m = 4096 rows of ANCHORS.md.

    PYTHONPATH=. python3 benchmarks/wide_sa_ab.py [--ms 4096] [--variants pick,wide,split] [--out DIR]

Why: both forms keep DeepGEMM's order per warpgroup (MMA, wait, promote while the other warpgroup's MMA runs; one
scratch accumulator), and both were measured (sessions 2-4) while every warpgroup still loaded A's scales from
global memory one slice ahead, which SA_SMEM later showed to cost the default kernel 3-12% at m = 4096 (sessions
8-9).  Session 12's prediction (written before the run): wide + SA 0.95-1.05x the production kernel on the k7168
rows (the session-3 gap was 0.93x on n4096, H100), split + SA about the same as production; if either wins by more
than 3% on n4096/n7168 the promotion order is worth a default.

Every run NaN-poisoned and checked against the reference first, then timed in interleaved rounds (CUDA-graph
replays, L2 flushed); A's scales MN-major (SA_SMEM on for all three), cuBLAS the baseline, DeepGEMM beside where
``import deep_gemm`` works.  Explicit configs: launch's two-launch split of a ragged N (n2112) is off.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import ab_header, ab_rounds  # noqa: E402
from fp8gemm.bench.suite_gemm import cublas_us, dense_ab_args, dense_operands  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402


def main():
    args, cases = dense_ab_args(variants="pick,wide,split")
    num_sms, dg = ab_header()
    configs = {"pick": None, "wide": G.wide_config(), "split": G.split_config()}
    rows = []
    for m, n, k in cases:
        a, sfa, b, sfb, d = dense_operands(m, n, k)
        pick = G._config_for("dense", a, b, d, None, None, 256, num_sms)
        runs = {}
        for v in args.variants.split(","):
            cfg = configs[v] or pick
            tag = f"{v} {cfg.block_m}x{cfg.block_n}{' tail' if cfg.bn_tail else ''}"
            runs[tag] = lambda cfg=cfg: G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms, config=cfg)
        if dg is not None:
            runs["DeepGEMM"] = lambda: dg.fp8_gemm_nt((a, sfa), (b, sfb), d)
        rows += ab_rounds(f"m{m} n{n} k{k}", runs, d, R.fp8_gemm_nt(a, sfa, b, sfb), args.rounds,
                          flops=2.0 * m * n * k, baseline_us=cublas_us(a, sfa, b, sfb))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wide_sa_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
