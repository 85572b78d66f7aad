"""Sweep the portable Triton kernel's tile configurations on the GPU, to set gemm_dispatch.triton_config.

    PYTHONPATH=. python3 benchmarks/sweep_triton.py [OUT.json]

Prints, per shape, each config's µs and the best; every config's output is checked against the reference.
"""
import itertools
import json
import math
import os
import sys

os.environ["FP8GEMM_BACKEND"] = "triton"  # the sweep is about the portable kernel

import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm.bench.core import time_us
from fp8gemm.kernels import gemm_dispatch
from fp8gemm.kernels.gemm_dispatch import TritonConfig
from fp8gemm.testing import calc_diff

DENSE_NK = [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def configs(m):
    out = []
    if m <= 64:
        for bm, bn, st in itertools.product([16, 32, 64], [32, 64, 128], [4, 6]):
            if bm >= m or bm == 64:
                out.append(TritonConfig(bm, bn, 128, True, 4, st))
    for bm, bn, w, st in [(64, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 6), (128, 64, 4, 4), (128, 128, 8, 3),
                          (128, 128, 8, 4), (128, 256, 8, 3), (64, 256, 4, 3)]:
        if m > 64 or bm == 64:
            out.append(TritonConfig(bm, bn, 128, False, w, st))
    return out


def run(label, m, call, ref_fn, out_tensor, mode_rows):
    results = []
    original = gemm_dispatch.triton_config
    for cfg in configs(mode_rows):
        gemm_dispatch.triton_config = lambda *a, cfg=cfg, **k: cfg
        try:
            out_tensor.fill_(float("nan"))
            call()
            err = ref_fn()
            us = time_us(call) if err < 1e-3 else float("nan")
        except Exception as exc:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            err, us = float("nan"), float("nan")
            print(f"  {cfg}: {type(exc).__name__}", file=sys.stderr)
        finally:
            gemm_dispatch.triton_config = original
        results.append({"shape": label, "cfg": cfg.__dict__, "us": us, "err": err})
    ok = [r for r in results if r["us"] == r["us"]]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    print(f"{label:32} best {best['us'] if best else float('nan'):8.1f} us  {best['cfg'] if best else ''}")
    return results


def main():
    out = []
    torch.manual_seed(0)
    for m in [1, 64, 128]:
        for n, k in DENSE_NK:
            a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
            b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
            sfa = torch.rand(m, k // 128, device="cuda") + 0.5
            sfb = torch.rand(math.ceil(n / 128), k // 128, device="cuda") + 0.5
            d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            ref = R.fp8_gemm_nt(a, sfa, b, sfb)
            out += run(f"dense m{m} n{n} k{k}", m, lambda: fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d),
                       lambda: calc_diff(d, ref), d, m)
    for g, e, n, k in [(32, 192, 4096, 4096), (6, 1024, 4096, 4096), (6, 20, 4096, 2048)]:
        max_m = 4096
        mm = torch.full((g,), e, dtype=torch.int32, device="cuda")
        a = torch.randn(g, max_m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(g, n, k, device="cuda").to(torch.float8_e4m3fn)
        sfa = torch.rand(g, max_m, k // 128, device="cuda") + 0.5
        sfb = torch.rand(g, n // 128, k // 128, device="cuda") + 0.5
        d = torch.empty(g, max_m, n, dtype=torch.bfloat16, device="cuda")
        ref = torch.stack([R.fp8_gemm_nt(a[i, :e], sfa[i, :e], b[i], sfb[i]) for i in range(g)])
        out += run(f"masked g{g} e{e} n{n} k{k}", e,
                   lambda: fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, mm, e),
                   lambda: calc_diff(d[:, :e], ref), d, e)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
