"""What a memory-bound kernel can reach at a given transfer size, under each L2 flush (one GPU, one process).

The bandwidth targets are fractions of ANCHORS' copy ceiling, measured on a transfer of gigabytes. A kernel
that moves 50-100 MB also pays its launch, ramp and tail, and, after the write flush that ``do_bench``,
ANCHORS and ``time_us`` use, the write-back of the flush's dirty L2 lines its own misses evict. This script
times, at several sizes, PyTorch's own copy (read + write), a read-only reduction and an elementwise BF16 ->
E4M3 conversion (the cast's bytes without its scales) next to our per-token cast and FP8 pre-dispatch, each
with the write and the read flush, so a target can be judged against what any kernel reaches at that size.

    PYTHONPATH=. python3 benchmarks/size_ceiling.py --out $OUT [--rows 2048,4096] [--mb 4,15,50]

``--rows``: token counts of the cast cases (hidden 7168); ``--mb``: sizes of the read-only and copy cases.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from fp8gemm import per_token_cast_to_fp8
from fp8gemm.bench.core import time_us
from fp8gemm.moe import mega_moe_pre_dispatch

HIDDEN, TOPK = 7168, 8
ANCHOR_COPY = 3010.0


def cases(rows: int):
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    q = torch.empty(rows, HIDDEN, device="cuda", dtype=torch.float8_e4m3fn)
    sink = torch.empty((), device="cuda", dtype=torch.float32)
    cap = rows + rows // 8
    idx = torch.randint(0, 256, (rows, TOPK), device="cuda")
    w = torch.rand(rows, TOPK, device="cuda")
    bufs = (torch.empty(cap, HIDDEN, dtype=torch.float8_e4m3fn, device="cuda"),
            torch.empty(cap, HIDDEN // 128, dtype=torch.uint8, device="cuda"),
            torch.empty(cap, TOPK, dtype=torch.int64, device="cuda"), torch.empty(cap, TOPK, device="cuda"))
    xb = x.numel() * 2
    pre_bytes = xb + idx.numel() * 8 + w.numel() * 4 + sum(b.numel() * b.element_size() for b in bufs)
    return [
        ("torch copy bf16", 2 * xb, lambda: y.copy_(x)),
        ("torch sum (read only)", xb, lambda: torch.sum(x.view(-1), dim=0, dtype=torch.float32, out=sink)),
        ("torch bf16->e4m3 (no scales)", xb + q.numel(), lambda: q.copy_(x)),
        ("per_token_cast_to_fp8", xb + q.numel() + rows * HIDDEN // 128 * 4, lambda: per_token_cast_to_fp8(x)),
        (f"pre_dispatch fp8 cap {cap}", pre_bytes,
         lambda: mega_moe_pre_dispatch(x, idx, w, *bufs, rows, 128, False, num_experts=256)),
    ]


def read_cases(mb: float):
    """A read-only reduction and a copy over ``mb`` MB of BF16 (the weight sizes of the decode GEMMs)."""
    x = torch.randn(int(mb * 1e6) // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    sink = torch.empty((), device="cuda", dtype=torch.float32)
    return [("torch sum (read only)", x.numel() * 2, lambda: torch.sum(x, dim=0, dtype=torch.float32, out=sink)),
            ("torch copy (read + write)", x.numel() * 4, lambda: y.copy_(x))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rows", default="1024,2048,4096,8192,16384", help="token counts for the cast cases ('' none)")
    ap.add_argument("--mb", default="", help="input sizes in MB for the read-only and copy cases, e.g. 4,15,50")
    args = ap.parse_args()
    jobs = [(int(r), cases) for r in args.rows.split(",") if r] + [(float(v), read_cases) for v in args.mb.split(",")
                                                                   if v]
    results = []
    print(f"{'size':>6s} {'case':32s} {'MB':>7s} {'write µs':>9s} {'% 3010':>7s} {'read µs':>9s} {'% 3010':>7s}")
    for rows, make in jobs:
        for name, nbytes, fn in make(rows):
            t = {mode: time_us(fn, flush_mode=mode) for mode in ("write", "read")}
            pct = {mode: 100 * nbytes / t[mode] / 1e3 / ANCHOR_COPY for mode in t}
            print(f"{rows:6g} {name:32s} {nbytes / 1e6:7.1f} {t['write']:9.1f} {pct['write']:6.1f}% "
                  f"{t['read']:9.1f} {pct['read']:6.1f}%", flush=True)
            results.append(dict(rows=rows, case=name, mb=nbytes / 1e6, us_write=t["write"], us_read=t["read"],
                                pct_write=pct["write"], pct_read=pct["read"]))
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "size_ceiling.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
