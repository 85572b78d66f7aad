"""MoE activation-path benchmark cases: the fused pre-dispatch and the FP8 combine reduction at DeepSeek
decode/prefill shapes (4096 tokens, hidden 7168, top-8), against the same work in plain PyTorch.

Memory bound: ``bytes`` counts the input read once and every buffer row written once (activations,
scales, ids, weights, padding rows included).  The check counts bytes that differ from
:mod:`fp8gemm.reference` (must be 0).

FP4-activation GEMM rows (``fp4-act cost ...``, the masked decode shapes of ANCHORS.md, max_m 4096): the
``fp8gemm`` column is the masked GEMM fed FP8 activations, and every peer is timed in the same run, so its
ratio in parentheses is **its time over the FP8-input GEMM's** (1.05x = 5% overhead): ``fp4-convert+gemm``
(the default route on SM90: the fused FP4 -> FP8 convert, then the Gluon GEMM), ``fp4-in-kernel`` (the Triton
GEMM dequantising in its A-load, ``FP8GEMM_BACKEND=triton``) and ``convert-only`` (the convert kernel alone).
Their check: convert + GEMM against the reference (calc_diff), and it fails if the converted bytes differ
from :func:`fp8gemm.kernels.fp4_convert.fp4_to_fp8_reference` or the in-kernel route disagrees (> 1e-5).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm.bench.core import Case
from fp8gemm.kernels import fp4_convert as FC
from fp8gemm.testing import calc_diff, count_bit_mismatches
from fp8gemm.moe import combine_reduce, mega_moe_pre_dispatch

FP8 = torch.float8_e4m3fn
TOKENS, HIDDEN, TOPK, EXPERTS = 4096, 7168, 8, 256




def _mismatches(got, want) -> float:
    return float(count_bit_mismatches(got, want))


def _torch_pre_dispatch(x, idx, w, bx, bsf, bi, bw, n, group_size, fp4):
    """The same buffers filled with PyTorch ops (FP8 path; FP4 through the reference's rounding table
    would not be a fair peer, so FP4 uses thresholds like the kernel)."""
    xv = x[:n].view(n, HIDDEN // group_size, group_size).float()
    sf = R.ceil_to_ue8m0(xv.abs().amax(-1).clamp(min=1e-4) / (6.0 if fp4 else 448.0))
    y = xv * (1.0 / sf).unsqueeze(-1)
    if fp4:
        a = y.abs()
        code = sum((a > t).to(torch.uint8) for t in (0.25, 1.25, 2.5, 5.0)) + \
            sum((a >= t).to(torch.uint8) for t in (0.75, 1.75, 3.5))
        code = (code | (((y < 0) & (code != 0)).to(torch.uint8) << 3)).view(n, HIDDEN)
        bx[:n] = code[:, 0::2] | (code[:, 1::2] << 4)
    else:
        bx[:n] = y.to(FP8).view(n, HIDDEN)
    bsf[:n] = R.to_ue8m0_bytes(sf)
    bi[:n] = idx[:n]
    bw[:n] = w[:n]
    bx.view(torch.uint8)[n:] = 0
    bsf[n:] = 0
    bi[n:] = -1
    bw[n:] = 0


def pre_dispatch_operands(n: int, capacity: int, group_size: int, fp4: bool, code_dtype=FP8):
    """Random ``x`` BF16 [n, HIDDEN], top-``TOPK`` ids and weights, the four pre-dispatch buffers of
    ``capacity`` rows (codes as ``code_dtype``, or uint8 pairs for FP4; UE8M0 scale bytes) and the bytes a
    perfect kernel moves (inputs read once, every buffer row written once); also used by the A/B scripts."""
    x = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, EXPERTS, (n, TOPK), device="cuda")
    w = torch.rand(n, TOPK, device="cuda")
    bx = torch.empty(capacity, HIDDEN // 2, dtype=torch.uint8, device="cuda") if fp4 else \
        torch.empty(capacity, HIDDEN, dtype=code_dtype, device="cuda")
    bsf = torch.empty(capacity, HIDDEN // group_size, dtype=torch.uint8, device="cuda")
    bi = torch.empty(capacity, TOPK, dtype=torch.int64, device="cuda")
    bw = torch.empty(capacity, TOPK, device="cuda")
    bufs = (bx, bsf, bi, bw)
    nbytes = x.numel() * 2 + idx.numel() * 8 + w.numel() * 4 + sum(b.numel() * b.element_size() for b in bufs)
    return x, idx, w, bufs, nbytes


def _pre_dispatch_case(n: int, capacity: int, group_size: int, fp4: bool) -> Case:
    x, idx, w, bufs, nbytes = pre_dispatch_operands(n, capacity, group_size, fp4)
    bx, bsf, bi, bw = bufs
    launch = (lambda: mega_moe_pre_dispatch(x, idx, w, *bufs, n, group_size, fp4))

    def check():
        launch()
        return _mismatches(bufs, R.mega_moe_pre_dispatch(x, idx, w, n, capacity, group_size, fp4))
    tb = (torch.empty_like(bx), torch.empty_like(bsf), torch.empty_like(bi), torch.empty_like(bw))
    name = f"pre_dispatch {'fp4' if fp4 else 'fp8'}/{group_size} {n}x{HIDDEN} top{TOPK} cap{capacity}"
    return Case("moe_act", name, 0.0, nbytes,
                {"fp8gemm": launch, "torch": lambda: _torch_pre_dispatch(x, idx, w, *tb, n, group_size, fp4)},
                check, 0.0)


def _combine_case(t: int) -> Case:
    q = torch.randn(t, TOPK, HIDDEN, device="cuda").to(FP8)
    sf = torch.randint(120, 130, (t, TOPK, math.ceil(HIDDEN / 128)), dtype=torch.uint8, device="cuda")
    w = torch.rand(t, TOPK, device="cuda")
    out = torch.empty(t, HIDDEN, dtype=torch.bfloat16, device="cuda")
    nbytes = q.numel() + sf.numel() + w.numel() * 4 + out.numel() * 2
    launch = (lambda: combine_reduce(q, sf, w, out=out))

    def check():
        launch()
        return _mismatches((out,), (R.combine_reduce(q, sf, w),))

    def torch_combine():
        scale = R.ue8m0_to_fp32(sf).repeat_interleave(128, dim=-1)
        return (q.float() * scale * w[..., None]).sum(1).to(torch.bfloat16)
    return Case("moe_act", f"combine_reduce fp8 {t}x{HIDDEN} top{TOPK}", 0.0, nbytes,
                {"fp8gemm": launch, "torch": torch_combine}, check, 0.0)


MASKED_MAX_M = 4096
GROUPED_NK = [(6144, 7168), (7168, 3072), (4096, 4096), (4096, 2048)]
FP4_GEMM_FULL = ([(32, 20, n, k) for n, k in GROUPED_NK] + [(6, 20, n, k) for n, k in GROUPED_NK]
                 + [(32, 192, 6144, 7168)])
FP4_GEMM_QUICK = [(32, 20, 6144, 7168), (6, 20, 4096, 2048)]     # the largest and the smallest decode GEMM


@contextlib.contextmanager
def _backend(name: str):
    old = os.environ.get("FP8GEMM_BACKEND")
    os.environ["FP8GEMM_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["FP8GEMM_BACKEND"]
        else:
            os.environ["FP8GEMM_BACKEND"] = old


class _Buffers:
    """Inputs shared between the FP4 GEMM cases (max_m 4096 makes every activation buffer large)."""

    def __init__(self):
        self.store = {}

    def get(self, key, make):
        if key not in self.store:
            self.store[key] = make()
        return self.store[key]


def _fp4_gemm_case(bufs: _Buffers, g: int, expected: int, n: int, k: int) -> Case:
    max_m = MASKED_MAX_M
    gen = torch.Generator(device="cpu").manual_seed(g * 1000 + expected)
    counts = torch.clamp((torch.rand(g, generator=gen) * 0.6 + 0.7) * expected, 1, max_m).int()
    masked_m = counts.to("cuda")

    def acts():
        codes = torch.randint(0, 256, (g, max_m, k // 2), dtype=torch.uint8, device="cuda")
        sbytes = torch.randint(120, 131, (g, max_m, k // 32), dtype=torch.uint8, device="cuda")
        a8 = torch.randn(g, max_m, k, device="cuda").to(FP8)
        sfa8 = fp8gemm.get_mn_major_tma_aligned_tensor(torch.rand(g, max_m, k // 128, device="cuda") + 0.5)
        return codes, sbytes, a8, sfa8, *FC.empty_fp8_operand(codes, k)
    codes, sbytes, a8, sfa8, q, sf = bufs.get(("acts", g, k), acts)
    b, sfb = bufs.get(("w", g, n, k), lambda: (torch.randn(g, n, k, device="cuda").to(FP8),
                                               torch.rand(g, math.ceil(n / 128), k // 128, device="cuda") + 0.5))
    d = bufs.get(("d", g, n), lambda: torch.empty(g, max_m, n, dtype=torch.bfloat16, device="cuda"))

    def fp8_input():
        fp8gemm.m_grouped_fp8_gemm_nt_masked((a8, sfa8), (b, sfb), d, masked_m, expected)

    def fp4_convert_gemm(out=d):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes), (b, sfb), out, masked_m, expected)

    def fp4_in_kernel(out=d):
        with _backend("triton"):
            fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes), (b, sfb), out, masked_m, expected)

    def convert_only():
        FC.launch_fp4_to_fp8(codes, sbytes, q, sf, masked_m=masked_m, rows_hint=expected)

    def check():
        c = counts.tolist()
        rows = max(c)
        convert_only()
        want_q, want_sf = FC.fp4_to_fp8_reference(codes[:, :rows], sbytes[:, :rows])
        bad = sum(count_bit_mismatches((q[i, :m], sf[i, :m]), (want_q[i, :m], want_sf[i, :m])) for i, m in enumerate(c))
        if bad:
            raise AssertionError(f"convert kernel: {bad} E4M3 bytes / scales differ from fp4_to_fp8_reference")
        d.fill_(float("nan"))
        fp4_convert_gemm()
        got = torch.cat([d[i, :m] for i, m in enumerate(c)])
        d.fill_(float("nan"))
        fp4_in_kernel()
        twin = torch.cat([d[i, :m] for i, m in enumerate(c)])
        if not calc_diff(got, twin) <= 1e-5:
            raise AssertionError(f"convert + GEMM vs in-kernel FP4: calc_diff {calc_diff(got, twin):.2e} > 1e-5")
        ref = R.m_grouped_fp8_gemm_nt_masked(codes[:, :rows], sbytes[:, :rows], b, sfb, masked_m,
                                             torch.zeros_like(d[:, :rows]))
        return calc_diff(got, torch.cat([ref[i, :m] for i, m in enumerate(c)]))

    total = int(counts.sum())
    name = f"fp4-act cost g{g} e{expected} n{n} k{k}"
    return Case("moe_act", name, 2.0 * total * n * k, g * n * k + total * k + 2 * total * n,
                {"fp8gemm": fp8_input, "fp4-convert+gemm": fp4_convert_gemm, "fp4-in-kernel": fp4_in_kernel,
                 "convert-only": convert_only}, check, 1e-3)


def fp4_gemm_cases(quick: bool) -> list[Case]:
    bufs = _Buffers()
    return [_fp4_gemm_case(bufs, *shape) for shape in (FP4_GEMM_QUICK if quick else FP4_GEMM_FULL)]


def cases(quick: bool) -> list[Case]:
    out = [_pre_dispatch_case(TOKENS, 4608, 128, False), _pre_dispatch_case(TOKENS, 4608, 32, True),
           _combine_case(TOKENS)]
    if not quick:
        out += [_pre_dispatch_case(TOKENS, 4608, 32, False), _pre_dispatch_case(128, 256, 128, False),
                _combine_case(128)]
    return out + fp4_gemm_cases(quick)
