"""What the EP layer's down-projection GEMM costs when it gives SMs to the combine (one GPU).

    PYTHONPATH=. python3 benchmarks/ep_l2_sms.py [--out DIR] [--sms 132,124,116]

With overlap on, the L2 GEMM (masked, SBO signals on) runs on ``num_gemm_sms`` = all minus the communication
SMs (default 8).  On 2 x H200 (RESULTS.md, session 7) the layer with the combine skipped was ~30-40 µs slower
than the back-to-back layer minus its combine, i.e. the L2 GEMM lost about its share of the 8 SMs: it is not
bound by device memory at these shapes but by what each SM streams.  This script times the L2 GEMM alone at
the layer's shapes (DeepSeek-V3: N = hidden 7168, K = intermediate 2048; local experts and rows per expert of
256 / 128 tokens a rank on 2 and 4 ranks) for several SM budgets and tiles, so that a tile which keeps its
time on fewer SMs can be chosen for the overlap.

Every config's output is compared with the reference on the valid rows before it is timed (CUDA graph, L2
flushed, median; two interleaved rounds).  GB/s counts the weights, the valid A rows and the BF16 output.
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
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402
from fp8gemm.testing import calc_diff  # noqa: E402

FP8 = torch.float8_e4m3fn
N, K = 7168, 2048
# (label, local experts, rows per expert on average, max_m)
SHAPES = [("4 ranks, 256 tok", 64, 32, 1024), ("4 ranks, 128 tok", 64, 16, 512), ("2 ranks, 256 tok", 128, 16, 512)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sms", default="132,124,116")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    total_sms = torch.cuda.get_device_properties(0).multi_processor_count
    sms_list = [min(int(s), total_sms) for s in args.sms.split(",")]
    print(f"{torch.cuda.get_device_name()}, {total_sms} SMs", flush=True)
    rows = []
    for label, g, expected, max_m in SHAPES:
        gen = torch.Generator(device="cpu").manual_seed(g * 1000 + expected)
        counts = torch.clamp((torch.rand(g, generator=gen) * 0.6 + 0.7) * expected, 1, max_m).int()
        mm = counts.cuda()
        a = torch.randn(g, max_m, K, device="cuda").to(FP8)
        b = torch.randn(g, N, K, device="cuda").to(FP8)
        sfa = (torch.rand(g, max_m, K // 128, device="cuda") + 0.5).transpose(1, 2).contiguous().transpose(1, 2)
        sfb = torch.rand(g, math.ceil(N / 128), K // 128, device="cuda") + 0.5
        d = torch.empty(g, max_m, N, dtype=torch.bfloat16, device="cuda")
        total = int(counts.sum())
        nbytes = g * N * K + total * K + 2 * total * N
        want = torch.cat([R.fp8_gemm_nt(a[i, :c], sfa[i, :c], b[i], sfb[i]) for i, c in enumerate(counts.tolist())])
        cases = []
        for sms in sms_list:
            pick = G.pick_config("masked", max_m, N, K, groups=g, expected_m=expected, num_sms=sms)
            cases.append((sms, "pick", None, pick))
            for bn in (64, 128):
                for stages_cut in (0, 2):
                    c = G.GluonConfig(64, bn, max(2, G._stages(64, bn, 64 * bn * 4) - stages_cut), 4,
                                      k_rotate=(bn == 64))
                    if c != pick:
                        cases.append((sms, f"64x{bn} s{c.stages}{' rot' if c.k_rotate else ''}", c, pick))
        times = {i: [] for i in range(len(cases))}
        ok = {}
        for rnd in range(args.rounds):
            for i, (sms, tag, cfg, pick) in enumerate(cases):
                nb = math.ceil(max_m / (cfg or pick).block_m)
                signal = torch.zeros(g * nb, dtype=torch.int32, device="cuda")

                def run(cfg=cfg, sms=sms, signal=signal):
                    G.launch("masked", a, sfa, b, sfb, d, masked_m=mm, expected_m=expected, num_sms=sms,
                             config=cfg, signal=signal)
                if rnd == 0:
                    d.fill_(float("nan"))
                    run()
                    torch.cuda.synchronize()
                    got = torch.cat([d[j, :c] for j, c in enumerate(counts.tolist())])
                    ok[i] = calc_diff(got, want) < 1e-3
                if not ok[i]:
                    continue
                times[i].append(time_us(run))
        for i, (sms, tag, cfg, pick) in enumerate(cases):
            if not ok[i]:
                print(f"{label:18s} sms {sms:3d} {tag:16s} WRONG", flush=True)
                continue
            us = sorted(times[i])[len(times[i]) // 2]
            gbs = nbytes / us / 1e3
            name = tag if cfg is not None else f"pick 64x{pick.block_n} s{pick.stages}{' rot' if pick.k_rotate else ''}"
            print(f"{label:18s} sms {sms:3d} {name:18s} {us:8.1f} us {gbs:6.0f} GB/s  rounds "
                  + " ".join(f"{t:.1f}" for t in times[i]), flush=True)
            rows.append(dict(shape=label, groups=g, expected_m=expected, sms=sms, config=name, us=us, gbs=gbs,
                             rounds=times[i]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ep_l2_sms.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
