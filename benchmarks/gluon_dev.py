"""One-call GPU development run for the Gluon FP8 GEMM: correctness, then timings vs cuBLAS.

    PYTHONPATH=. python3 benchmarks/gluon_dev.py [--out DIR] [--phases check,bench] [--quick]
    PYTHONPATH=. python3 benchmarks/gluon_dev.py --variant wide [--out DIR]     # opt-in variant vs default

Phases: check (correctness), sweep (tile shapes vs the model, CUDA-graph timings), bench (the
picked configs against cuBLAS), variant (``--variant NAME``: an opt-in GluonConfig variant checked on odd
shapes, then default vs variant vs cuBLAS on the dense m=4096 ANCHORS shapes + 128x4096x7168, timings
interleaved, a verdict line last).  Each phase runs in a subprocess with a time limit (a hung kernel costs
that limit, not the whole call).
Correctness: the ``check_*`` helpers of tests/gpu/test_gemm_gluon_gpu.py (fresh randn, NaN-poisoned
outputs, calc_diff < 1e-3, untouched rows, exact SBO signals).  Timing: triton.testing.do_bench (median,
L2 flushed) of our kernel and of cuBLAS block-scaled FP8 (torch.nn.functional.scaled_mm, A 1x128 with
column-major scales, B 128x128) in the same process on the same inputs; cuBLAS output is checked too.
Writes JSON to DIR ($OUT by default) and prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))

DENSE_NK = [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


# ------------------------------------------------------------------------------------------------
# phase: check
# ------------------------------------------------------------------------------------------------

def phase_check(out_dir: str, quick: bool) -> None:
    import torch

    import test_gemm_gluon_gpu as T
    cases = [
        ("dense", dict(m=4096, n=4096, k=7168)),
        ("dense", dict(m=4096, n=2112, k=7168)),
        ("dense", dict(m=4096, n=576, k=7168)),
        ("dense", dict(m=4096, n=7168, k=2048)),
        ("dense", dict(m=128, n=2112, k=7168)),
        ("dense", dict(m=64, n=4096, k=7168)),
        ("dense", dict(m=1, n=2112, k=7168)),
        ("dense", dict(m=300, n=1000, k=384)),
        ("dense", dict(m=129, n=200, k=128)),
        ("dense", dict(m=64, n=576, k=256)),
        ("dense", dict(m=1000, n=4100, k=640)),
        ("dense", dict(m=17, n=136, k=1152)),
        ("dense", dict(m=257, n=4096, k=1536, sfa_layout="mn")),
        ("dense", dict(m=300, n=520, k=768, out_dtype=torch.float32, with_c=True)),
        ("dense", dict(m=1024, n=1024, k=1024, num_sms=7)),
        ("dense", dict(m=512, n=2048, k=2048, graph=True)),
        ("masked", dict(groups=6, max_m=256, n=1536, k=512, masked=[20, 0, 7, 33, 1, 64], expected_m=20)),
        ("masked", dict(groups=6, max_m=256, n=1536, k=512, masked=[192, 250, 0, 129, 64, 256], expected_m=192)),
        ("masked", dict(groups=6, max_m=256, n=1536, k=512, masked=[192, 250, 0, 129, 64, 256], expected_m=192,
                        signal=False)),
        ("masked", dict(groups=3, max_m=200, n=1000, k=384, masked=[200, 77, 3], expected_m=90, num_sms=5)),
        ("contiguous", dict(sizes=[300, 0, 129, 512], n=1024, k=768)),
        ("contiguous", dict(sizes=[1, 128, 255], n=4096, k=7168)),
        ("contiguous", dict(sizes=[77, 333], n=1000, k=384)),
    ]
    from fp8gemm.kernels import gemm_gluon as gg

    def cfg(bm, bn, rot):
        return gg.GluonConfig(bm, bn, gg._stages(bm, bn, bm * bn * 4), 8 if bm == 128 else 4, k_rotate=rot)
    for bm in (64, 128):
        for bn in (16, 32, 64, 128):
            cases.append(("masked", dict(groups=3, max_m=150, n=272, k=384, masked=[150, 0, 65], expected_m=60,
                                         config=cfg(bm, bn, bn != 64))))
    cases.append(("contiguous", dict(sizes=[130, 5], n=200, k=384, config=cfg(64, 32, False))))
    cases.append(("contiguous", dict(sizes=[130, 5], n=200, k=384, config=cfg(128, 16, True))))
    cases.append(("dense", dict(m=200, n=300, k=640, config=cfg(64, 16, True))))
    results = []
    fn = {"dense": T.check_dense, "masked": T.check_masked, "contiguous": T.check_contiguous}
    for mode, kw in cases:
        torch.manual_seed(len(results))
        t0 = time.time()
        try:
            r = fn[mode](**kw)
            r["ok"] = True
        except Exception as e:  # noqa: BLE001
            r = dict(mode=mode, args={k: str(v) for k, v in kw.items()}, ok=False,
                     error=f"{type(e).__name__}: {str(e)[:800]}", tb=traceback.format_exc()[-1500:])
        r["secs"] = round(time.time() - t0, 2)
        results.append({k: (str(v) if not isinstance(v, (int, float, bool, str, list, type(None))) else v)
                        for k, v in r.items()})
        print(("PASS " if r["ok"] else "FAIL ") + json.dumps({k: v for k, v in results[-1].items() if k != "tb"}),
              flush=True)
        if not r["ok"] and "CUDA" in r.get("error", ""):
            break    # a sticky CUDA error poisons everything after it
    json.dump(results, open(os.path.join(out_dir, "gluon_check.json"), "w"), indent=1)


# ------------------------------------------------------------------------------------------------
# phase: bench
# ------------------------------------------------------------------------------------------------

def _cublas():
    import torch
    F = torch.nn.functional
    if hasattr(F, "scaled_mm"):
        from torch.nn.functional import ScalingType

        def run(a, sfa_cm, b, sfb):
            return F.scaled_mm(a, b.t(), sfa_cm, ScalingType.BlockWise1x128, sfb.t(), ScalingType.BlockWise128x128,
                               output_dtype=torch.bfloat16)
        return run

    def run_old(a, sfa_cm, b, sfb):
        return torch._scaled_mm(a, b.t(), sfa_cm, sfb.t(), out_dtype=torch.bfloat16)
    return run_old


def graph_us(fn, iters: int = 20, reps: int = 5) -> float:
    """Device time of ``fn`` without host launch overhead: ``iters`` x (L2 flush, fn) captured in one CUDA
    graph, minus the same graph of flushes alone; median over ``reps`` replays."""
    import statistics

    import torch
    flush = torch.empty(int(256e6) // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()

    def capture(with_fn):
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            with torch.cuda.graph(g, stream=s):
                for _ in range(iters):
                    flush.zero_()
                    if with_fn:
                        fn()
        torch.cuda.current_stream().wait_stream(s)
        return g

    def timed(g):
        out = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        return statistics.median(out)
    g1, g0 = capture(True), capture(False)
    timed(g1)
    t = (timed(g1) - timed(g0)) / iters
    del g1, g0
    return 1e3 * t


def phase_bench(out_dir: str, quick: bool) -> None:
    import torch
    import triton

    from fp8gemm import reference as R
    from fp8gemm.kernels import gemm_gluon as gg
    from fp8gemm.testing import calc_diff

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cublas = _cublas()
    rows = []

    def bench(fn):
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    shapes = [(4096, n, k) for n, k in DENSE_NK]
    shapes += [(128, 2112, 7168), (128, 4096, 7168), (128, 7168, 2048), (64, 4096, 7168), (64, 24576, 1536),
               (1, 2112, 7168), (1, 4096, 7168)]
    if quick:
        shapes = shapes[:3]
    for m, n, k in shapes:
        torch.manual_seed(m + n + k)
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        sfa = torch.rand(m, k // 128, device="cuda") + 0.5
        sfb = torch.rand(math.ceil(n / 128), k // 128, device="cuda") + 0.5
        sfa_cm = sfa.t().contiguous().t()
        d = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        row = dict(mode="dense", m=m, n=n, k=k, card=torch.cuda.get_device_name())
        try:
            blk = gg.launch("dense", a, sfa, b, sfb, d, num_sms=sms)
            ref = R.fp8_gemm_nt(a, sfa, b, sfb)
            row["block"] = list(blk)
            row["diff"] = calc_diff(d, ref)
            row["us"] = bench(lambda a=a, b=b, d=d: gg.launch("dense", a, sfa, b, sfb, d, num_sms=sms))
            row["graph_us"] = graph_us(lambda a=a, b=b, d=d: gg.launch("dense", a, sfa, b, sfb, d, num_sms=sms))
            row["tflops"] = 2 * m * n * k / row["graph_us"] * 1e-6
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if m > 1:
            try:
                out = cublas(a, sfa_cm, b, sfb)
                row["cublas_diff"] = calc_diff(out, ref)
                row["cublas_us"] = bench(lambda a=a, b=b, d=d: cublas(a, sfa_cm, b, sfb))
                row["cublas_graph_us"] = graph_us(lambda a=a, b=b, d=d: cublas(a, sfa_cm, b, sfb))
            except Exception as e:  # noqa: BLE001
                row["cublas_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if "us" in row and "cublas_us" in row:
            row["speedup"] = row["cublas_us"] / row["us"]
        if "graph_us" in row and "cublas_graph_us" in row:
            row["graph_speedup"] = row["cublas_graph_us"] / row["graph_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del a, b, d

    # masked (decode) shapes of ANCHORS, max_m 4096
    masked_shapes = [(32, 192, 6144, 7168), (6, 1024, 4096, 4096), (32, 20, 4096, 2048), (6, 20, 7168, 3072)]
    if quick:
        masked_shapes = masked_shapes[:1]
    max_m = 4096
    for g, expected, n, k in masked_shapes:
        torch.manual_seed(g * 1000 + expected)
        gen = torch.Generator(device="cpu").manual_seed(g * 1000 + expected)
        counts = torch.clamp((torch.rand(g, generator=gen) * 0.6 + 0.7) * expected, 1, max_m).int()
        masked_m = counts.to("cuda")
        a = torch.randn(g, max_m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(g, n, k, device="cuda").to(torch.float8_e4m3fn)
        sfa = torch.rand(g, max_m, k // 128, device="cuda") + 0.5
        sfb = torch.rand(g, math.ceil(n / 128), k // 128, device="cuda") + 0.5
        d = torch.empty(g, max_m, n, device="cuda", dtype=torch.bfloat16)
        sig = torch.zeros(g * math.ceil(max_m / 64), dtype=torch.int32, device="cuda")
        row = dict(mode="masked", groups=g, expected_m=expected, n=n, k=k, card=torch.cuda.get_device_name())
        try:
            blk = gg.launch("masked", a, sfa, b, sfb, d, masked_m=masked_m, expected_m=expected, signal=sig,
                            num_sms=sms)
            row["block"] = list(blk)
            row["us"] = bench(lambda a=a, b=b, d=d: gg.launch("masked", a, sfa, b, sfb, d, masked_m=masked_m,
                                                expected_m=expected, signal=sig, num_sms=sms))
            row["graph_us"] = graph_us(lambda a=a, b=b, d=d: gg.launch("masked", a, sfa, b, sfb, d, masked_m=masked_m,
                                                         expected_m=expected, signal=sig, num_sms=sms))
            valid = int(counts.sum())
            row["tflops"] = 2 * valid * n * k / row["graph_us"] * 1e-6
            row["gbs"] = (g * n * k + valid * k + valid * n * 2) / row["graph_us"] * 1e-3
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del a, b, d
        torch.cuda.empty_cache()

    # contiguous (prefill) shapes of ANCHORS: 4 experts x ~8192 rows
    for groups, per, n, k in ([(4, 8192, 4096, 4096), (8, 4096, 7168, 3072)] if not quick else []):
        gen = torch.Generator(device="cpu").manual_seed(groups * per)
        sizes = [int(per * (0.8 + 0.4 * float(torch.rand(1, generator=gen)))) for _ in range(groups)]
        ids = []
        for e, sz in enumerate(sizes):
            ids += [e] * sz + [-1] * ((sz + 127) // 128 * 128 - sz)
        m = len(ids)
        m_indices = torch.tensor(ids, dtype=torch.int32, device="cuda")
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(groups, n, k, device="cuda").to(torch.float8_e4m3fn)
        sfa = torch.rand(m, k // 128, device="cuda") + 0.5
        sfb = torch.rand(groups, math.ceil(n / 128), k // 128, device="cuda") + 0.5
        d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        row = dict(mode="contiguous", groups=groups, expected_m=per, n=n, k=k, card=torch.cuda.get_device_name())
        try:
            blk = gg.launch("contiguous", a, sfa, b, sfb, d, m_indices=m_indices, num_sms=sms)
            row["block"] = list(blk)
            row["us"] = bench(lambda a=a, b=b, d=d: gg.launch("contiguous", a, sfa, b, sfb, d, m_indices=m_indices, num_sms=sms))
            row["graph_us"] = graph_us(lambda a=a, b=b, d=d: gg.launch("contiguous", a, sfa, b, sfb, d, m_indices=m_indices,
                                                         num_sms=sms))
            row["tflops"] = 2 * sum(sizes) * n * k / row["graph_us"] * 1e-6
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del a, b, d
        torch.cuda.empty_cache()

    json.dump(rows, open(os.path.join(out_dir, "gluon_bench.json"), "w"), indent=1)


# ------------------------------------------------------------------------------------------------
# phase: variant (an opt-in GluonConfig variant against the default config and cuBLAS)
# ------------------------------------------------------------------------------------------------

VARIANT_SHAPES = [(4096, n, k) for n, k in DENSE_NK] + [(128, 4096, 7168)]


def _variant_config(gg, name, m, n, k, sms):
    """What ``pick_config`` returns with the variant switched on (the behaviour a flipped default gives)."""
    if name == "wide":
        return gg.pick_config("dense", m, n, k, num_sms=sms, tma_store=True, wide_n=True)
    raise ValueError(f"unknown variant {name!r}")


def phase_variant(out_dir: str, quick: bool, name: str = "wide") -> None:
    import statistics

    import torch
    import triton

    import test_gemm_gluon_gpu as T
    from fp8gemm import reference as R
    from fp8gemm.kernels import gemm_gluon as gg
    from fp8gemm.testing import calc_diff

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    card = torch.cuda.get_device_name()
    cublas = _cublas()
    res = dict(variant=name, card=card, checks=[], rows=[])

    # 1. correctness of the variant on the odd shapes (ragged M/N, one K slice, few SMs, graph, MN-major sfa)
    if name == "wide":
        for kw in T.WIDE_CASES[2:]:     # the first two (4096 x 4096 / 2112 x 7168) are timing rows below
            torch.manual_seed(len(res["checks"]))
            try:
                r = T.check_dense_wide(**kw)
                r["ok"] = True
            except Exception as e:  # noqa: BLE001
                r = dict(args=str(kw), ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            res["checks"].append({k: (v if isinstance(v, (int, float, bool, str, type(None))) else str(v))
                                  for k, v in r.items()})
            print(("PASS " if r["ok"] else "FAIL ") + json.dumps(res["checks"][-1]), flush=True)
            if not r["ok"] and "CUDA" in r.get("error", ""):
                break
    out_json = os.path.join(out_dir, "gluon_variant.json")
    json.dump(res, open(out_json, "w"), indent=1)

    # 2. per shape: NaN-poisoned output, calc_diff < 1e-3 and no NaN for all three, then timings
    #    interleaved (default, variant, cuBLAS) x 3 rounds, median per contender
    for m, n, k in (VARIANT_SHAPES[:2] + VARIANT_SHAPES[-1:] if quick else VARIANT_SHAPES):
        torch.manual_seed(m + n + k)
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        sfa = torch.rand(m, k // 128, device="cuda") + 0.5
        sfb = torch.rand(math.ceil(n / 128), k // 128, device="cuda") + 0.5
        sfa_cm = sfa.t().contiguous().t()
        d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        ref = R.fp8_gemm_nt(a, sfa, b, sfb)
        cfg_def = gg.pick_config("dense", m, n, k, num_sms=sms, tma_store=True)
        cfg_var = _variant_config(gg, name, m, n, k, sms)
        fns = {
            "default": lambda a=a, b=b, d=d: gg.launch("dense", a, sfa, b, sfb, d, num_sms=sms, config=cfg_def),
            "variant": lambda a=a, b=b, d=d: gg.launch("dense", a, sfa, b, sfb, d, num_sms=sms, config=cfg_var),
            "cublas": lambda a=a, b=b, d=d: cublas(a, sfa_cm, b, sfb),
        }
        row = dict(m=m, n=n, k=k, card=card, default_cfg=str(cfg_def), variant_cfg=str(cfg_var))
        ok = {}
        for key, fn in fns.items():
            try:
                d.fill_(float("nan"))
                out = fn()
                torch.cuda.synchronize()
                if key == "cublas":
                    got = out
                else:
                    row[f"{key}_block"] = list(out)
                    got = d
                nan = int(got.isnan().sum())
                diff = calc_diff(got, ref)
                row[f"{key}_diff"] = diff
                row[f"{key}_nan"] = nan
                ok[key] = nan == 0 and diff < T.TOL
            except Exception as e:  # noqa: BLE001
                row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                ok[key] = False
            row[f"{key}_ok"] = ok[key]
        graph = {key: [] for key in fns}
        bench = {key: [] for key in fns}
        for _ in range(1 if quick else 3):
            for key, fn in fns.items():
                if not ok[key]:
                    continue                    # never time a wrong kernel
                try:
                    graph[key].append(graph_us(fn))
                    bench[key].append(1e3 * triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
                except Exception as e:  # noqa: BLE001
                    row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    ok[key] = False
        for key in fns:
            if graph[key]:
                row[f"{key}_graph_us"] = statistics.median(graph[key])
                row[f"{key}_us"] = statistics.median(bench[key])
                row[f"{key}_graph_all"] = [round(x, 2) for x in graph[key]]
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        json.dump(res, open(out_json, "w"), indent=1)       # after every row: a timeout keeps what ran
        del a, b, d, ref
        torch.cuda.empty_cache()


def print_variant_table(path: str) -> None:
    nan = float("nan")
    res = json.load(open(path))
    checks = res.get("checks", [])
    bad = [c for c in checks if not c.get("ok")]
    print(f"variant {res['variant']!r} on {res.get('card')}: odd-shape checks {len(checks) - len(bad)}/{len(checks)} "
          f"passed" + "".join(f"\n  FAIL {c.get('args')} {c.get('error', '')[:300]}" for c in bad))
    print("graph: CUDA-graph device time (L2 flushed), median of 3 interleaved rounds; "
          "us: do_bench median incl. host launch; ok: no NaN and calc_diff < 1e-3 on NaN-poisoned outputs")
    print(f"{'m':>5} {'n':>6} {'k':>6} | {'def tile':>8} {'graph':>7} {'us':>7} | {'var tile':>8} {'graph':>7} "
          f"{'us':>7} | {'cuBLAS':>7} {'us':>7} | {'var/def':>7} {'def xcuB':>8} {'var xcuB':>8} | ok d/v/c")
    wins = big = 0
    all_ok = not bad
    for r in res["rows"]:
        g_d, g_v, g_c = (r.get(f"{x}_graph_us", nan) for x in ("default", "variant", "cublas"))
        u_d, u_v, u_c = (r.get(f"{x}_us", nan) for x in ("default", "variant", "cublas"))
        flags = "/".join("y" if r.get(f"{x}_ok") else "N" for x in ("default", "variant", "cublas"))
        all_ok &= bool(r.get("default_ok") and r.get("variant_ok"))
        sp = g_d / g_v
        if r["m"] >= 4096:
            big += 1
            wins += sp > 1.03
        tile = lambda x: "x".join(map(str, r.get(f"{x}_block", ["-"])))  # noqa: E731
        print(f"{r['m']:>5} {r['n']:>6} {r['k']:>6} | {tile('default'):>8} {g_d:7.1f} {u_d:7.1f} | "
              f"{tile('variant'):>8} {g_v:7.1f} {u_v:7.1f} | {g_c:7.1f} {u_c:7.1f} | {sp:7.3f} {g_c / g_d:8.3f} "
              f"{g_c / g_v:8.3f} | {flags}"
              + "".join(f" {x}: {r[x + '_error'][:60]}" for x in ("default", "variant", "cublas")
                        if x + "_error" in r))
    print(f"VERDICT: variant faster than default by >3% (graph) on {wins}/{big} m=4096 rows; "
          f"all correctness checks passed: {'yes' if all_ok else 'NO'}")


# ------------------------------------------------------------------------------------------------
# phase: sweep (tile shapes per problem shape, to calibrate pick_config)
# ------------------------------------------------------------------------------------------------

def phase_sweep(out_dir: str, quick: bool) -> None:
    import torch
    import triton

    from fp8gemm import reference as R
    from fp8gemm.kernels import gemm_gluon as gg
    from fp8gemm.testing import calc_diff

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cublas = _cublas()

    def bench(fn):
        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    def cfg(bm, bn, rot=False, group_m=8):
        return gg.GluonConfig(bm, bn, gg._stages(bm, bn, bm * bn * 2), 8 if bm == 128 else 4, group_m=group_m,
                              k_rotate=rot)

    all_tiles = [(bm, bn) for bm in (64, 128) for bn in (16, 32, 64, 128)]
    plan = []
    for shape in [(128, 2112, 7168), (128, 7168, 2048), (64, 4096, 7168), (64, 24576, 1536), (1, 4096, 7168),
                  (128, 576, 7168)]:
        plan.append((shape, [cfg(*t) for t in all_tiles]))
    for shape in [(4096, 576, 7168), (4096, 2112, 7168), (1024, 4096, 7168)]:
        plan.append((shape, [cfg(*t) for t in [(128, 128), (128, 64), (64, 128), (128, 32)]]))
    rows = []
    for (m, n, k), cfgs in plan:
        torch.manual_seed(m + n + k)
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        sfa = torch.rand(m, k // 128, device="cuda") + 0.5
        sfb = torch.rand(math.ceil(n / 128), k // 128, device="cuda") + 0.5
        d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        ref = R.fp8_gemm_nt(a, sfa, b, sfb)
        cub = None
        if m > 1:
            sfa_cm = sfa.t().contiguous().t()
            try:
                cub = graph_us(lambda a=a, b=b, d=d: cublas(a, sfa_cm, b, sfb))
            except Exception:  # noqa: BLE001
                cub = None
        auto = gg.pick_config("dense", m, n, k, num_sms=sms, tma_store=True)
        for c in cfgs:
            row = dict(m=m, n=n, k=k, bm=c.block_m, bn=c.block_n, stages=c.stages, rot=c.k_rotate,
                       group_m=c.group_m, cublas_us=cub, auto=(c.block_m, c.block_n) == (auto.block_m, auto.block_n),
                       model_us=1e6 * gg.estimate_seconds(m, 1, n, k, c.block_m, c.block_n, sms))
            try:
                d.fill_(float("nan"))
                gg.launch("dense", a, sfa, b, sfb, d, num_sms=sms, config=c)
                row["diff"] = calc_diff(d, ref)
                row["us"] = graph_us(lambda a=a, b=b, d=d: gg.launch("dense", a, sfa, b, sfb, d, num_sms=sms, config=c))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        del a, b, d, ref

    json.dump(rows, open(os.path.join(out_dir, "gluon_sweep.json"), "w"), indent=1)


# ------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gluon_out"))
    ap.add_argument("--phases", default="check,sweep,bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=0, help="seconds per phase (0: 150 check, 120 bench)")
    ap.add_argument("--variant", default=None, choices=["wide"],
                    help="compare an opt-in GluonConfig variant with the default config and cuBLAS on the "
                         "7 dense m=4096 ANCHORS shapes + 128x4096x7168 (runs only the 'variant' phase "
                         "unless --phases is given)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.phase:
        if args.phase == "variant":
            phase_variant(args.out, args.quick, args.variant or "wide")
            return
        {"check": phase_check, "bench": phase_bench, "sweep": phase_sweep}[args.phase](args.out, args.quick)
        return
    if args.variant and args.phases == ap.get_default("phases"):
        args.phases = "variant"
    elif args.variant:
        args.phases += ",variant"
    summary = {}
    for phase in args.phases.split(","):
        limit = args.limit or {"check": 80, "bench": 110, "sweep": 90, "variant": 165}[phase]
        cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--out", args.out]
        if args.quick:
            cmd.append("--quick")
        if phase == "variant":
            cmd += ["--variant", args.variant or "wide"]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, timeout=limit, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
            log, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            log = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            log += "\n[TIMEOUT]"
            rc = -9
        open(os.path.join(args.out, f"gluon_{phase}.log"), "w").write(log)
        summary[phase] = dict(rc=rc, secs=round(time.time() - t0, 1))
        print(f"===== phase {phase}: rc={rc} in {time.time() - t0:.0f}s =====")
        print(log[-6000:])

    # short table last
    print("\n===== SUMMARY =====")
    print(json.dumps(summary))
    p = os.path.join(args.out, "gluon_check.json")
    if os.path.exists(p):
        res = json.load(open(p))
        bad = [r for r in res if not r.get("ok")]
        print(f"check: {len(res) - len(bad)}/{len(res)} passed")
        for r in bad:
            print("  FAIL", r.get("mode"), r.get("args"), r.get("error", "")[:300])
    p = os.path.join(args.out, "gluon_sweep.json")
    if os.path.exists(p):
        best = {}
        for r in json.load(open(p)):
            if "us" not in r:
                continue
            key = (r.get("mode", "dense"), r.get("m", r.get("groups")), r.get("expected_m", ""), r["n"], r["k"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
        print("sweep best:")
        for key, r in best.items():
            print(f"  {key}: bm{r['bm']} bn{r['bn']} rot{int(r['rot'])} g{r.get('group_m', '')} {r['us']:.1f}us "
                  f"cuBLAS {r.get('cublas_us') or float('nan'):.1f}us")
    p = os.path.join(args.out, "gluon_bench.json")
    if os.path.exists(p):
        nan = float("nan")
        print("us: do_bench median incl. host launch; graph: CUDA-graph device time; both L2-flushed; "
              "TFLOPS from graph")
        print(f"{'mode':6} {'m/g,e':>9} {'n':>6} {'k':>6} {'block':>9} {'us':>7} {'graph':>7} {'TFLOPS':>6} "
              f"{'cuBLAS':>7} {'cuB grf':>7} {'x cuB':>6} {'x grf':>6} {'diff':>7}")
        for r in json.load(open(p)):
            mm = f"{r['m']}" if r["mode"] == "dense" else f"{r['groups']},{r['expected_m']}"
            print(f"{r['mode'][:6]:6} {mm:>9} {r['n']:>6} {r['k']:>6} {str(r.get('block', '-')):>9} "
                  f"{r.get('us', nan):7.1f} {r.get('graph_us', nan):7.1f} {r.get('tflops', nan):6.0f} "
                  f"{r.get('cublas_us', nan):7.1f} {r.get('cublas_graph_us', nan):7.1f} "
                  f"{r.get('speedup', nan):6.2f} {r.get('graph_speedup', nan):6.2f} "
                  f"{r.get('diff', nan):7.1e} {r.get('error', '')[:50]} {r.get('cublas_error', '')[:50]}")
        print("card:", json.load(open(p))[0].get("card") if json.load(open(p)) else "?")
    p = os.path.join(args.out, "gluon_variant.json")
    if "variant" in args.phases.split(",") and os.path.exists(p):
        print_variant_table(p)


if __name__ == "__main__":
    main()
