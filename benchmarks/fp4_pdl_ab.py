"""FP4 activations through convert + Gluon GEMM with and without programmatic dependent launch (issue #6).

    PYTHONPATH=. python3 benchmarks/fp4_pdl_ab.py                 # the 9 masked decode rows, PDL on and off
    PYTHONPATH=. python3 benchmarks/fp4_pdl_ab.py --filter g6 --rounds 5
    PYTHONPATH=. python3 benchmarks/fp4_pdl_ab.py --pdl on        # one setting only (off: the pre-PDL route)

The rows and inputs are those of ``python -m fp8gemm bench moe_act --filter fp4-act`` (the "FP4 convert after
the instruction cut" table in benchmarks/RESULTS.md: masked layout, max_m 4096, expected_m 20/192): per row the
FP8-input Gluon GEMM, FP4 convert + GEMM with ``fp8gemm.set_pdl`` True and False, and the convert alone,
each captured in a CUDA graph and timed by ``fp8gemm.bench.core.time_us`` (median of replays, L2 flushed before
each).  ``--rounds`` repeats the whole set, implementations interleaved inside each row, and reports each
implementation's median over the rounds (min-max spread in the JSON).  Before timing, each row checks that
the PDL and non-PDL outputs are the same bits and that the suite's own check (convert bytes, vs the in-kernel
route and the reference) passes.  Cost = time / FP8-input time; target <= 1.05x.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _with_pdl(flag: bool, fn):
    import fp8gemm

    def run():
        old = fp8gemm.get_pdl()
        fp8gemm.set_pdl(flag)              # read at launch, so also at graph capture
        try:
            return fn()
        finally:
            fp8gemm.set_pdl(old)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pdl", choices=("both", "on", "off"), default="both")
    p.add_argument("--filter", default="", help="only rows whose name contains this text (e.g. g6)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the largest and the smallest decode row only")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for fp4_pdl_ab.json")
    args = p.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from fp8gemm.bench import suite_moe_act as S
    from fp8gemm.bench.core import time_us
    from fp8gemm.testing import bit_view

    os.environ.pop("FP8GEMM_BACKEND", None)
    bufs = S._Buffers()
    shapes = S.FP4_GEMM_QUICK if args.quick else S.FP4_GEMM_FULL
    settings = {"both": (True, False), "on": (True,), "off": (False,)}[args.pdl]
    rows, failed = [], 0
    for shape in shapes:
        case = S._fp4_gemm_case(bufs, *shape)
        if args.filter not in case.name:
            continue
        fp4 = case.impls["fp4-convert+gemm"]
        impls = {"fp8-input": case.impls["fp8gemm"]}
        for flag in settings:
            impls[f"pdl-{'on' if flag else 'off'}"] = _with_pdl(flag, fp4)
        impls["convert-only"] = case.impls["convert-only"]
        # correctness first: the suite's check (PDL per the module default), then PDL on == off bit for bit
        try:
            err = case.check()
            ok = err <= case.tol
            if len(settings) == 2:
                d = bufs.store[("d", shape[0], shape[2])]        # the case's output buffer
                outs = []
                for flag in settings:
                    d.fill_(float("nan"))
                    _with_pdl(flag, lambda: fp4(out=d))()
                    torch.cuda.synchronize()
                    outs.append(bit_view(d).clone())
                ok = ok and torch.equal(outs[0], outs[1])
        except Exception as exc:  # reported, never hidden
            print(f"[check failed] {case.name}: {exc!r}", file=sys.stderr)
            err, ok = float("nan"), False
        failed += not ok
        times = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                times[name].append(time_us(fn))
        med = {name: statistics.median(v) for name, v in times.items()}
        rows.append({"case": case.name, "check_err": err, "check_ok": ok, "card": torch.cuda.get_device_name(),
                     "median_us": med, "all_us": times})
        base = med["fp8-input"]
        parts = [f"{name} {us:.1f}" + ("" if name in ("fp8-input", "convert-only") else f" ({us / base:.3f}x)")
                 for name, us in med.items()]
        if "pdl-on" in med and "pdl-off" in med:
            parts.append(f"saved {med['pdl-off'] - med['pdl-on']:.1f} us")
        print(f"{case.name:34} " + "  ".join(parts) + ("" if ok else "  CHECK FAILED"), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp4_pdl_ab.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"card: {torch.cuda.get_device_name()}, rounds {args.rounds}, cost = time / fp8-input time")
    if failed:
        print(f"{failed} row(s) FAILED their check", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
