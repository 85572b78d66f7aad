"""Compile DeepGEMM's kernels for the benchmark suites' shapes in parallel, before the timed run.

DeepGEMM compiles each kernel the first time a shape is called (10-30 s each with NVCC), which makes
a first ``python -m fp8gemm bench gemm mqa`` with DeepGEMM installed take longer than a device call
allows. This script builds the suites' cases in ``--procs`` processes on the one GPU, each calling the
DeepGEMM entries of its share of the cases once, so the timed run finds every kernel in DeepGEMM's cache
(``DG_JIT_CACHE_DIR``).  Nothing is timed here.  Needs ``import deep_gemm`` to work; it does not build
DeepGEMM.

    PYTHONPATH=. python3 benchmarks/dg_prewarm.py --procs 4 [--suites gemm,mqa] [--filter REGEX]
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import re
import time


def _work(rank: int, procs: int, suites: list[str], pattern: str, out) -> None:
    import torch
    from fp8gemm.bench import suite_gemm, suite_mqa
    torch.cuda.set_device(0)
    makers = []
    if "gemm" in suites:
        makers += [suite_gemm.dense_cases, suite_gemm.masked_cases, suite_gemm.contiguous_cases]
    if "mqa" in suites:
        makers += [suite_mqa.prefill_cases, suite_mqa.paged_cases]
    index = done = 0
    for make in makers:   # one suite's cases at a time: the masked ones alone hold ~30 GB
        cases = [c for c in make(False) if re.search(pattern, c.name)]
        for case in cases:
            index += 1
            if index % procs != rank:
                continue
            for name, fn in case.impls.items():
                if name.startswith("DeepGEMM"):
                    fn()
                    done += 1
        del cases
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    torch.cuda.synchronize()
    out.put((rank, done))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--suites", default="gemm,mqa")
    ap.add_argument("--filter", default="", help="the cases the benchmark's --filter will select (regular expression)")
    args = ap.parse_args()
    importlib.import_module("deep_gemm")   # fail here, loudly, when it is not installed
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    t0 = time.time()
    ps = [ctx.Process(target=_work, args=(r, args.procs, args.suites.split(","), args.filter, out)) for r in range(args.procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    calls = 0
    while not out.empty():
        calls += out.get()[1]
    bad = [p.exitcode for p in ps if p.exitcode != 0]
    print(f"dg_prewarm: {calls} DeepGEMM calls in {time.time() - t0:.0f} s; failed workers: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
