"""A/B: each tile's epilogue after the next tile's scale loads and first MMA are issued (``NEXT_FIRST``,
``gemm_gluon.NEXT_FIRST_MODES``) against the plain order (epilogue, then the next tile), through ``launch`` as the
public API calls it (config picked per call; n2112 split in two launches, n576 on the tail kernel, which has no
NEXT_FIRST), on the dense m = 4096 rows of ANCHORS.md with A's scales MN-major and row-major, and masked rows;
DeepGEMM beside where ``import deep_gemm`` works, cuBLAS as the dense baseline.

    PYTHONPATH=. python3 benchmarks/next_first_ab.py [--only dense,masked] [--ms 4096] [--out DIR]

Prediction (session 11, before any run): the plain kernel leaves the tensor cores idle from a tile's last MMA to the
next tile's first (promotion, epilogue, scale loads, ~1000 cycles a tile by the session-9 H200 times against the
767-cycle slice period), so the gain grows as K shrinks: n32768 k512 (4 slices a tile) 10-25% faster, n24576 k1536
and n7168 k2048 5-10%, the k = 7168/16384 rows 1-3%; masked rows with k >= 2048 within +-2%.
Every run is NaN-poisoned and checked against the reference, then timed in interleaved rounds (CUDA-graph
replays, L2 flushed).
"""
from __future__ import annotations

import argparse
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

MASKED = [(6, 1024, 4096, 2048), (6, 1024, 6144, 7168), (32, 192, 4096, 4096), (32, 20, 4096, 7168),
          (6, 20, 7168, 3072)]


def _with_modes(modes, call):
    """``call`` with ``gemm_gluon.NEXT_FIRST_MODES`` set to ``modes`` for its duration."""
    def run():
        old = G.NEXT_FIRST_MODES
        G.NEXT_FIRST_MODES = modes
        try:
            return call()
        finally:
            G.NEXT_FIRST_MODES = old
    return run


def _pair(runs: dict, tag: str, call) -> None:
    runs[f"{tag} plain"] = _with_modes((), call)
    runs[f"{tag} next_first"] = _with_modes(("dense", "masked"), call)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="dense,masked")
    ap.add_argument("--ms", default="4096")
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
                runs = {}
                for tag, sfa in (("mn", sfa_mn), ("row", sfa_row)):
                    _pair(runs, tag, lambda sfa=sfa: G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms))
                if dg is not None:
                    runs["DeepGEMM"] = lambda: dg.fp8_gemm_nt((a, sfa_mn), (b, sfb), d)
                rows += ab_rounds(f"m{m} n{n} k{k}", runs, d, R.fp8_gemm_nt(a, sfa_mn, b, sfb), args.rounds,
                                  flops=2.0 * m * n * k, baseline_us=cublas_us(a, sfa_mn, b, sfb))
    if "masked" in args.only:
        max_m = 4096
        for g, e, n, k in MASKED:
            masked_m = torch.full((g,), e, dtype=torch.int32, device="cuda")
            a = torch.randn(g, max_m, k, device="cuda").to(torch.float8_e4m3fn)
            b = torch.randn(g, n, k, device="cuda").to(torch.float8_e4m3fn)
            sfa = get_mn_major_tma_aligned_tensor(torch.rand(g, max_m, k // 128, device="cuda") + 0.5)
            sfb = torch.rand(g, math.ceil(n / 128), k // 128, device="cuda") + 0.5
            d = torch.empty(g, max_m, n, dtype=torch.bfloat16, device="cuda")
            runs = {}
            _pair(runs, "mn", lambda: G.launch("masked", a, sfa, b, sfb, d, masked_m=masked_m, expected_m=e,
                                                num_sms=num_sms))
            if dg is not None:
                runs["DeepGEMM"] = lambda: dg.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, e)
            want = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, torch.zeros_like(d))
            rows += ab_rounds(f"masked g{g} e{e} n{n} k{k}", runs, d[:, :e], want[:, :e], args.rounds,
                              flops=2.0 * g * e * n * k, nbytes=g * n * k + g * e * k + 2 * g * e * n)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "next_first_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
