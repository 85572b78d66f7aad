"""A/B of the Gluon GEMM's barrier pairs (``GluonConfig.paired``): one partition barrier, one full wait and one
release per two K-slices instead of four, two and two.  One run, one card, cuBLAS side by side:

    PYTHONPATH=. python benchmarks/paired_ab.py [--out DIR] [--rounds 3]

Per row three configs, timed in interleaved rounds (CUDA-graph replays, L2 flushed): ``unpaired`` (what
``pick_config`` gives), ``unpaired-even`` (the paired config's stage count without pairs: separates the stage
count from the pairing) and ``paired``.  Every config's output is NaN-poisoned, run and compared with the
reference before anything is timed; a wrong one is reported and not timed.
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

from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import time_us  # noqa: E402
from fp8gemm.bench.suite_gemm import _scaled_mm  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402
from fp8gemm.testing import calc_diff  # noqa: E402

FP8 = torch.float8_e4m3fn
DENSE = [(4096, 576, 7168), (4096, 2112, 7168), (4096, 4096, 7168), (4096, 7168, 2048), (4096, 24576, 1536),
         (128, 4096, 7168)]
MASKED = [(6, 6144, 7168, 20), (32, 4096, 4096, 20), (6, 4096, 4096, 1024)]   # groups, n, k, expected_m


def _dense_case(m, n, k):
    a = torch.randn(m, k, device="cuda").to(FP8)
    b = torch.randn(n, k, device="cuda").to(FP8)
    sfa = (torch.rand(m, k // 128, device="cuda") + 0.5).t().contiguous().t()
    sfb = torch.rand(math.ceil(n / 128), k // 128, device="cuda") + 0.5
    d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    want = R.fp8_gemm_nt(a, sfa, b, sfb)
    kw = dict(mode="dense", a=a, sfa=sfa, b=b, sfb=sfb, d=d)
    return kw, want, (lambda: d), 2.0 * m * n * k, dict(a=a, sfa=sfa, b=b, sfb=sfb)


def _masked_case(g, n, k, expected):
    max_m = 4096 if expected < 1024 else 2048
    gen = torch.Generator(device="cpu").manual_seed(g * 1000 + expected)
    counts = torch.clamp((torch.rand(g, generator=gen) * 0.6 + 0.7) * expected, 1, max_m).int()
    a = torch.randn(g, max_m, k, device="cuda").to(FP8)
    b = torch.randn(g, n, k, device="cuda").to(FP8)
    sfa = (torch.rand(g, max_m, k // 128, device="cuda") + 0.5).transpose(1, 2).contiguous().transpose(1, 2)
    sfb = torch.rand(g, math.ceil(n / 128), k // 128, device="cuda") + 0.5
    d = torch.empty(g, max_m, n, dtype=torch.bfloat16, device="cuda")
    mm = counts.cuda()
    want = torch.cat([R.fp8_gemm_nt(a[i, :c], sfa[i, :c], b[i], sfb[i]) for i, c in enumerate(counts.tolist())])

    def got():
        return torch.cat([d[i, :c] for i, c in enumerate(counts.tolist())])
    kw = dict(mode="masked", a=a, sfa=sfa, b=b, sfb=sfb, d=d, masked_m=mm, expected_m=expected)
    return kw, want, got, 2.0 * int(counts.sum()) * n * k, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    cublas = _scaled_mm()
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs", flush=True)
    rows = []
    cases = [("dense", s) for s in DENSE] + [("masked", s) for s in MASKED]
    for kind, shape in cases:
        kw, want, got, flops, dense_in = _dense_case(*shape) if kind == "dense" else _masked_case(*shape)
        mode, d = kw.pop("mode"), kw["d"]
        m_or_g = shape[0]
        base = G._config_for(mode, kw["a"], kw["b"], d, None, kw.get("expected_m"), 256, num_sms)
        epi = base.block_m * base.block_n * 2
        paired = G.paired_config(base, epi)
        configs = {"unpaired": base, "unpaired-even": dataclasses.replace(paired, paired=False), "paired": paired}
        label = f"{kind} {'x'.join(map(str, shape))}"
        runs = {}
        for tag, cfg in configs.items():
            def run(cfg=cfg):
                G.launch(mode, num_sms=num_sms, config=cfg, **kw)
            d.fill_(float("nan"))
            run()
            torch.cuda.synchronize()
            diff = calc_diff(got().float(), want.float())
            ok = diff < 1e-3 and not torch.isnan(got()).any().item()
            print(f"{label} {tag:14s} {cfg.block_m}x{cfg.block_n} {cfg.stages} stages paired={G.paired_ok(cfg, shape[2])}"
                  f" diff {diff:.2e} {'ok' if ok else 'WRONG'}", flush=True)
            if ok:
                runs[tag] = run
        cb = None
        if cublas is not None and dense_in is not None:
            x = dense_in
            cb = min(time_us(lambda: cublas(x["a"], x["sfa"], x["b"], x["sfb"].t())) for _ in range(2))
        times = {t: [] for t in runs}
        for _ in range(args.rounds):
            for tag, run in runs.items():
                times[tag].append(time_us(run))
        for tag, ts in times.items():
            us = min(ts)
            print(f"{label} {tag:14s} {us:8.1f} us (rounds {', '.join(f'{t:.1f}' for t in ts)}) "
                  f"{flops / us / 1e6:6.0f} TFLOPS" + (f"  vs cuBLAS {cb:.1f} us: {cb / us:5.3f}x" if cb else ""),
                  flush=True)
            rows.append(dict(case=label, config=tag, us=us, rounds=ts, cublas_us=cb, m_or_groups=m_or_g))
        if "unpaired" in times and "paired" in times:
            print(f"{label} paired / unpaired: {min(times['unpaired']) / min(times['paired']):.3f}x faster", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "paired_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
