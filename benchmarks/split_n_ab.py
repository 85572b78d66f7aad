"""A/B: a dense GEMM whose N leaves a ragged last 128-column block, run as two launches (the full blocks, then the
remainder with its own tile pick), serially or on two streams (the remainder's programs take the SMs that the
main launch's last partial wave leaves idle).  One run, one card, cuBLAS side by side:

    PYTHONPATH=. python benchmarks/split_n_ab.py [--out DIR]

Outputs are NaN-poisoned, run and compared with the reference before timing (CUDA-graph replays, L2 flushed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import ab_rounds  # noqa: E402
from fp8gemm.bench.suite_gemm import cublas_us, dense_operands  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402

SHAPES = [(4096, 2112, 7168), (4096, 1088, 2048), (4096, 576, 7168), (8192, 2112, 7168), (4096, 7232, 2048)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    side = torch.cuda.Stream()
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs", flush=True)
    rows = []
    for m, n, k in SHAPES:
        a, sfa, b, sfb, d = dense_operands(m, n, k)
        nm = n // 128 * 128
        label = f"m{m} n{n} k{k}"
        assert G.supports("dense", a, sfa, b[:nm], sfb[:nm // 128], d[:, :nm])
        assert G.supports("dense", a, sfa, b[nm:], sfb[nm // 128:], d[:, nm:])

        one = G._config_for("dense", a, b, d, None, None, 256, num_sms)

        def plain():     # an explicit config: one launch (without one, launch itself splits the columns)
            G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms, config=one)

        def main_part():
            G.launch("dense", a, sfa, b[:nm], sfb[:nm // 128], d[:, :nm], num_sms=num_sms)

        def rest_part():
            G.launch("dense", a, sfa, b[nm:], sfb[nm // 128:], d[:, nm:], num_sms=num_sms)

        def serial():
            main_part()
            rest_part()

        def two_streams():
            cur = torch.cuda.current_stream()
            side.wait_stream(cur)
            main_part()
            with torch.cuda.stream(side):
                rest_part()
            cur.wait_stream(side)

        rows += ab_rounds(label, {"plain": plain, "serial": serial, "2streams": two_streams}, d,
                          R.fp8_gemm_nt(a, sfa, b, sfb), args.rounds, baseline_us=cublas_us(a, sfa, b, sfb))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "split_n_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
