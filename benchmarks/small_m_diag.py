"""Where the time of the small-m dense GEMMs goes (m = 64 / 128, weight-streaming tiles of 64 x 16..64): the
production kernel against the same kernel with one suspect removed (the kernel's ``DIAG`` modes, as
``gluon_probe.py --diag`` does for the 128x128 tiles), DeepGEMM beside it where ``import deep_gemm`` works.

    PYTHONPATH=. python3 benchmarks/small_m_diag.py [--shapes 64x2112x7168,...] [--modes 0,1,2,3,5] [--out DIR]

Modes (all with A's scales loaded from global memory, the kernel before SA_SMEM): 0 production (checked against
the reference first), 1 L2-resident operands (no DRAM traffic), 2 no
stage refill (no TMA traffic at all), 3 no scale loads and no promotion, 5 no scale loads (the promotion's
FFMAs kept), 6 / 7 no loads of A's / of B's scales only.  Outputs of modes 1-5 are garbage by design.  Every mode is timed with PROBE off (CUDA-graph
replays, L2 flushed) in interleaved rounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from gluon_probe import launch_probe  # noqa: E402

from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import ab_header, checked_run, interleaved_times  # noqa: E402
from fp8gemm.bench.suite_gemm import dense_operands  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402

NAMES = {0: "production", 1: "L2-resident", 2: "no refill", 3: "no promotion", 5: "no scale loads",
         6: "no A-scale loads", 7: "no B-scale loads"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="64x2112x7168,128x2112x7168,64x4096x7168,128x4096x7168")
    ap.add_argument("--modes", default="0,1,2,3,5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sfa", choices=("mn", "row"), default="mn",
                    help="A's scales MN-major (DeepGEMM's layout) or row-major [M, K/128]")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    num_sms, dg = ab_header()
    rows = []
    for shape in args.shapes.split(","):
        m, n, k = (int(x) for x in shape.split("x"))
        a, sfa, b, sfb, d = dense_operands(m, n, k)
        if args.sfa == "row":
            sfa = sfa.contiguous()
        cfg = G._config_for("dense", a, b, d, None, None, 256, num_sms)
        runs = {f"{mode} {NAMES[mode]}": (lambda mode=mode: launch_probe(G, a, sfa, b, sfb, d, cfg, None, num_sms,
                                                                         diag=mode))
                for mode in (int(x) for x in args.modes.split(","))}
        ok, diff = checked_run(runs["0 production"], d, R.fp8_gemm_nt(a, sfa, b, sfb))
        if not ok:
            print(f"{shape}: production WRONG (diff {diff:.2e}); skipped", flush=True)
            continue
        # what launch runs: A's scales through shared memory (SA_SMEM; the DIAG modes above load them from global)
        cfg_sa = dataclasses.replace(cfg, sa_smem=True)
        runs["launch (SA_SMEM)"] = lambda: G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms, config=cfg_sa)
        if dg is not None:
            runs["DeepGEMM"] = lambda: dg.fp8_gemm_nt((a, sfa), (b, sfb), d)
        for fn in runs.values():   # compile every mode before anything is timed
            fn()
        torch.cuda.synchronize()
        times = interleaved_times(runs, args.rounds)
        base = min(times["0 production"])
        print(f"{shape} {cfg.block_m}x{cfg.block_n}, {cfg.stages} stages, sfa {args.sfa}, "
              f"{-(-m // cfg.block_m) * -(-n // cfg.block_n)} tiles:", flush=True)
        for tag, ts in times.items():
            us = min(ts)
            print(f"  {tag:20s} {us:7.1f} us  ({base / us:4.2f}x production's speed; rounds "
                  f"{', '.join(f'{t:.1f}' for t in ts)})", flush=True)
            rows.append(dict(shape=shape, config=f"{cfg.block_m}x{cfg.block_n}x{cfg.stages}", run=tag, us=us,
                             rounds=ts))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "small_m_diag.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
