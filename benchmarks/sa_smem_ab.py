"""A/B: A's scales through shared memory (``GluonConfig.sa_smem``, the producer's cp.async with each stage) against
the consumer's global loads two slices ahead, on the dense shapes of
ANCHORS.md (m = 64, 128, 4096; beside them at m <= 128 the split-K Triton kernel the public API picks there),
masked and contiguous grouped rows with A's scales row-major and MN-major, DeepGEMM beside where
``import deep_gemm`` works.

    PYTHONPATH=. python3 benchmarks/sa_smem_ab.py [--only dense,masked,contiguous] [--ms 64,128,4096] [--out DIR]

"row->mn sa_smem" (m > 256 and contiguous rows): ``gemm_gluon.TRANSPOSE_ROW_MAJOR_FOR_SA`` on (the default since
session 10), so launch copies the row-major scales MN-major inside the timed call and runs SA_SMEM; "row sa_global"
passes an explicit config, which turns the copy off.  Session 10 (H200): 1.02-1.09x faster than "row sa_global"
where k >= 1536, level on contiguous g4 k = 2048; launch does not copy on n576 (the tail kernel has no SA_SMEM) nor
on n32768 k512 (4 K-slices).

Session 8's prediction (benchmarks/small_m_diag.py on an H100, DIAG 6: the A-scale loads cost 1.17-1.31x at m = 64/128 and
7-8% at 4096x4096x7168): m = 64/128 rows 1.15-1.3x faster, m = 4096 rows 3-8% faster.
Every run is NaN-poisoned and checked against the reference, then timed in interleaved rounds (CUDA-graph
replays, L2 flushed); A's scales row-major (as the library's benchmark passes them) and MN-major.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8gemm import get_mn_major_tma_aligned_tensor  # noqa: E402
from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import ab_header, ab_rounds  # noqa: E402
from fp8gemm.bench.suite_gemm import DENSE_NK, cublas_us, dense_operands  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402
from fp8gemm.kernels import gemm_skinny as S  # noqa: E402

MASKED = [(6, 1024, 4096, 2048), (32, 192, 4096, 4096), (32, 20, 4096, 7168), (6, 20, 7168, 3072)]
CONTIGUOUS = [(8, 4096, 4096, 7168), (4, 8192, 7168, 2048)]      # (groups, rows a group, n, k)


_mn = get_mn_major_tma_aligned_tensor       # the same scales MN-major (DeepGEMM's layout)


def _transposing(call):
    """``call`` with ``gemm_gluon.TRANSPOSE_ROW_MAJOR_FOR_SA`` on: launch itself copies row-major scales MN-major
    and runs SA_SMEM (the copy is timed with the GEMM)."""
    def run():
        old = G.TRANSPOSE_ROW_MAJOR_FOR_SA
        G.TRANSPOSE_ROW_MAJOR_FOR_SA = True
        try:
            return call()
        finally:
            G.TRANSPOSE_ROW_MAJOR_FOR_SA = old
    return run


def _layout_runs(cfg, sfa, call) -> dict:
    """The four runs of a grouped row: A's scales row-major and MN-major, each through global loads and through
    shared memory; ``call(sf, config)`` launches one."""
    runs = {}
    for tag, sf in (("row", sfa), ("mn", _mn(sfa))):
        for sa in (False, True):
            c = dataclasses.replace(cfg, sa_smem=sa)
            runs[f"{tag} {'sa_smem' if sa else 'sa_global'}"] = lambda c=c, sf=sf: call(sf, c)
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
                a, sfa_mn, b, sfb, d = dense_operands(m, n, k)
                sfa_row = sfa_mn.contiguous()
                cfg = G._config_for("dense", a, b, d, None, None, 256, num_sms)
                runs = {}
                for tag, sfa in (("row", sfa_row), ("mn", sfa_mn)):
                    for sa in (False, True):
                        c = dataclasses.replace(cfg, sa_smem=sa)
                        runs[f"{tag} {'sa_smem' if sa else 'sa_global'}"] = (
                            lambda sfa=sfa, c=c: G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms, config=c))
                if m > G.SA_SMEM_ROW_MAJOR_MAX_M:
                    # the candidate default for large row-major calls: launch copies the scales MN-major
                    runs["row->mn sa_smem"] = _transposing(
                        lambda: G.launch("dense", a, sfa_row, b, sfb, d, num_sms=num_sms, config=cfg))
                if m <= 128 and S.pays(m, n, k, num_sms):
                    # what the public API runs at this size today: the split-K swap-A/B Triton kernel
                    runs["skinny"] = lambda: S.launch(a, sfa_mn, b, sfb, d, num_sms)
                if dg is not None:
                    runs["DeepGEMM"] = lambda: dg.fp8_gemm_nt((a, sfa_mn), (b, sfb), d)
                rows += ab_rounds(f"m{m} n{n} k{k}", runs, d, R.fp8_gemm_nt(a, sfa_mn, b, sfb), args.rounds,
                                  flops=2.0 * m * n * k, baseline_us=cublas_us(a, sfa_mn, b, sfb) if m > 1 else None)
    if "masked" in args.only:
        max_m = 4096
        for g, e, n, k in MASKED:
            counts = torch.full((g,), e, dtype=torch.int32)
            masked_m = counts.cuda()
            a = torch.randn(g, max_m, k, device="cuda").to(torch.float8_e4m3fn)
            b = torch.randn(g, n, k, device="cuda").to(torch.float8_e4m3fn)
            sfa = torch.rand(g, max_m, k // 128, device="cuda") + 0.5
            sfb = torch.rand(g, math.ceil(n / 128), k // 128, device="cuda") + 0.5
            d = torch.empty(g, max_m, n, dtype=torch.bfloat16, device="cuda")
            cfg = G._config_for("masked", a, b, d, None, e, 256, num_sms)
            runs = _layout_runs(cfg, sfa, lambda sf, c: G.launch(
                "masked", a, sf, b, sfb, d, masked_m=masked_m, expected_m=e, num_sms=num_sms, config=c))
            if dg is not None:
                sfa_mn = _mn(sfa)
                runs["DeepGEMM"] = lambda: dg.m_grouped_fp8_gemm_nt_masked((a, sfa_mn), (b, sfb), d, masked_m, e)
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
            sfa = torch.rand(m, k // 128, device="cuda") + 0.5
            sfb = torch.rand(g, math.ceil(n / 128), k // 128, device="cuda") + 0.5
            d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            cfg = G._config_for("contiguous", a, b, d, None, None, 256, num_sms)
            runs = _layout_runs(cfg, sfa, lambda sf, c: G.launch(
                "contiguous", a, sf, b, sfb, d, m_indices=m_indices, num_sms=num_sms, config=c))
            runs["row->mn sa_smem"] = _transposing(lambda: G.launch(
                "contiguous", a, sfa, b, sfb, d, m_indices=m_indices, num_sms=num_sms, config=cfg))
            if dg is not None:
                sfa_mn = _mn(sfa)
                runs["DeepGEMM"] = lambda: dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa_mn), (b, sfb), d, m_indices)
            want = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, torch.zeros_like(d))
            rows += ab_rounds(f"contig g{g} m{per} n{n} k{k}", runs, d, want, args.rounds, flops=2.0 * m * n * k)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sa_smem_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
