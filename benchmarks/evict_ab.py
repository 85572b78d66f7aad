"""A/B of the L2 eviction policies of the memory-bound kernels' loads and stores, one process per setting.

    PYTHONPATH=. python3 benchmarks/evict_ab.py [--rounds 2] [--flush write]

The policies are import-time constants (``FP8GEMM_STREAM_EVICT`` for the casts' and pre-dispatch's input loads,
``FP8GEMM_STORE_EVICT`` for the FP8 pre-dispatch's code stores, see ``fp8gemm/kernels/quant.py``; the casts' stores
are always plain, their rows are controls for the store settings), so each setting runs in its own child process; the
settings are interleaved within each round so a drift of clock or temperature falls on all of them alike.
Each child first checks the FP8 and FP4 pre-dispatch buffers byte for byte against the reference module, then
times the default configs (CUDA-graph replays, L2 flushed before each call: ``fp8gemm.bench.core.time_us``).
Percentages are of ANCHORS' H100 copy rate, 3010 GB/s (read + write bytes a perfect kernel moves).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {
    "default": {},
    "store evict_first": {"FP8GEMM_STORE_EVICT": "evict_first"},
    "store .cs": {"FP8GEMM_STORE_EVICT": ".cs"},
    "load+store evict_first": {"FP8GEMM_STREAM_EVICT": "evict_first", "FP8GEMM_STORE_EVICT": "evict_first"},
    "load evict_first": {"FP8GEMM_STREAM_EVICT": "evict_first"},
}
COPY_GBS = 3010.0


def child(flush: str) -> None:
    import torch

    from fp8gemm import reference as R
    from fp8gemm.bench.core import time_us
    from fp8gemm.bench.suite_moe_act import pre_dispatch_operands
    from fp8gemm.kernels import moe_act as KM
    from fp8gemm.kernels import quant as KQ

    torch.manual_seed(0)
    n, cap, hidden = 4096, 4608, 7168
    rows = {}
    for fp4, gs in ((False, 128), (True, 32)):
        x, idx, w, bufs, nbytes = pre_dispatch_operands(n, cap, gs, fp4, code_dtype=torch.uint8)

        def launch(x=x, idx=idx, w=w, bufs=bufs, fp4=fp4, gs=gs):
            KM.launch_pre_dispatch(x, idx, w, *bufs, n, gs, fp4, False, True, False)
        for b in bufs:
            b.view(torch.uint8).fill_(0xFF)
        launch()
        want = R.mega_moe_pre_dispatch(x, idx, w, n, cap, gs, fp4)
        ok = all(torch.equal(g.view(torch.uint8).cpu(),
                             (t if t.element_size() == 1 else t.to(g.dtype)).view(torch.uint8).cpu())
                 for g, t in zip(bufs, want))
        if not ok:
            raise SystemExit(f"pre_dispatch fp4={fp4}: buffers differ from the reference")
        rows[f"pre_dispatch {'fp4/32' if fp4 else 'fp8/128'}"] = (time_us(launch, flush_mode=flush), nbytes)

    m = 8192
    x8 = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(m, hidden, device="cuda", dtype=torch.float8_e4m3fn)
    sf = torch.empty(m, hidden // 128, device="cuda", dtype=torch.float32)
    rows["per_token fp8 8192"] = (time_us(lambda: KQ.launch_per_token(x8, q, sf, 128, False, False),
                                          flush_mode=flush), x8.numel() * 2 + q.numel() + sf.numel() * 4)
    q4 = torch.empty(m, hidden // 2, device="cuda", dtype=torch.uint8)
    sf4 = torch.empty(m, hidden // 32, device="cuda", dtype=torch.uint8)
    rows["per_token fp4 8192"] = (time_us(lambda: KQ.launch_per_token_fp4(x8, q4, sf4, 32, True), flush_mode=flush),
                                  x8.numel() * 2 + q4.numel() + sf4.numel())
    print("RESULT " + json.dumps({k: [us, nb] for k, (us, nb) in rows.items()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--flush", default="write")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    args = ap.parse_args()
    if args.child:
        child(args.flush)
        return
    names = [s for s in SETTINGS if not args.only or s in args.only.split(",")]
    results: dict[str, list[dict]] = {s: [] for s in names}
    for r in range(args.rounds):
        for s in names:
            env = dict(os.environ)
            for k in ("FP8GEMM_STREAM_EVICT", "FP8GEMM_STORE_EVICT"):
                env.pop(k, None)
            env.update(SETTINGS[s])
            p = subprocess.run([sys.executable, __file__, "--child", "--flush", args.flush], env=env,
                               capture_output=True, text=True, timeout=300)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"round {r} {s}: FAILED rc={p.returncode}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}", flush=True)
                continue
            results[s].append(json.loads(line[0][7:]))
            print(f"round {r} {s}: " + ", ".join(f"{k} {v[0]:.1f}" for k, v in results[s][-1].items()), flush=True)
    print(f"\nflush {args.flush}; µs per round (% of {COPY_GBS:.0f} GB/s at the best round)")
    for s in names:
        if not results[s]:
            continue
        cells = []
        for k in results[s][0]:
            us = [res[k][0] for res in results[s]]
            pct = results[s][0][k][1] / min(us) / 1e3 / COPY_GBS * 100
            cells.append(f"{k} {'/'.join(f'{u:.1f}' for u in us)} ({pct:.1f}%)")
        print(f"{s:24s} " + "; ".join(cells))


if __name__ == "__main__":
    main()
