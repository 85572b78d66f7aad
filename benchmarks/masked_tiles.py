"""Tile sweep of the Gluon masked GEMM at the weight-bound decode shapes (expected_m 20): does a narrower
BLOCK_N (more tiles, fewer idle SMs in the last wave) beat the model's pick?  One run, one card:

    PYTHONPATH=. python benchmarks/masked_tiles.py [--out DIR]

Rows are ANCHORS.md's masked rows (max_m 4096, masked_m drawn as the bench suite draws it).  Every config's
output is compared with the reference on the valid rows before it is timed (CUDA-graph replays, L2 flushed).
GB/s counts the weights, the valid A rows and the BF16 output rows; % is of the 3010 GB/s H100 copy ceiling
(ANCHORS.md) and of the copy measured in the same process.
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
from fp8gemm.bench.core import time_us  # noqa: E402
from fp8gemm.bench.suite_gemm import GROUPED_NK  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402
from fp8gemm.testing import calc_diff  # noqa: E402

FP8 = torch.float8_e4m3fn


def _copy_gbs() -> float:
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / time_us(lambda: dst.copy_(src)) / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--groups", default="6,32")
    args = ap.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_gbs = _copy_gbs()
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs, in-process copy {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    max_m, expected = 4096, 20
    for g in (int(x) for x in args.groups.split(",")):
        for n, k in GROUPED_NK:
            gen = torch.Generator(device="cpu").manual_seed(g * 1000 + expected)
            counts = torch.clamp((torch.rand(g, generator=gen) * 0.6 + 0.7) * expected, 1, max_m).int()
            mm = counts.cuda()
            a = torch.randn(g, max_m, k, device="cuda").to(FP8)
            b = torch.randn(g, n, k, device="cuda").to(FP8)
            sfa = torch.rand(g, max_m, k // 128, device="cuda") + 0.5
            sfb = torch.rand(g, math.ceil(n / 128), k // 128, device="cuda") + 0.5
            # the layouts the public API hands the kernel: MN-major A scales
            sfa = sfa.transpose(1, 2).contiguous().transpose(1, 2)
            d = torch.empty(g, max_m, n, dtype=torch.bfloat16, device="cuda")
            total = int(counts.sum())
            nbytes = g * n * k + total * k + 2 * total * n
            want = torch.cat([R.fp8_gemm_nt(a[i, :c], sfa[i, :c], b[i], sfb[i]) for i, c in enumerate(counts.tolist())])
            pick = G.pick_config("masked", max_m, n, k, groups=g, expected_m=expected, num_sms=num_sms)
            cfgs = [None]
            for bn in (32, 64, 128):
                for rot in (False, True):
                    c = G.GluonConfig(64, bn, G._stages(64, bn, 64 * bn * 4), 4, k_rotate=rot)
                    if (c.block_n, c.k_rotate) != (pick.block_n, pick.k_rotate) or pick.block_m != 64:
                        cfgs.append(c)
            for cfg in cfgs:
                tag = "pick " + f"{pick.block_m}x{pick.block_n}" if cfg is None else \
                    f"64x{cfg.block_n}{' rot' if cfg.k_rotate else ''}"

                def run(cfg=cfg):
                    G.launch("masked", a, sfa, b, sfb, d, masked_m=mm, expected_m=expected, num_sms=num_sms,
                             config=cfg)
                try:
                    d.fill_(float("nan"))
                    run()
                    torch.cuda.synchronize()
                    got = torch.cat([d[i, :c] for i, c in enumerate(counts.tolist())])
                    diff = calc_diff(got, want)
                    if not diff < 1e-3:
                        print(f"g{g} n{n} k{k} {tag:14s} WRONG diff {diff:.2e}", flush=True)
                        continue
                    us = time_us(run)
                except Exception as e:  # noqa: BLE001 - a config that does not build is reported
                    print(f"g{g} n{n} k{k} {tag:14s} FAILED {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                gbs = nbytes / us / 1e3
                tiles = g * math.ceil(expected / 64) * math.ceil(n / (pick.block_n if cfg is None else cfg.block_n))
                print(f"g{g} e{expected} n{n} k{k} {tag:14s} {us:8.1f} us {gbs:6.0f} GB/s {100 * gbs / 3010:5.1f}% "
                      f"({100 * gbs / copy_gbs:5.1f}% in-proc)  tiles {tiles} ({tiles / num_sms:.2f} waves)",
                      flush=True)
                rows.append(dict(g=g, n=n, k=k, config=tag, us=us, gbs=gbs, tiles=tiles))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "masked_tiles.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), copy_gbs=copy_gbs, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
