"""The semantics of every fp8gemm operation, in plain PyTorch.

This module is the single source of truth: each kernel's docstring points here, every test
compares against these functions, and where a kernel and this module disagree the kernel is wrong.
The references favour clarity over speed: de-quantise, compute in float32 (float64 where noted),
cast once at the end.

Sections: scale factors and quantisation · GEMMs · grouped GEMMs · MQA logits · MoE activations.
"""
from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

# =====================================================================================
# Scale factors and quantisation
# =====================================================================================
# (filled in by the quantisation work: ceil_to_ue8m0, per_token_cast_to_fp8, ...)


# =====================================================================================
# GEMMs: D = C + A @ B.T  (the "NT" form; A is [M, K], B is [N, K])
# =====================================================================================

def expand_scales(sf: torch.Tensor, rows: int, cols: int, gran_rows: int, gran_cols: int) -> torch.Tensor:
    """Broadcast a block-scale tensor ``[ceil(rows/gr), ceil(cols/gc)]`` to one scale per element."""
    sf = sf.float()
    sf = sf.repeat_interleave(gran_rows, dim=-2)[..., :rows, :]
    return sf.repeat_interleave(gran_cols, dim=-1)[..., :cols]


def dequantize(x: torch.Tensor, sf: torch.Tensor, gran_rows: int, gran_cols: int = 128) -> torch.Tensor:
    """FP8 values times their scales (one per ``gran_rows x gran_cols`` block), in float32.

    ``sf`` may be FP32 or packed UE8M0 (int32, four exponent bytes per word along the last dim).
    """
    if sf.dtype == torch.int32:
        sf = unpack_ue8m0_from_int(sf, math.ceil(x.shape[-1] / gran_cols))
    return x.float() * expand_scales(sf, x.shape[-2], x.shape[-1], gran_rows, gran_cols)


def unpack_ue8m0_from_int(packed: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Inverse of ``pack_ue8m0_to_int``: int32 words of four UE8M0 bytes (low byte first) -> FP32 powers of two."""
    b = packed.contiguous().view(torch.uint8).to(torch.int32)   # [..., words * 4], little endian
    b = b[..., :num_cols]
    return torch.pow(2.0, (b - 127).float())


E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def dequantize_fp4(codes: torch.Tensor, scale_bytes: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Packed E2M1 (two codes a byte, low nibble = even column) times UE8M0 scales (``2^(byte - 127)``
    per ``group`` values) -> float32 ``[..., 2 * codes.shape[-1]]``."""
    c = codes.view(torch.uint8).to(torch.int64)
    nib = torch.stack([c & 0xF, c >> 4], dim=-1).flatten(-2)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    vals = table[nib & 7] * torch.where(nib >= 8, -1.0, 1.0)
    scales = torch.pow(2.0, scale_bytes.to(torch.float32) - 127.0).repeat_interleave(group, dim=-1)
    return vals * scales[..., :vals.shape[-1]]


def fp8_gemm_nt(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                c: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                gran_n_b: int = 128, gran_k: int = 128) -> torch.Tensor:
    """``D = C + dequant(A) @ dequant(B).T`` with FP32 accumulation.

    ``a`` [M, K] FP8 with ``sfa`` [M, ceil(K/gran_k)] (one scale per row per ``gran_k`` K-elements);
    ``b`` [N, K] FP8 with ``sfb`` [ceil(N/gran_n_b), ceil(K/gran_k)] (``gran_n_b`` = 128: 128x128 blocks,
    the "1D2D" recipe; 1: per-row, the "1D1D" recipe).  ``c`` (FP32, optional) is added before the cast.
    """
    da = dequantize(a, sfa, 1, gran_k)
    db = dequantize(b, sfb, gran_n_b, gran_k)
    d = da @ db.T
    if c is not None:
        d = d + c.float()
    return d.to(out_dtype)


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``D = C + A @ B.T`` for BF16 A [M, K] and B [N, K], FP32 accumulation."""
    d = a.float() @ b.float().T
    if c is not None:
        d = d + c.float()
    return d.to(out_dtype)


# =====================================================================================
# Grouped GEMMs (mixture of experts)
# =====================================================================================

def m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, d_init: torch.Tensor,
                                     gran_n_b: int = 128) -> torch.Tensor:
    """Contiguous layout: row r of A belongs to expert ``m_indices[r]``; ``b`` is [G, N, K].

    Rows with ``m_indices[r] == -1`` are padding: their output rows are left exactly as they were
    in ``d_init`` (the kernels never write them).  Returns a new tensor.
    """
    d = d_init.clone()
    if a.shape[0] == 0:
        return d
    da = dequantize_fp4(a, sfa) if a.dtype == torch.uint8 else dequantize(a, sfa, 1)
    for g in range(b.shape[0]):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel() == 0:
            continue
        db = dequantize(b[g], sfb[g], gran_n_b)
        d[rows] = (da[rows] @ db.T).to(d.dtype)
    return d


def m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, d_init: torch.Tensor,
                                 gran_n_b: int = 128) -> torch.Tensor:
    """Masked layout: ``a`` [G, max_m, K]; only rows ``[0, masked_m[g])`` of group g are computed.

    Rows at and past ``masked_m[g]`` keep their ``d_init`` values.  ``a`` may be FP4 (uint8 codes with
    uint8 scale bytes, see :func:`dequantize_fp4`).  Returns a new tensor.
    """
    d = d_init.clone()
    for g in range(a.shape[0]):
        m = int(masked_m[g])
        if m == 0:
            continue
        if a.dtype == torch.uint8:
            da = dequantize_fp4(a[g, :m], sfa[g, :m])
        else:
            da = dequantize(a[g, :m], sfa[g, :m], 1)
        db = dequantize(b[g], sfb[g], gran_n_b)
        d[g, :m] = (da @ db.T).to(d.dtype)
    return d


def masked_signal_counts(masked_m, max_m: int, n: int, block_m: int, block_n: int) -> torch.Tensor:
    """What the SBO signal array holds after a masked GEMM with ``enable_overlap=True`` (DESIGN.md §3).

    ``signal[g * ceil(max_m / block_m) + i] == ceil(n / block_n)`` for every m-block i of group g with
    ``i * block_m < masked_m[g]``, and 0 for every other block.
    """
    blocks = math.ceil(max_m / block_m)
    out = torch.zeros(len(masked_m) * blocks, dtype=torch.int32)
    threshold = math.ceil(n / block_n)
    for g, m in enumerate(masked_m.tolist() if torch.is_tensor(masked_m) else masked_m):
        out[g * blocks: g * blocks + math.ceil(m / block_m)] = threshold
    return out


def k_grouped_fp8_gemm_tn_contiguous(a, sfa, b, sfb, ks, c: torch.Tensor | None, num_groups: int,
                                     m: int, n: int, gran_k: int = 128) -> torch.Tensor:
    """K-grouped ("weight gradient") GEMM: ``D[g] = C[g] + dequant(A_g).T @ dequant(B_g)``.

    ``a`` [sum(ks), M] and ``b`` [sum(ks), N] FP8, the K rows of group g at offset ``sum(ks[:g])``;
    ``sfa`` [sum(ks)/gran_k, M] and ``sfb`` [sum(ks)/gran_k, N]: one scale per ``gran_k`` K-rows per column.
    Each ``ks[g]`` is a multiple of ``gran_k``.  ``D`` is FP32 [G, M, N].
    """
    d = torch.zeros(num_groups, m, n, dtype=torch.float32, device=a.device) if c is None else c.float().clone()
    off = 0
    for g, k in enumerate(ks):
        if k == 0:
            continue
        sa = sfa[off // gran_k:(off + k) // gran_k].float().repeat_interleave(gran_k, 0)
        sb = sfb[off // gran_k:(off + k) // gran_k].float().repeat_interleave(gran_k, 0)
        da = a[off:off + k].float() * sa
        db = b[off:off + k].float() * sb
        d[g] += da.T @ db
        off += k
    return d


# =====================================================================================
# MQA logits (DeepSeek-V3.2 lightning indexer)
# =====================================================================================
# (filled in by the MQA-logits work)


# =====================================================================================
# MoE activations (pre-dispatch, FP8 combine payload)
# =====================================================================================
# (filled in by the MoE activation-path work)
