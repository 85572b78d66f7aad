"""A/B: what the TMA-store epilogue is worth.  Dense GEMMs with the usual TMA store of the BF16 tile against the
same kernel storing through registers (the masked 16-byte stores the grouped modes use today), and DeepGEMM
beside them where ``import deep_gemm`` works.  One run, one card, cuBLAS side by side:

    PYTHONPATH=. python benchmarks/epilogue_ab.py [--out DIR]

Every run is NaN-poisoned, checked against the reference, then timed in interleaved rounds (CUDA-graph
replays, L2 flushed).  The shapes are the grouped rows' (n, k) at m = 4096.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8gemm import reference as R  # noqa: E402
from fp8gemm.bench.core import ab_header, ab_rounds  # noqa: E402
from fp8gemm.bench.suite_gemm import cublas_us, dense_operands  # noqa: E402
from fp8gemm.kernels import gemm_gluon as G  # noqa: E402

SHAPES = [(4096, 6144, 7168), (4096, 7168, 3072), (4096, 4096, 4096), (4096, 4096, 2048), (4096, 4096, 7168)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    num_sms, dg = ab_header()
    rows = []
    tma_ok = G._tma_ok
    for m, n, k in SHAPES:
        a, sfa, b, sfb, d = dense_operands(m, n, k)

        def tma_store():
            G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms)

        def reg_store():   # the same pick and kernel with the TMA store off: D written through registers
            G._tma_ok = lambda t: False
            try:
                G.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms)
            finally:
                G._tma_ok = tma_ok

        runs = {"tma_store": tma_store, "reg_store": reg_store}
        if dg is not None:
            runs["DeepGEMM"] = lambda: dg.fp8_gemm_nt((a, sfa), (b, sfb), d)
        rows += ab_rounds(f"m{m} n{n} k{k}", runs, d, R.fp8_gemm_nt(a, sfa, b, sfb), args.rounds,
                          flops=2.0 * m * n * k, baseline_us=cublas_us(a, sfa, b, sfb))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "epilogue_ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
