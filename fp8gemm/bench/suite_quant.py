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
from fp8gemm import runtime
from fp8gemm.bench.core import Case
from fp8gemm.kernels import quant as KQ
from fp8gemm.testing import count_bit_mismatches

FP8 = torch.float8_e4m3fn


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


def _fp8_cast_case(kind: str, m: int, k: int, use_ue8m0: bool, sweep: bool = False) -> Case:
    """``kind`` "per_token" (one scale per row per 128) or "per_block" (128x128 blocks)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(m, k, device="cuda", dtype=FP8)
    sf_rows = m if kind == "per_token" else math.ceil(m / 128)
    sf = torch.empty(sf_rows, math.ceil(k / 128), device="cuda", dtype=torch.float32)
    nbytes = x.numel() * x.element_size() + q.numel() + sf.numel() * 4
    launcher = KQ.launch_per_token if kind == "per_token" else KQ.launch_per_block
    reference = R.per_token_cast_to_fp8 if kind == "per_token" else R.per_block_cast_to_fp8
    peer = (lambda: _torch_per_token(x, 128, use_ue8m0)) if kind == "per_token" else \
        (lambda: _torch_per_block(x, use_ue8m0))

    def launch(config=None):
        launcher(x, q, sf, 128, use_ue8m0, runtime.interpreting(), config=config)

    def check():
        launch()
        return float(count_bit_mismatches((q, sf), reference(x, use_ue8m0)))
    tag = " ue8m0" if use_ue8m0 else ""
    case = Case("quant", f"{kind} bf16 {m}x{k}{tag}", 0.0, nbytes, {"fp8gemm": launch, "torch": peer}, check, 0.0)
    return _with_sweep(case, kind, launch) if sweep else case


def _per_token_fp4_case(m: int, k: int, sweep: bool = False) -> Case:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(m, k // 2, device="cuda", dtype=torch.uint8)
    sf = torch.empty(m, math.ceil(k / 32), device="cuda", dtype=torch.uint8)
    nbytes = x.numel() * x.element_size() + q.numel() + sf.numel()

    def launch(config=None):
        KQ.launch_per_token_fp4(x, q, sf, 32, True, config=config)

    def check():
        launch()
        want = []
        for lo in range(0, m, 512):      # the reference's rounding table is memory hungry: in slices
            want.append(R.per_token_cast_to_fp4(x[lo:lo + 512], ue8m0_bytes=True))
        return float(count_bit_mismatches((q, sf), (torch.cat([w[0] for w in want]), torch.cat([w[1] for w in want]))))
    case = Case("quant", f"per_token fp4 bf16 {m}x{k}", 0.0, nbytes,
                {"fp8gemm": launch, "torch": lambda: _torch_per_token_fp4(x, 32)}, check, 0.0)
    return _with_sweep(case, "fp4", launch) if sweep else case


# Alternative launch configurations timed beside the default (non-quick runs), to tune the heuristics.
_SWEEP = {
    "per_token": [(8, 4, 4), (16, 4, 4), (32, 4, 8), (64, 4, 8), (32, 2, 8), (16, 2, 4)],
    "per_block": [(1, 4), (2, 8), (4, 8), (1, 16)],
    "fp4": [(8, 16, 4), (32, 16, 8), (16, 8, 8), (4, 16, 4), (64, 16, 8)],
}


def _with_sweep(case: Case, kind: str, launch) -> Case:
    """Time ``launch(config)`` for each alternative configuration beside the default, on the case's tensors."""
    for cfg in _SWEEP[kind]:
        case.impls[f"fp8gemm{list(cfg)}"] = (lambda cfg=cfg: launch(cfg))
    return case


def cases(quick: bool) -> list[Case]:
    sweep = not quick
    out = [_fp8_cast_case("per_token", 8192, 7168, False, sweep), _fp8_cast_case("per_block", 8192, 7168, False, sweep),
           _per_token_fp4_case(4096, 7168, sweep)]
    if not quick:
        out += [_fp8_cast_case("per_token", 8192, 7168, True), _fp8_cast_case("per_block", 8192, 7168, True),
                _fp8_cast_case("per_token", 4096, 2048, False), _fp8_cast_case("per_token", 128, 7168, False),
                _per_token_fp4_case(128, 7168)]
    return out
