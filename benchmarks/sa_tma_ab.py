"""A/B: A's MN-major scales into shared memory by one TMA box a stage (``gemm_gluon.SA_TMA``, session 12) against
the producer warp's cp.async copies (SA_SMEM as since session 9), on the dense ANCHORS rows (m = 64, 128, 4096) and
masked/contiguous grouped rows; DeepGEMM beside where ``import deep_gemm`` works.

    PYTHONPATH=. python3 benchmarks/sa_tma_ab.py [--only dense,masked,contiguous] [--ms 64,128,4096] [--out DIR]

Why: at m = 64/128 the Gluon kernel is 0.88-0.95x DeepGEMM (this session, H100), and session 8's DIAG 5 (no scale
loads at all) put the small-m tiles at DeepGEMM's time; SA_SMEM recovered most of it, and what is left is the
scale transport: 32 lanes x BLOCK_M / 32 four-byte cp.async copies and 32 arrivals a stage against one TMA box
counted in the stage's expect (how DeepGEMM loads them).  Prediction (written before the run): m = 64/128 rows
3-9% faster, m = 4096 and the grouped rows level to 3% faster.

Every run NaN-poisoned and checked against the reference first, then timed in interleaved rounds (CUDA-graph
replays, L2 flushed), cuBLAS the baseline for dense rows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8gemm import get_mn_major_tma_aligned_tensor as mn_major  # noqa: E402
from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import ab_header, ab_rounds  # noqa: E402
from fp8gemm.bench.suite_gemm import DENSE_NK, cublas_us, dense_operands  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402

MASKED = [(32, 192, 4096, 4096), (6, 1024, 4096, 2048), (32, 20, 6144, 7168), (6, 20, 7168, 3072)]
CONTIGUOUS = [(8, 4096, 4096, 7168), (4, 8192, 7168, 2048)]      # (groups, rows a group, n, k)


def _with_tma(on: bool, call):
    def run():
        old = G.SA_TMA
        G.SA_TMA = on
        try:
            return call()
        finally:
            G.SA_TMA = old
    return run


def _runs(call, dg_call=None) -> dict:
    runs = {"sa cp.async": _with_tma(False, call), "sa tma": _with_tma(True, call)}
    if dg_call is not None:
        runs["DeepGEMM"] = dg_call
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="dense,masked,contiguous")
    ap.add_argument("--ms", default="64,128,4096")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    num_sms, dg = ab_header()
    rows = []
    if "dense" in args.only:
        for m in (int(x) for x in args.ms.split(",")):
            for n, k in DENSE_NK:
                a, sfa, b, sfb, d = dense_operands(m, n, k)      # sfa MN-major
                runs = _runs(lambda: G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms),
                             (lambda: dg.fp8_gemm_nt((a, sfa), (b, sfb), d)) if dg is not None else None)
                rows += ab_rounds(f"m{m} n{n} k{k}", runs, d, R.fp8_gemm_nt(a, sfa, b, sfb), args.rounds,
                                  flops=2.0 * m * n * k, baseline_us=cublas_us(a, sfa, b, sfb))
    if "masked" in args.only:
        max_m = 4096
        for g, e, n, k in MASKED:
            masked_m = torch.full((g,), e, dtype=torch.int32, device="cuda")     # every group e rows
            a = torch.randn(g, max_m, k, device="cuda").to(torch.float8_e4m3fn)
            b = torch.randn(g, n, k, device="cuda").to(torch.float8_e4m3fn)
            sfa = mn_major(torch.rand(g, max_m, k // 128, device="cuda") + 0.5)
            sfb = torch.rand(g, math.ceil(n / 128), k // 128, device="cuda") + 0.5
            d = torch.empty(g, max_m, n, dtype=torch.bfloat16, device="cuda")
            runs = _runs(lambda: G.launch("masked", a, sfa, b, sfb, d, masked_m=masked_m, expected_m=e,
                                          num_sms=num_sms),
                         (lambda: dg.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, e))
                         if dg is not None else None)
            want = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, torch.zeros_like(d))
            # rows past masked_m are never written: poison and compare the valid rows only (a view of d)
            rows += ab_rounds(f"masked g{g} e{e} n{n} k{k}", runs, d[:, :e], want[:, :e], args.rounds,
                              nbytes=g * n * k + g * e * k + 2 * g * e * n)
    if "contiguous" in args.only:
        for g, per, n, k in CONTIGUOUS:
            m = g * per
            m_indices = torch.arange(g, device="cuda", dtype=torch.int32).repeat_interleave(per)
            a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
            b = torch.randn(g, n, k, device="cuda").to(torch.float8_e4m3fn)
            sfa = mn_major(torch.rand(m, k // 128, device="cuda") + 0.5)
            sfb = torch.rand(g, math.ceil(n / 128), k // 128, device="cuda") + 0.5
            d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            runs = _runs(lambda: G.launch("contiguous", a, sfa, b, sfb, d, m_indices=m_indices, num_sms=num_sms),
                         (lambda: dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, m_indices))
                         if dg is not None else None)
            want = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, torch.zeros_like(d))
            rows += ab_rounds(f"contig g{g} m{per} n{n} k{k}", runs, d, want, args.rounds, flops=2.0 * m * n * k)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sa_tma_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
