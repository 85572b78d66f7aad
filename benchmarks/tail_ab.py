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
from fp8gemm.bench.core import checked_run, interleaved_times, time_us  # noqa: E402
from fp8gemm.bench.suite_gemm import _scaled_mm, dense_operands  # noqa: E402
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
    cublas = _scaled_mm()
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs", flush=True)
    rows = []
    for m, n, k in DENSE:
        a, sfa, b, sfb, d = dense_operands(m, n, k)
        want = R.fp8_gemm_nt(a, sfa, b, sfb)
        flops = 2.0 * m * n * k
        label = f"m{m} n{n} k{k}"
        pick = G._config_for("dense", a, b, d, None, None, 256, num_sms)
        configs = {"pick": pick, "tail": G.tail_config()}
        for st in EXTRA_STAGES:
            configs[f"tail{st}"] = dataclasses.replace(G.tail_config(), stages=st)
        runs = {}
        for tag, cfg in configs.items():
            def run(cfg=cfg):
                G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms, config=cfg)
            try:
                ok, diff = checked_run(run, d, want)
            except Exception as e:  # noqa: BLE001 - a config that does not build is reported
                print(f"{label} {tag:6s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            print(f"{label} {tag:6s} {cfg.block_m}x{cfg.block_n}+{cfg.bn_tail} {cfg.stages} stages diff {diff:.2e} "
                  f"{'ok' if ok else 'WRONG'}", flush=True)
            if ok:
                runs[tag] = run
        cb = min(time_us(lambda: cublas(a, sfa, b, sfb.t())) for _ in range(2)) if cublas is not None else None
        times = interleaved_times(runs, args.rounds)
        for tag, ts in times.items():
            us = min(ts)
            print(f"{label} {tag:6s} {us:8.1f} us (rounds {', '.join(f'{t:.1f}' for t in ts)}) "
                  f"{flops / us / 1e6:6.0f} TFLOPS" + (f"  vs cuBLAS {cb:.1f} us: {cb / us:5.3f}x" if cb else ""),
                  flush=True)
            rows.append(dict(case=label, config=tag, us=us, rounds=ts, cublas_us=cb))
        if "pick" in times and "tail" in times:
            print(f"{label} tail / pick: {min(times['pick']) / min(times['tail']):.3f}x faster", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tail_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
