"""A/B of the Gluon GEMM's remainder-tail tile (``GluonConfig.bn_tail``): N = 128 q + r runs as q tile columns,
each a 128-wide block plus a 16-wide slice of the remainder, instead of q + 1 columns of 128.  One run, one card,
cuBLAS side by side:

    PYTHONPATH=. python benchmarks/tail_ab.py [--out DIR] [--rounds 3]

Per row: ``pick`` (what ``launch`` picks today) and ``tail`` (``tail_config()``), timed in interleaved rounds
(CUDA-graph replays, L2 flushed).  Each config's output is NaN-poisoned, run and compared with the reference
first; a wrong one is reported and not timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import ab_rounds  # noqa: E402
from fp8gemm.bench.suite_gemm import cublas_us, dense_operands  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402

DENSE = [(4096, 576, 7168), (4096, 2112, 7168), (2048, 576, 7168), (8192, 576, 7168), (4096, 1088, 2048),
         (128, 576, 7168)]
EXTRA_STAGES = [int(x) for x in os.environ.get("TAIL_STAGES", "").split(",") if x]   # e.g. TAIL_STAGES=3,5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs", flush=True)
    rows = []
    for m, n, k in DENSE:
        a, sfa, b, sfb, d = dense_operands(m, n, k)
        label = f"m{m} n{n} k{k}"
        pick = G._config_for("dense", a, b, d, None, None, 256, num_sms)
        configs = {"pick": pick, "tail": G.tail_config()}
        for st in EXTRA_STAGES:
            configs[f"tail{st}"] = dataclasses.replace(G.tail_config(), stages=st)
        runs = {}
        for tag, cfg in configs.items():
            print(f"{label} {tag}: {cfg.block_m}x{cfg.block_n}+{cfg.bn_tail}, {cfg.stages} stages", flush=True)
            runs[tag] = lambda cfg=cfg: G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms, config=cfg)
        got = ab_rounds(label, runs, d, R.fp8_gemm_nt(a, sfa, b, sfb), args.rounds, flops=2.0 * m * n * k,
                        baseline_us=cublas_us(a, sfa, b, sfb))
        rows += got
        us = {r["config"]: r["us"] for r in got if "us" in r}
        if "pick" in us and "tail" in us:
            print(f"{label} tail / pick: {us['pick'] / us['tail']:.3f}x faster", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tail_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
