"""Dense and grouped FP8 GEMM benchmark cases: the shapes of ANCHORS.md, fp8gemm vs cuBLAS vs DeepGEMM.

cuBLAS is block-scaled FP8 through ``torch.nn.functional.scaled_mm`` (BlockWise1x128 for A with
column-major scales, BlockWise128x128 for B); for grouped GEMMs it runs one call per expert (what a
user without a grouped kernel would do), so its column there is an upper bound on the work, not a
like-for-like kernel.  DeepGEMM appears when ``import deep_gemm`` works.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm.bench.core import Case, deep_gemm_or_none, time_us
from fp8gemm.testing import calc_diff

DENSE_NK = [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DENSE_M = [1, 64, 128, 4096]
GROUPED_NK = [(6144, 7168), (7168, 3072), (4096, 4096), (4096, 2048)]
MASKED = [(32, 192), (6, 1024), (32, 20), (6, 20)]      # (groups, expected_m), max_m 4096 in ANCHORS
CONTIGUOUS = [(4, 8192), (8, 4096)]                    # (groups, ~m per group)


def _scaled_mm():
    """cuBLAS block-scaled FP8 (A 1x128, B 128x128), or None where this torch lacks it."""
    F = torch.nn.functional
    if not hasattr(F, "scaled_mm"):
        return None
    try:
        from torch.nn.functional import ScalingType  # noqa: F401  (blockwise scaling exists in this torch)
    except ImportError:
        return None

    def run(a, sfa_colmajor, b, sfb_t, out_dtype=torch.bfloat16):
        # B enters as b.t() [K, N], so its block scales enter transposed too ([K/128, N/128]).
        return F.scaled_mm(a, b.t(), sfa_colmajor, ScalingType.BlockWise1x128, sfb_t, ScalingType.BlockWise128x128,
                           output_dtype=out_dtype)
    return run


def _fp8(shape, device="cuda"):
    return torch.randn(*shape, device=device).to(torch.float8_e4m3fn)


def _scales(shape, device="cuda"):
    return torch.rand(*shape, device=device) + 0.5


def dense_operands(m: int, n: int, k: int, device="cuda"):
    """Random inputs of a dense 1D2D call ``(a, sfa, b, sfb, d)``: FP8 operands, scales in [0.5, 1.5) with
    ``sfa`` MN-major (the layout cuBLAS takes and the library accepts as is), ``d`` an empty BF16 output."""
    a, b = _fp8((m, k), device), _fp8((n, k), device)
    sfa = _scales((m, k // 128), device).t().contiguous().t()
    sfb = _scales((math.ceil(n / 128), k // 128), device)
    return a, sfa, b, sfb, torch.empty(m, n, dtype=torch.bfloat16, device=device)


def dense_ab_args(**extra: str):
    """The dense A/B scripts' command line (``benchmarks/raster_ab.py``, ``wide_sa_ab.py``): ``--ms`` (default
    4096), ``--shapes`` ("n:k" pairs; default :data:`DENSE_NK`), ``--rounds`` (3), ``--out`` ($OUT or "."), and one
    string option per ``extra`` name with its default.  Returns ``(args, [(m, n, k), ...])``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="4096")
    ap.add_argument("--shapes", default="", help="n:k pairs, comma separated (default: every dense ANCHORS row)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    for name, default in extra.items():
        ap.add_argument(f"--{name}", default=default)
    args = ap.parse_args()
    nks = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes else DENSE_NK
    return args, [(int(m), n, k) for m in args.ms.split(",") for n, k in nks]


def cublas_us(a, sfa, b, sfb) -> float | None:
    """The best of two :func:`fp8gemm.bench.core.time_us` of cuBLAS block-scaled FP8 on a dense 1D2D call of
    :func:`dense_operands`' layout (None where ``scaled_mm`` cannot run it)."""
    cublas = _scaled_mm()
    if cublas is None:
        return None
    return min(time_us(lambda: cublas(a, sfa, b, sfb.t())) for _ in range(2))


def dense_cases(quick: bool) -> list[Case]:
    cublas = _scaled_mm()
    dg = deep_gemm_or_none()
    cases = []
    ms = [64, 4096] if quick else DENSE_M
    nks = DENSE_NK[:3] if quick else DENSE_NK
    for m in ms:
        for n, k in nks:
            a, b = _fp8((m, k)), _fp8((n, k))
            sfa, sfb = _scales((m, k // 128)), _scales((math.ceil(n / 128), k // 128))
            sfa_cm = sfa.t().contiguous().t()
            d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")

            def ours(a=a, sfa=sfa, b=b, sfb=sfb, d=d):
                fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)

            def check(a=a, sfa=sfa, b=b, sfb=sfb, d=d):
                d.fill_(float("nan"))
                fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
                return calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb))

            # the same call with A's scales MN-major (DeepGEMM's layout; sglang passes them so): the Gluon kernel
            # then brings them through shared memory at every size (gemm_gluon.sa_smem_pays)
            impls = {"fp8gemm": ours, "fp8gemm[mn]": lambda a=a, s=sfa_cm, b=b, sb=sfb, d=d:
                     fp8gemm.fp8_gemm_nt((a, s), (b, sb), d)}
            if cublas is not None and m > 1:
                impls["cuBLAS"] = lambda a=a, s=sfa_cm, b=b, sb=sfb.t(): cublas(a, s, b, sb)
            if dg is not None:
                # DeepGEMM's SM90 kernel reads A's scales MN-major; given them so, it launches no transpose.
                impls["DeepGEMM"] = lambda a=a, b=b, sfa=sfa_cm, sfb=sfb, d=d: dg.fp8_gemm_nt((a, sfa), (b, sfb), d)
            cases.append(Case("dense", f"m{m} n{n} k{k}", 2.0 * m * n * k, m * k + n * k + 2 * m * n + 4 * (m + n) * k / 128,
                              impls, check, 1e-3))
    return cases


def masked_counts(groups: int, expected_m: int, max_m: int) -> torch.Tensor:
    """The benchmarks' ``masked_m`` of a masked row: 0.7-1.3x ``expected_m`` per group, drawn from a seed of the
    row (CPU int32; the same draw in every script)."""
    gen = torch.Generator(device="cpu").manual_seed(groups * 1000 + expected_m)
    return torch.clamp((torch.rand(groups, generator=gen) * 0.6 + 0.7) * expected_m, 1, max_m).int()


def masked_cases(quick: bool, overlap: bool = False) -> list[Case]:
    dg = deep_gemm_or_none()
    cases = []
    max_m = 4096
    rows = MASKED[:2] if quick else MASKED
    nks = GROUPED_NK[:2] if quick else GROUPED_NK
    for g, expected in rows:
        for n, k in nks:
            counts = masked_counts(g, expected, max_m)
            masked_m = counts.to("cuda")
            a, b = _fp8((g, max_m, k)), _fp8((g, n, k))
            sfa, sfb = _scales((g, max_m, k // 128)), _scales((g, math.ceil(n / 128), k // 128))
            d = torch.empty(g, max_m, n, dtype=torch.bfloat16, device="cuda")
            signal = fp8gemm.alloc_signal(g, max_m, "cuda") if overlap else None

            def ours(a=a, sfa=sfa, b=b, sfb=sfb, d=d, mm=masked_m, e=expected, s=signal):
                if s is not None:
                    s.zero_()
                fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, mm, e, enable_overlap=s is not None,
                                                     signal=s)

            def check(a=a, sfa=sfa, b=b, sfb=sfb, d=d, mm=masked_m, e=expected, s=signal, counts=counts, n=n):
                d.fill_(float("nan"))
                if s is not None:
                    s.zero_()
                out = fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, mm, e,
                                                           enable_overlap=s is not None, signal=s)
                if s is not None:
                    fp8gemm.testing.check_signal(s, mm, max_m, n, out[0], out[1])
                got = torch.cat([d[i, :c] for i, c in enumerate(counts.tolist())])
                want = torch.cat([R.fp8_gemm_nt(a[i, :c], sfa[i, :c], b[i], sfb[i]) for i, c in enumerate(counts.tolist())])
                return calc_diff(got, want)

            sfa_mn = fp8gemm.get_mn_major_tma_aligned_tensor(sfa)   # DeepGEMM's layout: no transpose timed
            impls = {"fp8gemm": ours}
            if not overlap:     # the same call with MN-major scales (SA_SMEM on: gemm_gluon.sa_smem_pays)
                impls["fp8gemm[mn]"] = lambda a=a, s=sfa_mn, b=b, sb=sfb, d=d, mm=masked_m, e=expected: \
                    fp8gemm.m_grouped_fp8_gemm_nt_masked((a, s), (b, sb), d, mm, e)
            if dg is not None:
                impls["DeepGEMM"] = lambda a=a, b=b, sfa=sfa_mn, sfb=sfb, d=d, mm=masked_m, e=expected: \
                    dg.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, mm, e)
            total = int(counts.sum())
            nbytes = g * n * k + total * k + 2 * total * n
            name = f"{'sbo ' if overlap else ''}g{g} e{expected} n{n} k{k}"
            cases.append(Case("masked", name, 2.0 * total * n * k, nbytes, impls, check, 1e-3))
    return cases


def contiguous_cases(quick: bool) -> list[Case]:
    dg = deep_gemm_or_none()
    cases = []
    rows = CONTIGUOUS[:1] if quick else CONTIGUOUS
    nks = GROUPED_NK[2:3] if quick else GROUPED_NK
    for g, per in rows:
        for n, k in nks:
            gen = torch.Generator(device="cpu").manual_seed(g)
            real = [int(per * (0.7 + 0.6 * float(torch.rand(1, generator=gen)))) for _ in range(g)]
            ids = []
            for e, r in enumerate(real):
                ids += [e] * r + [-1] * ((-r) % 128)
            m = len(ids)
            m_indices = torch.tensor(ids, dtype=torch.int32, device="cuda")
            a, b = _fp8((m, k)), _fp8((g, n, k))
            sfa, sfb = _scales((m, k // 128)), _scales((g, math.ceil(n / 128), k // 128))
            d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")

            def ours(a=a, sfa=sfa, b=b, sfb=sfb, d=d, mi=m_indices):
                fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, mi)

            def check(a=a, sfa=sfa, b=b, sfb=sfb, d=d, mi=m_indices):
                d.fill_(float("nan"))
                fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, mi)
                ok = mi >= 0
                if d[~ok].isnan().all().item() is False:
                    return float("inf")
                ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, mi, torch.zeros_like(d))
                return calc_diff(d[ok], ref[ok])

            sfa_mn = fp8gemm.get_mn_major_tma_aligned_tensor(sfa)
            impls = {"fp8gemm": ours, "fp8gemm[mn]": lambda a=a, s=sfa_mn, b=b, sb=sfb, d=d, mi=m_indices:
                     fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a, s), (b, sb), d, mi)}
            if dg is not None:
                impls["DeepGEMM"] = lambda a=a, b=b, sfa=sfa_mn, sfb=sfb, d=d, mi=m_indices: \
                    dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, mi)
            total = sum(real)
            cases.append(Case("contig", f"g{g} m~{per} n{n} k{k}", 2.0 * total * n * k,
                              m * k + g * n * k + 2 * m * n, impls, check, 1e-3))
    return cases


def masked_fp4_cases(quick: bool) -> list[Case]:
    """FP4 activations (dequantised to E4M3 inside the kernel) vs the same GEMM fed FP8 activations."""
    cases = []
    max_m = 4096
    for g, expected in [(32, 20), (6, 20)] if quick else [(32, 20), (6, 20), (32, 192)]:
        for n, k in GROUPED_NK[:2] if quick else GROUPED_NK:
            masked_m = torch.full((g,), expected, dtype=torch.int32, device="cuda")
            codes = torch.randint(0, 256, (g, max_m, k // 2), dtype=torch.uint8, device="cuda")
            sbytes = torch.randint(120, 131, (g, max_m, k // 32), dtype=torch.uint8, device="cuda")
            a8, sfa8 = _fp8((g, max_m, k)), _scales((g, max_m, k // 128))
            b, sfb = _fp8((g, n, k)), _scales((g, math.ceil(n / 128), k // 128))
            d = torch.empty(g, max_m, n, dtype=torch.bfloat16, device="cuda")

            def ours(c=codes, s=sbytes, b=b, sfb=sfb, d=d, mm=masked_m, e=expected):
                fp8gemm.m_grouped_fp8_gemm_nt_masked((c, s), (b, sfb), d, mm, e)

            def fp8_input(a=a8, sfa=sfa8, b=b, sfb=sfb, d=d, mm=masked_m, e=expected):
                fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, mm, e)

            def check(c=codes, s=sbytes, b=b, sfb=sfb, d=d, mm=masked_m, e=expected):
                d.fill_(float("nan"))
                fp8gemm.m_grouped_fp8_gemm_nt_masked((c, s), (b, sfb), d, mm, e)
                ref = R.m_grouped_fp8_gemm_nt_masked(c[:, :e], s[:, :e], b, sfb, mm, torch.zeros_like(d[:, :e]))
                return calc_diff(d[:, :e], ref)

            total = g * expected
            cases.append(Case("masked", f"fp4-act g{g} e{expected} n{n} k{k}", 2.0 * total * n * k,
                              g * n * k + total * k // 2 + 2 * total * n, {"fp8gemm": ours, "fp8-input": fp8_input},
                              check, 1e-3))
    return cases


def cases(quick: bool) -> list[Case]:
    return (dense_cases(quick) + masked_cases(quick) + masked_cases(True, overlap=True) + contiguous_cases(quick)
            + masked_fp4_cases(quick))
