"""Layer 3: the Triton GEMM kernel compiles for sm_90a on this (GPU-less) machine and uses wgmma."""
import re

import pytest

from fp8gemm.testing import compile_sm90_in_subprocess, sass_count

PTRS = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "d_ptr": "*bf16", "c_ptr": "*fp32", "sfa_ptr": "*fp32",
        "sfb_ptr": "*fp32", "m_indices_ptr": "*i32", "masked_m_ptr": "*i32", "signal_ptr": "*i32"}
INTS = ["M", "N", "K", "num_groups", "num_b_groups", "num_progs"] + [
    f"stride_{t}{d}" for t in ("a", "b", "d", "c", "sa", "sb") for d in
    {"a": "gmk", "b": "gnk", "d": "gmn", "c": "gmn", "sa": "gmk", "sb": "gnk"}[t]]


def _signature(**ptr_types):
    sig = {**PTRS, **ptr_types}
    for name in INTS:
        sig[name] = "i32"
    return sig


# What the JIT specialises at run time for contiguous operands: unit strides become constants and
# pointers/leading strides are known multiples of 16 (so loads vectorise).
UNIT_STRIDES = {name: 1 for name in ("stride_ak", "stride_bk", "stride_dn", "stride_cn", "stride_sak")}
DIVISIBLE = ["a_ptr", "b_ptr", "d_ptr", "c_ptr", "sfa_ptr", "sfb_ptr", "M", "N", "K", "stride_am", "stride_bn",
             "stride_dm", "stride_cm", "stride_ag", "stride_bg", "stride_dg", "stride_sbn", "stride_sam"]

BASE = dict(**UNIT_STRIDES, SCALED=True, SFA_PACKED=False, SFB_PACKED=False, SFB_GRAN_N=128, HAS_C=False, SIGNAL=False,
            BLOCK_K=128, GROUP_M=8, GROUPS_POW2=1, UPCAST_DOT=False, A_FP4=False)


@pytest.mark.parametrize("name,extra,warps", [
    ("dense 128x128", dict(MODE=0, SWAP_AB=False, BLOCK_M=128, BLOCK_N=128), 8),
    ("masked FP4 activations 64x128", dict(MODE=2, SWAP_AB=False, BLOCK_M=64, BLOCK_N=128, A_FP4=True,
                                            GROUPS_POW2=8), 4),
    ("masked swap-AB 16x128 + signals", dict(MODE=2, SWAP_AB=True, BLOCK_M=16, BLOCK_N=128, SIGNAL=True,
                                             GROUPS_POW2=32), 4),
])
def test_m_grouped_kernel_sm90(name, extra, warps):
    constexprs = {**BASE, **extra}
    sig = _signature(a_ptr="*u8", sfa_ptr="*u8") if extra.get("A_FP4") else _signature()
    res = compile_sm90_in_subprocess("fp8gemm.kernels.gemm_triton", "m_grouped_gemm_kernel", sig,
                                     constexprs, num_warps=warps, num_stages=3,
                                     divisible_by_16=DIVISIBLE)
    assert sass_count(res["sass"], "QGMMA") > 0, f"{name}: no FP8 wgmma in the SASS"
    assert sass_count(res["sass"], "LDGSTS") > 0, f"{name}: the K loop is not software-pipelined (no cp.async)"
    assert res["local"] == 0 and res["stack"] == 0, f"{name}: local memory used ({res['local']} B)"
    assert 0 < res["regs"] <= 255
    if extra.get("SIGNAL"):
        atomics = re.findall(r"@%p\d+ atom\.global\.gpu\.release\.add", res["ptx"])
        assert len(atomics) == 1, "the signal must be one predicated (single-thread) release atomic add"
        assert "MEMBAR" in res["sass"], "the release atomic lost its fence"
