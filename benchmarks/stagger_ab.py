"""A/B of the dense m = 4096 GEMM: the default Gluon tile, the opt-in 128x256 tile with two independent
warpgroups, and the same with warpgroup 1 started one MMA late (``GluonConfig.stagger``), beside cuBLAS.
Question (benchmarks/GLUON_NOTES.md, v6): does promoting in turn instead of at once bring the main loop
toward its no-promotion time?

    PYTHONPATH=. python benchmarks/stagger_ab.py [--rounds 3] [--out DIR]

Every variant's output is checked against the reference (NaN-poisoned output first) before it is timed;
timings are CUDA-graph replays with the L2 flushed, rounds interleaved, the median of the rounds reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import time_us  # noqa: E402
from fp8gemm.bench.suite_gemm import _scaled_mm  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402
from fp8gemm.testing import calc_diff  # noqa: E402

SHAPES = [(4096, 4096, 7168), (4096, 2112, 7168), (4096, 7168, 2048), (4096, 24576, 1536)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    cublas = _scaled_mm()
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs", flush=True)
    rows = []
    for m, n, k in SHAPES:
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        sfa = (torch.rand(m, k // 128, device="cuda") + 0.5).t().contiguous().t()
        sfb = torch.rand(math.ceil(n / 128), k // 128, device="cuda") + 0.5
        d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        want = R.fp8_gemm_nt(a, sfa, b, sfb)
        wide = G.wide_config()
        variants = {"default": None, "wide": wide, "wide+stagger": dataclasses.replace(wide, stagger=True)}
        runs = {}
        for name, cfg in variants.items():
            def run(cfg=cfg):
                G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms, config=cfg)
            d.fill_(float("nan"))
            run()
            torch.cuda.synchronize()
            diff = calc_diff(d, want)
            ok = diff < 1e-3 and not torch.isnan(d).any().item()
            print(f"m{m} n{n} k{k} {name:13s} check diff {diff:.2e} {'ok' if ok else 'WRONG'}", flush=True)
            if ok:
                runs[name] = run
        if cublas is not None:
            runs["cuBLAS"] = lambda: cublas(a, sfa, b, sfb.t())
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(time_us(fn))
        flops = 2.0 * m * n * k
        base = statistics.median(times["default"]) if "default" in times else None
        for name, ts in times.items():
            us = statistics.median(ts)
            line = f"m{m} n{n} k{k} {name:13s} {us:8.1f} us {flops / us / 1e6:6.0f} TFLOPS"
            if base:
                line += f"  default/this {base / us:5.3f}"
            if "cuBLAS" in times:
                line += f"  vs cuBLAS {statistics.median(times['cuBLAS']) / us:5.3f}x"
            print(line, flush=True)
            rows.append(dict(m=m, n=n, k=k, variant=name, us=us, rounds=ts))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stagger_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
