"""Quantisation benchmark cases: the fused cast kernels against the same cast in plain PyTorch.

The casts are memory bound: ``bytes`` counts what a perfect kernel moves (the input read once, codes
and scales written once), so GB/s over the card's copy ceiling is the figure of merit (target >= 80%).
Each fp8gemm implementation writes into preallocated outputs through the kernel launcher (the same
launch the public function makes after validating and allocating).  The check counts output bytes
(codes and scale bits) that differ from :mod:`fp8gemm.reference`; it must be 0.
"""
from __future__ import annotations

import math

import torch

from fp8gemm import reference as R
from fp8gemm.bench.core import Case
from fp8gemm.kernels import quant as KQ

FP8 = torch.float8_e4m3fn


def _mismatches(got: tuple, want: tuple) -> float:
    """Differing bytes of the codes plus differing scales (compared by their bits)."""
    n = 0
    for g, w in zip(got, want):
        gb = g.view(torch.int32) if g.dtype == torch.float32 else g.view(torch.uint8)
        wb = w.view(torch.int32) if w.dtype == torch.float32 else w.view(torch.uint8)
        n += int((gb != wb).sum())
    return float(n)


def _torch_per_token(x: torch.Tensor, gran: int, use_ue8m0: bool):
    """DeepGEMM's PyTorch formulation (K a multiple of ``gran``): several passes over the data."""
    m, k = x.shape
    xv = x.view(m, k // gran, gran).float()
    sf = xv.abs().amax(dim=-1).clamp(min=1e-4) / 448.0
    if use_ue8m0:
        sf = R.ceil_to_ue8m0(sf)
    return (xv * (1.0 / sf).unsqueeze(-1)).to(FP8).view(m, k), sf


def _torch_per_block(x: torch.Tensor, use_ue8m0: bool):
    m, k = x.shape
    xv = x.view(m // 128, 128, k // 128, 128).float()
    sf = xv.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
    if use_ue8m0:
        sf = R.ceil_to_ue8m0(sf)
    return (xv * (1.0 / sf)[:, None, :, None]).to(FP8).view(m, k), sf


def _torch_per_token_fp4(x: torch.Tensor, gran: int):
    m, k = x.shape
    xv = x.view(m, k // gran, gran).float()
    sf = R.ceil_to_ue8m0(xv.abs().amax(dim=-1).clamp(min=1e-4) / 6.0)
    a = (xv * (1.0 / sf).unsqueeze(-1)).abs()
    code = sum((a > t).to(torch.uint8) for t in (0.25, 1.25, 2.5, 5.0)) + \
        sum((a >= t).to(torch.uint8) for t in (0.75, 1.75, 3.5))
    code = code | (((xv < 0) & (code != 0)).to(torch.uint8) << 3)
    code = code.view(m, k)
    return code[:, 0::2] | (code[:, 1::2] << 4), R.to_ue8m0_bytes(sf)


def _per_token_case(m: int, k: int, use_ue8m0: bool) -> Case:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(m, k, device="cuda", dtype=FP8)
    sf = torch.empty(m, math.ceil(k / 128), device="cuda", dtype=torch.float32)
    nbytes = x.numel() * x.element_size() + q.numel() + sf.numel() * 4
    launch = (lambda: KQ.launch_per_token(x, q, sf, 128, use_ue8m0, False))

    def check():
        launch()
        return _mismatches((q, sf), R.per_token_cast_to_fp8(x, use_ue8m0))
    tag = " ue8m0" if use_ue8m0 else ""
    return Case("quant", f"per_token bf16 {m}x{k}{tag}", 0.0, nbytes,
                {"fp8gemm": launch, "torch": lambda: _torch_per_token(x, 128, use_ue8m0)}, check, 0.0)


def _per_block_case(m: int, k: int, use_ue8m0: bool) -> Case:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(m, k, device="cuda", dtype=FP8)
    sf = torch.empty(math.ceil(m / 128), math.ceil(k / 128), device="cuda", dtype=torch.float32)
    nbytes = x.numel() * x.element_size() + q.numel() + sf.numel() * 4
    launch = (lambda: KQ.launch_per_block(x, q, sf, 128, use_ue8m0, False))

    def check():
        launch()
        return _mismatches((q, sf), R.per_block_cast_to_fp8(x, use_ue8m0))
    tag = " ue8m0" if use_ue8m0 else ""
    return Case("quant", f"per_block bf16 {m}x{k}{tag}", 0.0, nbytes,
                {"fp8gemm": launch, "torch": lambda: _torch_per_block(x, use_ue8m0)}, check, 0.0)


def _per_token_fp4_case(m: int, k: int) -> Case:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(m, k // 2, device="cuda", dtype=torch.uint8)
    sf = torch.empty(m, math.ceil(k / 32), device="cuda", dtype=torch.uint8)
    nbytes = x.numel() * x.element_size() + q.numel() + sf.numel()
    launch = (lambda: KQ.launch_per_token_fp4(x, q, sf, 32, True))

    def check():
        launch()
        want = []
        for lo in range(0, m, 512):      # the reference's rounding table is memory hungry: in slices
            want.append(R.per_token_cast_to_fp4(x[lo:lo + 512], ue8m0_bytes=True))
        return _mismatches((q, sf), (torch.cat([w[0] for w in want]), torch.cat([w[1] for w in want])))
    return Case("quant", f"per_token fp4 bf16 {m}x{k}", 0.0, nbytes,
                {"fp8gemm": launch, "torch": lambda: _torch_per_token_fp4(x, 32)}, check, 0.0)


# Alternative launch configurations timed beside the default (non-quick runs), to tune the heuristics.
_SWEEP = {
    "per_token": [(8, 4, 4), (16, 4, 4), (32, 4, 8), (64, 4, 8), (32, 2, 8), (16, 2, 4)],
    "per_block": [(1, 4), (2, 8), (4, 8), (1, 16)],
    "fp4": [(8, 16, 4), (32, 16, 8), (16, 8, 8), (4, 16, 4), (64, 16, 8)],
}


def _with_sweep(case: Case, kind: str, launcher) -> Case:
    for cfg in _SWEEP[kind]:
        case.impls[f"fp8gemm{list(cfg)}"] = (lambda cfg=cfg: launcher(cfg))
    return case


def cases(quick: bool) -> list[Case]:
    out = [_per_token_case(8192, 7168, False), _per_block_case(8192, 7168, False), _per_token_fp4_case(4096, 7168)]
    if not quick:
        x = torch.randn(8192, 7168, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(8192, 7168, device="cuda", dtype=FP8)
        sf_t = torch.empty(8192, 56, device="cuda", dtype=torch.float32)
        sf_b = torch.empty(64, 56, device="cuda", dtype=torch.float32)
        x4 = x[:4096]
        q4 = torch.empty(4096, 3584, device="cuda", dtype=torch.uint8)
        sf4 = torch.empty(4096, 224, device="cuda", dtype=torch.uint8)
        _with_sweep(out[0], "per_token", lambda c: KQ.launch_per_token(x, q, sf_t, 128, False, False, config=c))
        _with_sweep(out[1], "per_block", lambda c: KQ.launch_per_block(x, q, sf_b, 128, False, False, config=c))
        _with_sweep(out[2], "fp4", lambda c: KQ.launch_per_token_fp4(x4, q4, sf4, 32, True, config=c))
    if not quick:
        out += [_per_token_case(8192, 7168, True), _per_block_case(8192, 7168, True),
                _per_token_case(4096, 2048, False), _per_token_case(128, 7168, False),
                _per_token_fp4_case(128, 7168)]
    return out
