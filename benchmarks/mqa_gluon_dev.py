"""One-call GPU run for the warp-specialised Gluon MQA-logits prefill: correctness, then Gluon vs Triton.

    PYTHONPATH=. python3 benchmarks/mqa_gluon_dev.py --out DIR [--phases check,bench]

Phases (each in a subprocess with a time limit, so a hung kernel costs that limit, not the whole call):
  check  ``check_gluon_prefill`` of tests/gpu/test_mqa_gpu.py on a few shapes/patterns (NaN-poisoned output,
         calc_diff < 5e-6 vs the reference and vs the Triton kernel, exact -inf pattern with clean_logits,
         fp8_mqa_logits routed to the Gluon kernel), including few persistent programs;
  bench  SQ = SK = 8192, H64 D128 and H32 D64, causal (DeepGEMM's ks = 0, ke = i + SK - SQ) and full: the Gluon
         and Triton outputs compared on the valid positions first, then both timed with
         fp8gemm.bench.core.time_us (CUDA graph, L2 flushed, median) in 3 interleaved rounds; TFLOPS count the
         valid (query, key) pairs, 2 * H * D FLOPs each, as suite_mqa does.  DeepGEMM too if importable.
Writes DIR/mqa_gluon_dev.json and prints a table last.  Finishes in well under 3 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))

BENCH = [(8192, 8192, 64, 128), (8192, 8192, 32, 64)]
CLEANS = [c == "1" for c in os.environ.get("MQA_CLEANS", "1").split(",")]
CHECKS = [
    (2048, 8192, 64, 128, "causal", True, None),
    (2048, 4096, 32, 64, "causal", True, None),
    (2048, 8192, 64, 128, "cp", False, None),
    (1001, 2049, 32, 128, "ragged", True, None),
    (777, 3000, 64, 64, "ragged", False, None),
    (1500, 2500, 64, 128, "full", True, None),
    (1500, 2500, 32, 64, "empty", True, None),
    (1300, 2000, 64, 128, "causal", True, 7),
    (5, 70, 64, 128, "causal", True, None),
]


def phase_check(out_dir: str) -> dict:
    import test_mqa_gpu as T
    results = []
    for sq, sk, h, d, pattern, clean, sms in CHECKS:
        name = f"SQ{sq} SK{sk} H{h} D{d} {pattern} clean={clean}" + (f" sms={sms}" if sms else "")
        t0 = time.time()
        try:
            diff = T.check_gluon_prefill(sq, sk, h, d, pattern, clean, num_sms=sms)
            results.append({"case": name, "ok": True, "diff": diff})
        except Exception as e:  # noqa: BLE001 - record and go on
            results.append({"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:400]})
        results[-1]["s"] = round(time.time() - t0, 2)
        print(("PASS " if results[-1]["ok"] else "FAIL ") + name, results[-1].get("diff", results[-1].get("error")),
              flush=True)
    return {"checks": results, "all_ok": all(r["ok"] for r in results)}


def _inputs(sq, sk, h, d, causal):
    import torch

    from fp8gemm import reference as R
    gen = torch.Generator(device="cuda").manual_seed(sq * 7 + h)
    q = torch.randn(sq, h, d, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    kv, sf = R.quantize_kv_per_token(torch.randn(sk, d, device="cuda", generator=gen))
    w = torch.randn(sq, h, device="cuda", generator=gen)
    ks = torch.zeros(sq, dtype=torch.int32, device="cuda")
    if causal:
        ke = torch.arange(sq, dtype=torch.int32, device="cuda") + (sk - sq)
    else:
        ke = torch.full((sq,), sk, dtype=torch.int32, device="cuda")
    return q, kv, sf, w, ks, ke


def _impls(q, kv, sf, w, ks, ke, h, d, dg, clean: bool = True) -> dict:
    """The timed callables: ``triton``, ``gluon`` (launched directly: the ``auto`` dispatcher would run the
    Triton kernel, which is how session 6 timed Triton twice), DeepGEMM if importable."""
    from fp8gemm import attention
    from fp8gemm.kernels import mqa as K
    from fp8gemm.kernels import mqa_gluon as MG

    def gluon():
        out = attention._padded_output(q.shape[0], kv.shape[0], q.device)
        MG.launch(q, kv, sf, w, ks, ke, out, clean, MG.runtime.get_num_sms())
        return out
    impls = {"triton": lambda: attention._run_prefill(q, kv, sf, w, ks, ke, clean, 0, K.prefill_config(h, d)),
             "gluon": gluon}
    if dg is not None:
        impls["deepgemm"] = lambda: dg.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=clean)
    return impls


def phase_bench(out_dir: str) -> dict:
    import torch

    from fp8gemm.bench.core import card_name, time_us
    from fp8gemm.kernels import mqa_gluon as MG
    from fp8gemm.testing import calc_diff
    try:
        import deep_gemm as dg
    except Exception:  # noqa: BLE001
        dg = None
    rows = []
    for (sq, sk, h, d), causal, clean in [(b, c, cl) for b in BENCH for c in (True, False) for cl in CLEANS]:
        if not causal and not clean:
            continue
        name = f"SQ{sq} SK{sk} H{h} D{d} {'causal' if causal else 'full'}" + ("" if clean else " no-clean")
        q, kv, sf, w, ks, ke = _inputs(sq, sk, h, d, causal)
        pairs = int((ke.clamp(0, sk) - ks).clamp(min=0).sum())
        flops = 2.0 * pairs * h * d
        assert MG.supports(q, kv, sf, w, ks, ke, clean, 0)
        impls = _impls(q, kv, sf, w, ks, ke, h, d, dg, clean)
        # correctness before timing: Gluon vs Triton on the valid positions, same -inf pattern
        t = impls["triton"]()
        g = impls["gluon"]()
        torch.cuda.synchronize()
        valid = (ks[:, None] <= torch.arange(sk, device=t.device)[None, :]) & \
            (torch.arange(sk, device=t.device)[None, :] < ke[:, None])
        same_inf = bool(torch.equal(g == float("-inf"), ~valid)) if clean else True
        diff = calc_diff(g[valid], t[valid])
        ok = same_inf and diff < 5e-6 and not bool(torch.isnan(g[valid]).any())
        del g, t, valid
        row = {"case": name, "flops": flops, "ok": ok, "diff_vs_triton": diff, "same_inf": same_inf}
        if ok:
            times = {k: [] for k in impls}
            for _ in range(3):
                for k, fn in impls.items():
                    times[k].append(time_us(fn, warmup_ms=10, rep_ms=60))
            for k, v in times.items():
                us = statistics.median(v)
                row[f"{k}_us"] = us
                row[f"{k}_tflops"] = flops / us / 1e6
                row[f"{k}_rounds_us"] = v
            row["gluon_over_triton"] = row["triton_us"] / row["gluon_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, kv, sf, w, ks, ke, impls
        torch.cuda.empty_cache()
    return {"card": card_name(), "device": torch.cuda.get_device_name(), "rows": rows}


def _table(bench: dict) -> str:
    names = ["triton", "gluon"]
    lines = [f"card: {bench.get('device')}",
             "| case | " + " | ".join(f"{n} µs (TFLOPS)" for n in names) + " | gluon/triton speed | DeepGEMM TFLOPS |",
             "|---|" + "---:|" * (len(names) + 2)]
    for r in bench.get("rows", []):
        if not r["ok"]:
            lines.append(f"| {r['case']} | WRONG (diff {r['diff_vs_triton']:.3g}, same -inf {r['same_inf']}) |")
            continue
        dgt = f"{r['deepgemm_tflops']:.0f}" if "deepgemm_tflops" in r else "n/a"
        cells = [f"{r[n + '_us']:.1f} ({r[n + '_tflops']:.0f})" for n in names]
        lines.append(f"| {r['case']} | " + " | ".join(cells) + f" | {r['gluon_over_triton']:.2f} | {dgt} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--phases", default="check,bench")
    ap.add_argument("--phase", help=argparse.SUPPRESS)        # internal: run one phase in this process
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.phase:
        fn = {"check": phase_check, "bench": phase_bench}[args.phase]
        try:
            res = fn(args.out)
        except Exception:  # noqa: BLE001
            res = {"error": traceback.format_exc()[-3000:]}
        with open(os.path.join(args.out, f"phase_{args.phase}.json"), "w") as f:
            json.dump(res, f, indent=1)
        return
    limits = {"check": 100, "bench": 30 + 40 * len(CLEANS)}
    summary = {}
    for phase in args.phases.split(","):
        t0 = time.time()
        path = os.path.join(args.out, f"phase_{phase}.json")
        if os.path.exists(path):
            os.remove(path)
        try:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--out", args.out, "--phase", phase],
                           timeout=limits[phase], cwd=ROOT,
                           # the caller's path stays (DeepGEMM may be importable only through it)
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(
                               p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)})
        except subprocess.TimeoutExpired:
            print(f"phase {phase}: TIMEOUT after {limits[phase]} s (hung kernel?)", flush=True)
        res = json.load(open(path)) if os.path.exists(path) else {"error": "no result (timeout or crash)"}
        res["seconds"] = round(time.time() - t0, 1)
        summary[phase] = res
        if phase == "check" and not res.get("all_ok"):
            print("check failed: skipping the timings", flush=True)
            break
    with open(os.path.join(args.out, "mqa_gluon_dev.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for phase, res in summary.items():
        if "error" in res:
            print(f"--- {phase} error ---\n{res['error']}")
    if "check" in summary and "checks" in summary["check"]:
        bad = [c for c in summary["check"]["checks"] if not c["ok"]]
        print(f"check: {len(summary['check']['checks']) - len(bad)}/{len(summary['check']['checks'])} passed"
              + "".join(f"\n  FAIL {c['case']}: {c['error']}" for c in bad))
    if "bench" in summary and "rows" in summary["bench"]:
        print(_table(summary["bench"]))


if __name__ == "__main__":
    main()
