"""Tile sweep of the Gluon dense GEMM where the model's 128x128 pick leaves a ragged last wave (m = 4096 with
n = 576 and 2112: 160 and 544 tiles on 132 SMs).  One run, one card, cuBLAS side by side:

    PYTHONPATH=. python benchmarks/dense_tiles.py [--out DIR]

Every config's output is checked against the reference (NaN-poisoned first) before it is timed (CUDA-graph
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

from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import checked_run, time_us  # noqa: E402
from fp8gemm.bench.suite_gemm import cublas_us, dense_operands  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402

SHAPES = [(4096, 576, 7168), (4096, 2112, 7168), (4096, 4096, 7168)]
CONFIGS = [(128, 128, False), (128, 64, False), (128, 64, True), (128, 32, False), (64, 128, False),
           (64, 64, False)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs", flush=True)
    rows = []
    for m, n, k in SHAPES:
        a, sfa, b, sfb, d = dense_operands(m, n, k)
        want = R.fp8_gemm_nt(a, sfa, b, sfb)
        flops = 2.0 * m * n * k
        cb = cublas_us(a, sfa, b, sfb)
        pick = G.pick_config("dense", m, n, k, tma_store=True, num_sms=num_sms)
        print(f"m{m} n{n} k{k} cuBLAS {cb:8.1f} us {flops / cb / 1e6:6.0f} TFLOPS; pick {pick.block_m}x{pick.block_n}",
              flush=True)
        for bm, bn, rot in CONFIGS:
            cfg = G.GluonConfig(bm, bn, G._stages(bm, bn, bm * bn * 2), 8 if bm == 128 else 4, k_rotate=rot)

            def run(cfg=cfg):
                G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms, config=cfg)
            tag = f"{bm}x{bn}{' rot' if rot else ''}"
            try:
                ok, diff = checked_run(run, d, want)
                if not ok:
                    print(f"m{m} n{n} k{k} {tag:12s} WRONG diff {diff:.2e}", flush=True)
                    continue
                us = time_us(run)
            except Exception as e:  # noqa: BLE001 - a config that does not build is reported
                print(f"m{m} n{n} k{k} {tag:12s} FAILED {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            tiles = math.ceil(m / bm) * math.ceil(n / bn)
            print(f"m{m} n{n} k{k} {tag:12s} {us:8.1f} us {flops / us / 1e6:6.0f} TFLOPS  vs cuBLAS "
                  f"{cb / us if cb else float('nan'):5.3f}x  tiles {tiles} ({tiles / num_sms:.2f} waves)", flush=True)
            rows.append(dict(m=m, n=n, k=k, config=tag, us=us, cublas_us=cb, tiles=tiles))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dense_tiles.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
