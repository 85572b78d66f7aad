"""``python -m fp8gemm bench``: run benchmark suites side by side and write a table, JSON and a plot."""
from __future__ import annotations

import argparse
import importlib
import re
import sys

SUITES = ["gemm", "quant", "mqa", "moe_act"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fp8gemm bench", description=__doc__)
    p.add_argument("suites", nargs="*", default=["gemm"], help=f"suites to run (of {SUITES}, or 'all')")
    p.add_argument("--quick", action="store_true", help="a few shapes per suite")
    p.add_argument("--filter", default="", help="only cases whose name matches this regular expression (re.search; plain text matches as a substring)")
    p.add_argument("--out", default="results", help="folder for JSON, table and PNG")
    p.add_argument("--tag", default="bench", help="file name stem of the outputs")
    p.add_argument("--rounds", type=int, default=1,
                   help="time each case's implementations in this many interleaved rounds, best kept (use 3 when "
                        "comparing with a peer)")
    args = p.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA GPU; none found", file=sys.stderr)
        return 2
    from .core import card_name, format_table, run_cases, write_results

    suites = SUITES if args.suites == ["all"] else args.suites
    cases = []
    for name in suites:
        try:
            mod = importlib.import_module(f"fp8gemm.bench.suite_{name}")
        except ImportError as exc:
            print(f"[skip suite {name}: {exc}]", file=sys.stderr)
            continue
        cases += [c for c in mod.cases(args.quick) if re.search(args.filter, c.name)]
    rows = run_cases(cases, rounds=args.rounds)
    write_results(rows, args.out, args.tag)
    print(f"card: {torch.cuda.get_device_name()} ({card_name()}), torch {torch.__version__}")
    print(format_table(rows))
    failed = [r for r in rows if r.get("check_ok") is False]
    if failed:
        print(f"{len(failed)} case(s) FAILED their correctness check", file=sys.stderr)
        return 1
    return 0
