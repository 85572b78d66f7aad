"""Dense FP8 GEMMs with few rows: the warp-specialised Gluon kernel vs the split-K swap-A/B kernel
(``fp8gemm/kernels/gemm_skinny.py``) at several tiles and splits, one GPU, one process.

    PYTHONPATH=. python3 benchmarks/skinny_ab.py --out $OUT [--ms 1,4,16] [--rounds 2]

Every variant's output is checked against the FP32 reference first (NaN-poisoned, diff < 1e-3); times are
medians of CUDA-graph replays after a write L2 flush (``time_us``), the variants interleaved within each
round. ANCHORS' DeepGEMM µs (H100, m = 1) are printed beside the m = 1 rows for reference (another run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm.bench.core import ab_rounds
from fp8gemm.bench.suite_gemm import dense_operands
from fp8gemm.kernels import gemm_dispatch
from fp8gemm.kernels import gemm_skinny as KS

NK = [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DEEPGEMM_H100_M1 = {(2112, 7168): 18.0, (576, 7168): 16.0, (24576, 1536): 27.7, (32768, 512): 17.0,
                    (7168, 16384): 58.9, (4096, 7168): 23.2, (7168, 2048): 15.5}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    max_m_default = gemm_dispatch.SKINNY_MAX_M
    rows = []
    for m in [int(v) for v in args.ms.split(",")]:
        for n, k in NK:
            a, sfa, b, sfb, d = dense_operands(m, n, k)
            want = R.fp8_gemm_nt(a, sfa, b, sfb)
            plan = KS.plan(m, n, k, num_sms)

            def gluon():
                gemm_dispatch.SKINNY_MAX_M = 0          # the public API without the skinny kernel
                fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)

            variants = {"gluon": gluon, f"skinny plan {plan.block_n}x{plan.split}":
                        (lambda plan=plan: KS.launch(a, sfa, b, sfb, d, num_sms, plan))}
            for bn, split, stages in ((64, plan.split * 2, 6), (64, max(1, plan.split // 2), 6), (128, 0, 6),
                                      (64, plan.split, 4), (64, plan.split, 8)):
                if bn == 128:
                    split = max(1, min(round(num_sms / -(-n // 128)), k // 512))
                cfg = KS.SkinnyConfig(block_n=bn, block_m=plan.block_m, split=split, num_stages=stages)
                variants[f"skinny {bn}x{split} s{stages}"] = (
                    lambda cfg=cfg: KS.launch(a, sfa, b, sfb, d, num_sms, cfg))
            if m > 32:      # narrower token blocks (more programs, fewer A bytes each) and 8 warps
                for name, cfg in ((f"skinny {plan.block_n}x{plan.split} m32", dict(block_m=32)),
                                  (f"skinny {plan.block_n}x{plan.split} w8", dict(num_warps=8))):
                    c = dataclasses.replace(plan, **cfg)
                    variants[name] = (lambda c=c: KS.launch(a, sfa, b, sfb, d, num_sms, c))
            if m > 64:      # every token in one block (weights read once): 8 warps, two warpgroups split the tokens
                one = KS.plan(64, n, k, num_sms).split
                for split, stages in ((one, 4), (2 * one, 4), (one, 3)):
                    c = KS.SkinnyConfig(block_n=64, block_m=128, split=split, num_warps=8, num_stages=stages)
                    variants[f"skinny 64x{split} m128 w8 s{stages}"] = (
                        lambda c=c: KS.launch(a, sfa, b, sfb, d, num_sms, c))
            dg = DEEPGEMM_H100_M1.get((n, k)) if m == 1 else None
            label = f"m{m:<3d} n{n:<6d} k{k:<6d}" + (f" (DeepGEMM H100 {dg} us)" if dg else "")
            got = ab_rounds(label, variants, d, want, args.rounds, nbytes=n * k + m * k + m * n * 2)
            gemm_dispatch.SKINNY_MAX_M = max_m_default
            rows += [dict(r, m=m, n=n, k=k, deepgemm_h100_us=dg) for r in got]
    with open(os.path.join(args.out, "skinny_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
