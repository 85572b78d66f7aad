"""Timing and reporting shared by every benchmark suite.

A suite module (``fp8gemm/bench/suite_<name>.py``) exposes ``cases(quick: bool) -> list[Case]``.
Each case holds zero-argument callables that launch one implementation on preallocated inputs;
the runner checks correctness first, then times each implementation with CUDA events (median of
many runs, L2 flushed before each, after a warm-up) and reports µs, TFLOPS, GB/s, the fraction of
the card's measured ceilings and the speed ratio against every peer in the same row.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
from typing import Callable

import torch

from .. import runtime

# Ceilings measured on our cards (ANCHORS.md): copy bandwidth (read + write) and FP8 dense TFLOPS.
CEILINGS = {
    "H100": {"copy_gbs": 3010.0, "fp8_tflops": 1265.0, "bf16_tflops": 761.0},
    "H200": {"copy_gbs": 4250.0, "fp8_tflops": 1282.0, "bf16_tflops": 800.0},
}


@dataclasses.dataclass
class Case:
    suite: str
    name: str
    flops: float
    bytes: float
    impls: dict[str, Callable[[], object]]
    check: Callable[[], float] | None = None
    tol: float = 0.0
    compute_dtype: str = "fp8"


def card_name() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for key in CEILINGS:
        if key in name:
            return key
    return name


def _as_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (so host-side launch cost stays out of the timing), or ``fn``
    itself when it cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph.replay
    except Exception:  # not capturable (e.g. it syncs with the host): time it eagerly
        torch.cuda.synchronize()
        return fn


# How time_us evicts the L2 before each timed call: "write" (zero a 256 MB buffer; the L2 is then full of dirty
# lines, which the timed kernel's own traffic may have to write back) or "read" (sum it; the L2 holds clean lines).
# "write" (do_bench's way, and ANCHORS.md's) is what benchmarks/RESULTS.md uses unless a row says otherwise;
# "read" isolates a kernel's own bytes.  The environment variable FP8GEMM_BENCH_FLUSH sets the default.
FLUSH_MODE = runtime.bench_flush()


def time_us(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0,
            max_iters: int = 1000, graph: bool = True, flush_mode: str | None = None) -> float:
    """Median time of ``fn`` in µs: CUDA events around each call, L2 flushed before each call.

    With ``graph`` (default) the call is captured in a CUDA graph first and the replays are timed, so
    that the Python-side launch cost (argument checks, Triton's launcher) does not leak into short
    kernels' times; the device-side work is the same.  ``flush_mode``: see :data:`FLUSH_MODE` (its value
    when None).
    """
    mode = flush_mode or FLUSH_MODE
    if mode not in ("write", "read"):
        raise ValueError(f"flush_mode must be 'write' or 'read', got {mode!r}")
    flush = torch.empty(int(256e6) // 4, dtype=torch.int32, device="cuda")
    sink = torch.empty((), dtype=torch.int64, device="cuda")
    flush.zero_()

    def evict():
        if mode == "write":
            flush.zero_()
        else:
            torch.sum(flush, dim=0, dtype=torch.int64, out=sink)
    fn()
    torch.cuda.synchronize()
    if graph:
        fn = _as_graph(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    n_warm = max(1, int(warmup_ms / estimate_ms))
    n_rep = max(5, min(max_iters, int(rep_ms / estimate_ms)))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        evict()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def deep_gemm_or_none():
    """DeepGEMM's module where ``import deep_gemm`` works (a peer column), else None (also when its import
    fails otherwise, e.g. its extension does not load: the suites then run without it)."""
    try:
        import deep_gemm
        return deep_gemm
    except Exception:  # noqa: BLE001
        return None


def ab_header() -> tuple[int, object]:
    """The A/B scripts' start: prints the card, its SM count and whether DeepGEMM is there; returns
    ``(num_sms, deep_gemm module or None)``."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    dg = deep_gemm_or_none()
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs, DeepGEMM {'yes' if dg else 'no'}", flush=True)
    return num_sms, dg


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, list[float]]:
    """:func:`time_us` of every function, ``rounds`` times, the functions interleaved within each round (so a
    drift of clock or temperature during the run falls on all of them alike): name -> µs per round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_us(fn))
    return times


def checked_run(fn: Callable[[], object], out: torch.Tensor, want: torch.Tensor, tol: float = 1e-3):
    """Poison ``out`` with NaN, run ``fn`` once, and compare: ``(ok, diff)``, ok when no NaN is left and
    ``calc_diff(out, want) < tol``."""
    from ..testing import calc_diff
    out.fill_(float("nan"))
    fn()
    torch.cuda.synchronize()
    diff = calc_diff(out.float(), want.float())
    return diff < tol and not bool(torch.isnan(out).any()), diff


def ab_rounds(label: str, runs: dict[str, Callable[[], object]], out: torch.Tensor, want: torch.Tensor,
              rounds: int = 3, *, flops: float | None = None, nbytes: float | None = None,
              baseline_us: float | None = None, baseline: str = "cuBLAS") -> list[dict]:
    """The A/B scripts' loop: each run checked first (:func:`checked_run`; one that raises or is wrong is
    reported and left out), the good ones timed in interleaved rounds (:func:`interleaved_times`), a line
    printed per run (best µs, every round, TFLOPS from ``flops`` or GB/s from ``nbytes``, speed over
    ``baseline_us``).  Returns one row per run: ``config``, ``ok``, ``diff`` and, when timed, ``us`` (the best
    round) and ``rounds``."""
    rows, good = {}, {}
    for tag, fn in runs.items():
        try:
            ok, diff = checked_run(fn, out, want)
        except Exception as e:  # noqa: BLE001 - a config that does not build is reported, not fatal
            print(f"{label} {tag:24s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            rows[tag] = dict(case=label, config=tag, ok=False, error=str(e)[:200])
            continue
        rows[tag] = dict(case=label, config=tag, ok=ok, diff=diff)
        if ok:
            good[tag] = fn
        else:
            print(f"{label} {tag:24s} WRONG diff {diff:.2e}", flush=True)
    for tag, ts in interleaved_times(good, rounds).items():
        us = min(ts)
        rows[tag].update(us=us, rounds=ts)
        rate = (f" {flops / us / 1e6:6.0f} TFLOPS" if flops else "") + (f" {nbytes / us / 1e3:6.0f} GB/s" if nbytes
                                                                        else "")
        vs = f"  vs {baseline} {baseline_us:.1f} us: {baseline_us / us:5.3f}x" if baseline_us else ""
        print(f"{label} {tag:24s} {us:8.1f} us (rounds {', '.join(f'{t:.1f}' for t in ts)}){rate}{vs}", flush=True)
    return list(rows.values())


def run_cases(cases: list[Case], progress: bool = True, rounds: int = 1) -> list[dict]:
    """Check and time every case; one result dict per (case, implementation).

    ``rounds`` > 1: each case's implementations are timed in that many interleaved rounds (a drift of clock or
    temperature then falls on all of them alike) and each keeps its best round; one shot a row moved by
    up to 12% on an H100 (RESULTS.md, session 8)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    card = card_name()
    ceil = CEILINGS.get(card, {})
    rows = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(cases), file=sys.stderr, desc="bench", leave=False)
        except ImportError:
            bar = None
    for case in cases:
        if bar is not None:
            bar.set_postfix_str(f"{case.suite} {case.name}")
        err, ok = None, True
        if case.check is not None:
            try:
                err = float(case.check())
                ok = (err <= case.tol) and not math.isnan(err)
            except Exception as exc:  # a failed check is reported, never hidden
                err, ok = float("nan"), False
                print(f"[check failed] {case.suite} {case.name}: {exc!r}", file=sys.stderr)
        all_times: dict[str, list[float]] = {impl: [] for impl in case.impls}
        for _ in range(rounds):
            for impl, fn in case.impls.items():
                if all_times[impl] and math.isnan(all_times[impl][-1]):
                    continue          # failed once: not timed again
                try:
                    all_times[impl].append(time_us(fn))
                except Exception as exc:
                    print(f"[time failed] {case.suite} {case.name} {impl}: {exc!r}", file=sys.stderr)
                    all_times[impl].append(float("nan"))
        times = {impl: (float("nan") if any(math.isnan(t) for t in ts) else min(ts))
                 for impl, ts in all_times.items()}
        if progress:   # one line a case, so that a run cut off at its time limit still says what it measured
            print(f"[case] {case.suite} {case.name}: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()),
                  file=sys.stderr, flush=True)
        for impl, us in times.items():
            sec = us * 1e-6
            tflops = case.flops / sec / 1e12 if case.flops and us == us else 0.0
            gbs = case.bytes / sec / 1e9 if case.bytes and us == us else 0.0
            peak_key = "fp8_tflops" if case.compute_dtype == "fp8" else "bf16_tflops"
            row = {"suite": case.suite, "case": case.name, "impl": impl, "card": card, "us": us,
                   "rounds_us": all_times[impl],
                   "tflops": tflops, "gbs": gbs,
                   "frac_compute": tflops / ceil[peak_key] if peak_key in ceil else None,
                   "frac_copy": gbs / ceil["copy_gbs"] if "copy_gbs" in ceil else None,
                   "check_err": err if impl == "fp8gemm" else None, "check_ok": ok if impl == "fp8gemm" else None}
            for other, other_us in times.items():
                if other != impl:
                    row[f"speedup_vs_{other}"] = other_us / us if us and us == us else float("nan")
            rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per case: fp8gemm's µs/TFLOPS/GB/s and each peer's µs and fp8gemm's speed ratio over it."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["suite"], r["case"]), {})[r["impl"]] = r
    lines = []
    header = f"{'suite':8} {'case':38} {'us':>9} {'TFLOPS':>7} {'GB/s':>7} {'%peak':>6} {'check':>9}  peers (us, our speedup)"
    lines.append(header)
    lines.append("-" * len(header))
    for (suite, case), impls in by_case.items():
        ours = impls.get("fp8gemm")
        if ours is None:
            continue
        frac = ours["frac_compute"] if ours["tflops"] > 0 and (ours["frac_compute"] or 0) > (ours["frac_copy"] or 0) \
            else ours["frac_copy"]
        check = "n/a" if ours["check_err"] is None else f"{ours['check_err']:.1e}" + ("" if ours["check_ok"] else "!")
        peers = "  ".join(f"{name} {r['us']:.1f} ({ours.get(f'speedup_vs_{name}', float('nan')):.2f}x)"
                          for name, r in impls.items() if name != "fp8gemm")
        lines.append(f"{suite:8} {case:38} {ours['us']:9.1f} {ours['tflops']:7.0f} {ours['gbs']:7.0f} "
                     f"{100 * frac if frac is not None else float('nan'):5.0f}% {check:>9}  {peers}")
    return "\n".join(lines)


def write_results(rows: list[dict], folder: str, tag: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{tag}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(folder, f"{tag}.txt"), "w") as f:
        f.write(format_table(rows) + "\n")
    try:
        plot(rows, os.path.join(folder, f"{tag}.png"))
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = []
    for r in rows:
        key = f"{r['suite']} {r['case']}"
        if key not in cases:
            cases.append(key)
    impls = sorted({r["impl"] for r in rows}, key=lambda s: (s != "fp8gemm", s))
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(cases)), 5))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        vals = []
        for key in cases:
            match = [r for r in rows if f"{r['suite']} {r['case']}" == key and r["impl"] == impl]
            if match and match[0]["us"] == match[0]["us"]:
                r = match[0]
                vals.append(100 * (r["frac_compute"] if r["tflops"] and (r["frac_compute"] or 0) >= (r["frac_copy"] or 0)
                                   else (r["frac_copy"] or 0)))
            else:
                vals.append(0)
        ax.bar([x + i * width for x in range(len(cases))], vals, width, label=impl)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
    ax.set_xticklabels(cases, rotation=90, fontsize=6)
    ax.set_ylabel("% of the card's ceiling (compute or copy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
