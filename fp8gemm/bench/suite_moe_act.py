"""MoE activation-path benchmark cases: the fused pre-dispatch and the FP8 combine reduction at DeepSeek
decode/prefill shapes (4096 tokens, hidden 7168, top-8), against the same work in plain PyTorch.

Memory bound: ``bytes`` counts the input read once and every buffer row written once (activations,
scales, ids, weights, padding rows included).  The check counts bytes that differ from
:mod:`fp8gemm.reference` (must be 0).
"""
from __future__ import annotations

import math

import torch

from fp8gemm import reference as R
from fp8gemm.bench.core import Case
from fp8gemm.testing import count_bit_mismatches
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


def _pre_dispatch_case(n: int, capacity: int, group_size: int, fp4: bool) -> Case:
    x = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, EXPERTS, (n, TOPK), device="cuda")
    w = torch.rand(n, TOPK, device="cuda")
    bx = torch.empty(capacity, HIDDEN // 2, dtype=torch.uint8, device="cuda") if fp4 else \
        torch.empty(capacity, HIDDEN, dtype=FP8, device="cuda")
    bsf = torch.empty(capacity, HIDDEN // group_size, dtype=torch.uint8, device="cuda")
    bi = torch.empty(capacity, TOPK, dtype=torch.int64, device="cuda")
    bw = torch.empty(capacity, TOPK, device="cuda")
    bufs = (bx, bsf, bi, bw)
    nbytes = x.numel() * 2 + idx.numel() * 8 + w.numel() * 4 + sum(b.numel() * b.element_size() for b in bufs)
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


def cases(quick: bool) -> list[Case]:
    out = [_pre_dispatch_case(TOKENS, 4608, 128, False), _pre_dispatch_case(TOKENS, 4608, 32, True),
           _combine_case(TOKENS)]
    if not quick:
        out += [_pre_dispatch_case(TOKENS, 4608, 32, False), _pre_dispatch_case(128, 256, 128, False),
                _combine_case(128)]
    return out
