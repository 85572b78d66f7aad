"""SwiGLU fused with the FP8 per-token re-quantisation of its output, for the masked MoE layout.

Input: the L1 GEMM output ``h`` BF16 ``[G, max_m, 2 * I]`` (gate in columns ``[0, I)``, up in
``[I, 2 I)``) and the per-group valid-row count ``masked_m``.  Output: E4M3 codes ``[G, max_m, I]``
and FP32 scales ``[G, max_m, ceil(I / 128)]`` of ``silu(gate) * up`` computed in FP32, quantised
exactly as :func:`fp8gemm.reference.per_token_cast_to_fp8` does (one scale per row per 128 columns).  The
scales may be any strided view: the MoE layer gives an MN-major one (rows contiguous), the layout in which the
next GEMM takes them through shared memory (``gemm_gluon.sa_smem_pays``).
Only rows ``< masked_m[g]`` are read and written; every other row is left untouched.

Semantics: :func:`fp8gemm.reference.swiglu_quant_reference`.  The GPU's ``exp`` is an
approximation (ex2.approx), so a code may differ from the reference by one step in rare cases.

Launch shape: a fixed grid ``(G, SPLIT)`` (CUDA-graph friendly: it does not depend on the counts);
program ``(g, s)`` walks rows ``s*ROWS, s*ROWS + SPLIT*ROWS, ...`` below ``masked_m[g]``, so skewed
routing (one expert with every token) is still spread over ``SPLIT`` programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import e4m3_bytes, group_amax, scale_from_amax


@triton.jit
def swiglu_quant_kernel(h_ptr, q_ptr, sf_ptr, masked_m_ptr, max_m,
                        stride_hg, stride_hm, stride_qg, stride_qm, stride_sg, stride_sm, stride_sc,
                        INTER: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
                        USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr):
    g = tl.program_id(0)
    s = tl.program_id(1)
    m = tl.minimum(tl.load(masked_m_ptr + g), max_m)
    NGROUPS: tl.constexpr = (INTER + 127) // 128
    h_base = h_ptr + g.to(tl.int64) * stride_hg
    q_base = q_ptr + g.to(tl.int64) * stride_qg
    s_base = sf_ptr + g.to(tl.int64) * stride_sg
    cols = tl.arange(0, 128)
    for r0 in range(s * ROWS, m, SPLIT * ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < m
        rows64 = rows.to(tl.int64)
        for j in tl.static_range(NGROUPS):
            c = j * 128 + cols
            mask = rmask[:, None] & (c[None, :] < INTER)
            hp = h_base + rows64[:, None] * stride_hm + c[None, :]
            gate = tl.load(hp, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(hp + INTER, mask=mask, other=0.0).to(tl.float32)
            act = gate / (1.0 + tl.exp(-gate)) * up
            act = tl.where(mask, act, 0.0)
            sf, inv = scale_from_amax(group_amax(act, 1), 448.0, USE_UE8M0)     # [ROWS]
            q = e4m3_bytes(act * inv[:, None], SOFT_CVT)
            tl.store(q_base + rows64[:, None] * stride_qm + c[None, :], q, mask=mask)
            tl.store(s_base + rows64 * stride_sm + j * stride_sc, sf, mask=rmask)


def launch_swiglu_quant(h, q, sf, masked_m, use_ue8m0: bool, soft: bool, num_sms: int) -> None:
    """``h`` [G, max_m, 2I] BF16, ``q`` [G, max_m, I] (viewed as uint8), ``sf`` [G, max_m, ceil(I/128)] FP32
    (any strides: row-major, or MN-major as the MoE layer allocates it)."""
    g, max_m, two_i = h.shape
    if g == 0 or max_m == 0:
        return
    rows = 4
    split = max(1, min(triton.cdiv(max_m, rows), triton.cdiv(4 * num_sms, g)))
    swiglu_quant_kernel[(g, split)](
        h, q.view(torch.uint8), sf, masked_m, max_m,
        h.stride(0), h.stride(1), q.stride(0), q.stride(1), sf.stride(0), sf.stride(1), sf.stride(2),
        INTER=two_i // 2, ROWS=rows, SPLIT=split, USE_UE8M0=use_ue8m0, SOFT_CVT=soft, num_warps=4)
