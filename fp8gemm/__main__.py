"""``python -m fp8gemm demo`` runs the kernels and checks them; ``python -m fp8gemm bench`` benchmarks them."""
from __future__ import annotations

import os
import sys


def _ensure_interpreter_without_gpu() -> None:
    """Without a GPU, Triton kernels can only run in its interpreter, which must be chosen before import."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    import torch
    if not torch.cuda.is_available():
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "fp8gemm", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fp8gemm {demo,bench} [...]\n"
              "  demo   run every kernel once on small shapes (GPU if present, else the Triton interpreter)\n"
              "         and check it against fp8gemm.reference\n"
              "  bench  benchmark suites side by side with cuBLAS/DeepGEMM (GPU only); bench -h for options")
        return 0
    if argv[0] == "demo":
        _ensure_interpreter_without_gpu()
        from .demo import run_demo
        return run_demo(argv[1:])
    if argv[0] == "bench":
        from .bench.cli import main as bench_main
        return bench_main(argv[1:])
    print(f"unknown command {argv[0]!r}; try demo or bench", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
