"""Benchmark harness: suites of cases timed side by side (fp8gemm vs cuBLAS vs DeepGEMM)."""
