"""Probe (no kernel change): would split-K pay for the Gluon GEMM at m = 64/128 on the ANCHORS rows?

    PYTHONPATH=. python3 benchmarks/splitk_probe.py [--splits 2,4,8]

At m = 64/128 every tile reads all of A (m x K bytes) from L2, so narrow tiles (the picks: BLOCK_N 16-64, about
one wave) move (m / BLOCK_N + 1) x N x K bytes L2 -> SM; with S K-splits the tiles can be 128 wide and still fill
the SMs, moving about (m / 128 + 1) x N x K.  This times the split kernel's main phase by proxy: the same kernel on
[m, K/S] x [S*N, K/S] (S times the columns, a S-th of K: the tiles, K-slices a tile and bytes of S splits), beside the
reduction a split-K call would add (S FP32 partials [m, N] summed into BF16, a torch reduction as its upper bound),
and the production call.  Session 12's prediction (written before the run): the proxy plus the reduction at or
below 0.8x the production time on the k7168 rows (n2112, n4096) at m = 64, no gain at k <= 2048.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8gemm.bench.core import ab_header, time_us  # noqa: E402
from fp8gemm.bench.suite_gemm import DENSE_NK, dense_operands  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="64,128")
    ap.add_argument("--splits", default="2,4,8")
    args = ap.parse_args()
    num_sms, dg = ab_header()
    for m in (int(x) for x in args.ms.split(",")):
        for n, k in DENSE_NK:
            a, sfa, b, sfb, d = dense_operands(m, n, k)
            pick = G._config_for("dense", a, b, d, None, None, 256, num_sms)
            base = time_us(lambda: G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms))
            line = f"m{m} n{n} k{k} pick {pick.block_m}x{pick.block_n} {base:6.1f} us"
            if dg is not None:
                line += f" | DeepGEMM {time_us(lambda: dg.fp8_gemm_nt((a, sfa), (b, sfb), d)):6.1f}"
            for s in (int(x) for x in args.splits.split(",")):
                if k % (128 * s):
                    continue
                a2, sfa2, b2, sfb2, d2 = dense_operands(m, s * n, k // s)
                cfg = G._config_for("dense", a2, b2, d2, None, None, 256, num_sms)
                main_us = time_us(lambda: G.launch("dense", a2, sfa2, b2, sfb2, d2, num_sms=num_sms, config=cfg))
                parts = torch.randn(s, m, n, device="cuda")
                red_us = time_us(lambda: d.copy_(parts.sum(0)))
                line += (f" | S{s} {cfg.block_m}x{cfg.block_n} {main_us:5.1f}+{red_us:4.1f}="
                         f"{main_us + red_us:5.1f} ({base / (main_us + red_us):4.2f}x)")
            print(line, flush=True)


if __name__ == "__main__":
    main()
