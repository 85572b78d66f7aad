"""FP4 activations -> the FP8 operand of the grouped GEMMs, in one launch.

Input: E2M1 codes (uint8, two a byte, low nibble = even column) with one UE8M0 scale byte per 32 values,
``[G, M, K/2]`` / ``[G, M, K/32]`` (or 2-D ``[M, *]``), as :func:`fp8gemm.per_token_cast_to_fp4` makes them.
Output: E4M3 ``[G, M, K]`` plus one FP32 scale per row per 128 K-elements (the 1D2D recipe's A side), the
scales MN-major and TMA aligned exactly as :func:`fp8gemm.transform_sf_into_required_layout` lays out
per-row scales on SM90 (strides ``(ceil(K/128) * aligned_m, 1, aligned_m)``, ``aligned_m = ceil(M/4) * 4``).

The rule is the one the Triton GEMM applies in its A-load (``gemm_triton._load_fp4_as_fp8``), so that
"convert, then any FP8 GEMM" and "dequantise inside the Triton GEMM" multiply the same values: per row and
128-K block, ``e_max`` = the largest of its (up to) four scale bytes (a K tail shorter than 128 counts only
its own bytes), the FP32 scale is ``2^max(e_max - 127, -126)``, and each value is
``E2M1 * 2^max(e_chunk - e_max, -126)`` rounded to E4M3 (nearest even).  That is exact while a chunk's scale
is within 2^8 of its block's largest (E4M3 subnormals reach 2^-9); smaller chunks round onto E4M3's
subnormal grid.  :func:`fp4_to_fp8_reference` states the same rule in PyTorch.

Rows the GEMM will not read are not written (their bytes stay whatever the buffers held): masked layout,
rows at and past ``masked_m[g]`` (read on the device; values above M count as M); contiguous layout, rows
whose ``m_indices`` is negative.  No host synchronisation: the launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import runtime
from .gemm_triton import _pow2
from .quant import e4m3_bytes

ROWS_ALL = 0
ROWS_CONTIGUOUS = 1
ROWS_MASKED = 2

_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@triton.jit
def fp4_to_fp8_kernel(codes_ptr, sbytes_ptr, q_ptr, sf_ptr, rows_ptr,
                      M, K, num_groups, num_progs,
                      stride_cg, stride_cm, stride_ck, stride_bg, stride_bm, stride_bk,
                      stride_qg, stride_qm, stride_fg, stride_fm, stride_fk,
                      ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUPS_POW2: tl.constexpr, SOFT: tl.constexpr):
    """Persistent over tiles ``(m-block, group, k-block)`` (k fastest), ``[BLOCK_M, BLOCK_K]`` values each.

    ROWS_MASKED walks only the m-blocks below the largest ``masked_m`` (read here, on the device) and skips
    a group's blocks past its own count, so a decode batch far below M costs no time on the empty tail.
    ``SOFT`` rounds to E4M3 on the bits (the interpreter's conversion does not round to nearest even).
    """
    NB: tl.constexpr = BLOCK_K // 128
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    if ROWS == 2:
        offs_g = tl.arange(0, GROUPS_POW2)
        all_valid = tl.load(rows_ptr + offs_g, mask=offs_g < num_groups, other=0)
        live_m_blocks = tl.minimum(tl.cdiv(tl.maximum(tl.max(all_valid, axis=0), 0), BLOCK_M), num_m_blocks)
    else:
        live_m_blocks = num_m_blocks
    num_tiles = live_m_blocks * num_groups * num_k_tiles
    for tile in range(tl.program_id(0), num_tiles, num_progs):
        pid_m = tile // (num_groups * num_k_tiles)
        group = (tile // num_k_tiles) % num_groups
        pid_k = tile % num_k_tiles
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if ROWS == 2:
            valid_m = tl.minimum(tl.load(rows_ptr + group), M)
            row_ok = offs_m < valid_m
            active = pid_m * BLOCK_M < valid_m
        elif ROWS == 1:
            ids = tl.load(rows_ptr + offs_m, mask=offs_m < M, other=-1)
            row_ok = ids >= 0
            active = tl.max(ids, axis=0) >= 0
        else:
            row_ok = offs_m < M
            active = pid_m * BLOCK_M < M
        if active:
            g64 = group.to(tl.int64)
            rows64 = offs_m.to(tl.int64)
            # Packed codes [BLOCK_M, BLOCK_K / 2] -> one code per value, low nibble first.
            offs_b = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(codes_ptr + g64 * stride_cg + rows64[:, None] * stride_cm + offs_b[None, :] * stride_ck,
                             mask=row_ok[:, None] & (offs_b < K // 2)[None, :], other=0).to(tl.int32)
            codes = tl.reshape(tl.join(packed & 0xF, (packed >> 4) & 0xF), (BLOCK_M, BLOCK_K))
            exp_field = (codes >> 1) & 3
            mant = codes & 1
            # Twice the magnitude is an integer: 0,1 (subnormal), then (2 + m) << (e - 1).
            twice = tl.where(exp_field == 0, mant, (2 + mant) << tl.maximum(exp_field - 1, 0))
            value = tl.where((codes & 8) != 0, -0.5, 0.5) * twice.to(tl.float32)
            # Scale bytes [BLOCK_M, BLOCK_K / 32]; bytes past K read as 0 and so never raise a block's e_max.
            offs_s = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
            exps = tl.load(sbytes_ptr + g64 * stride_bg + rows64[:, None] * stride_bm + offs_s[None, :] * stride_bk,
                           mask=row_ok[:, None] & (offs_s < K // 32)[None, :], other=0).to(tl.int32)
            e_max = tl.max(tl.reshape(exps, (BLOCK_M, NB, 4)), axis=2)                       # [BLOCK_M, NB]
            e_max_c = tl.reshape(tl.broadcast_to(e_max[:, :, None], (BLOCK_M, NB, 4)), (BLOCK_M, BLOCK_K // 32))
            rel = _pow2(exps - e_max_c)
            value = tl.reshape(tl.reshape(value, (BLOCK_M, BLOCK_K // 32, 32)) * rel[:, :, None], (BLOCK_M, BLOCK_K))
            q = e4m3_bytes(value, SOFT)
            offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
            tl.store(q_ptr + g64 * stride_qg + rows64[:, None] * stride_qm + offs_k[None, :], q,
                     mask=row_ok[:, None] & (offs_k < K)[None, :])
            offs_kb = pid_k * NB + tl.arange(0, NB)
            tl.store(sf_ptr + g64 * stride_fg + rows64[:, None] * stride_fm + offs_kb[None, :] * stride_fk,
                     _pow2(e_max - 127), mask=row_ok[:, None] & (offs_kb < tl.cdiv(K, 128))[None, :])


def empty_fp8_operand(codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ``(q E4M3 [..., M, K], sf FP32 [..., M, ceil(K/128)])`` for ``codes`` [..., M, K/2],
    ``sf`` MN-major and TMA aligned (the SM90 layout of per-row scales).  Torch's caching allocator makes
    this cheap per call, and graph-safe when the sizes do not change between captures and replays."""
    *lead, m, _ = codes.shape
    q = torch.empty(*lead, m, k, dtype=torch.float8_e4m3fn, device=codes.device)
    kb = math.ceil(k / 128)
    aligned = math.ceil(m / 4) * 4
    storage = torch.empty(*lead, kb, aligned, dtype=torch.float32, device=codes.device)
    return q, storage.transpose(-1, -2)[..., :m, :]


def convert_config(rows_hint: int, k: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_K, num_warps)``: 16-row tiles for decode-sized groups, 32 otherwise; up to 16K
    values per tile (64 a thread at 8 warps) so the decode's few rows still spread over every SM."""
    block_m = 16 if rows_hint <= 32 else 32
    block_k = max(128, min(triton.next_power_of_2(k), 16384 // block_m))
    warps = 8 if block_m * block_k >= 8192 else 4
    return block_m, block_k, warps


def launch_fp4_to_fp8(codes: torch.Tensor, sbytes: torch.Tensor, q: torch.Tensor, sf: torch.Tensor, *,
                      masked_m: torch.Tensor | None = None, m_indices: torch.Tensor | None = None,
                      rows_hint: int | None = None, config: tuple[int, int, int] | None = None,
                      ctas_per_sm: int = 3) -> None:
    """Fill ``q``/``sf`` (see :func:`empty_fp8_operand`; any strides with unit stride along K for ``q``)
    from ``codes``/``sbytes`` (validated by the caller; 3-D ``[G, M, *]`` or 2-D ``[M, *]``).

    ``masked_m`` (int32 [G]): only rows below it per group; ``m_indices`` (int32 [M], 2-D operands): only
    rows whose id is >= 0; neither: every row.  ``rows_hint``: the typical rows per group (tile choice, and
    with ``masked_m`` the number of programs: enough for twice the hint, at least one per SM; more rows are
    still all converted, by the persistent loop).  ``ctas_per_sm`` caps the programs (3 of 8 warps at ~80
    registers fit an SM at once, so the decode's single wave never queues).
    """
    if masked_m is not None and m_indices is not None:
        raise ValueError("give masked_m or m_indices, not both")
    k = codes.shape[-1] * 2
    g = codes.shape[0] if codes.dim() == 3 else 1
    m = codes.shape[-2]
    if m == 0 or k == 0 or g == 0:
        return
    if rows_hint is None:
        rows_hint = m
    block_m, block_k, warps = config or convert_config(rows_hint, k)
    k_tiles = triton.cdiv(k, block_k)
    num_sms = runtime.get_num_sms()
    cap = num_sms * ctas_per_sm
    if masked_m is not None:
        # Programs past the live tiles only read masked_m and leave: size the grid for the expected rows.
        cap = min(cap, max(num_sms, g * triton.cdiv(2 * rows_hint, block_m) * k_tiles))
    grid = (max(1, min(g * triton.cdiv(m, block_m) * k_tiles, cap)),)
    rows = ROWS_MASKED if masked_m is not None else ROWS_CONTIGUOUS if m_indices is not None else ROWS_ALL
    rows_t = masked_m if masked_m is not None else m_indices if m_indices is not None else codes

    def s3(t):
        s = tuple(t.stride())
        return (0,) * (3 - len(s)) + s
    fp4_to_fp8_kernel[grid](
        codes, sbytes, q.view(torch.uint8), sf, rows_t, m, k, g, grid[0],
        *s3(codes), *s3(sbytes), *s3(q)[:2], *s3(sf),
        ROWS=rows, BLOCK_M=block_m, BLOCK_K=block_k, GROUPS_POW2=triton.next_power_of_2(g),
        SOFT=runtime.interpreting(), num_warps=warps)


def fp4_to_fp8(codes: torch.Tensor, sbytes: torch.Tensor, *, masked_m: torch.Tensor | None = None,
               m_indices: torch.Tensor | None = None, rows_hint: int | None = None):
    """Freshly allocated ``(q, sf)`` converted from FP4 (rows the GEMM skips left uninitialised)."""
    q, sf = empty_fp8_operand(codes, codes.shape[-1] * 2)
    launch_fp4_to_fp8(codes, sbytes, q, sf, masked_m=masked_m, m_indices=m_indices, rows_hint=rows_hint)
    return q, sf


def _pow2_bits(e: torch.Tensor) -> torch.Tensor:
    """2^e (float32, exact) for integer exponents, clamped below at -126 as the kernels do."""
    return ((e.clamp(min=-126) + 127).to(torch.int32) << 23).view(torch.float32)


def fp4_to_fp8_reference(codes: torch.Tensor, sbytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The conversion in PyTorch, every row: ``(q E4M3 [..., K], sf FP32 [..., ceil(K/128)])``, K-major.

    ``dequantize(q, sf)`` equals :func:`fp8gemm.reference.dequantize_fp4` of the input wherever every
    chunk's scale byte is within 8 of its 128-block's largest (and the block's largest is at least 1)."""
    c = codes.view(torch.uint8).to(torch.int64)
    nib = torch.stack([c & 0xF, c >> 4], dim=-1).flatten(-2)
    table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=codes.device)
    vals = table[nib & 7] * torch.where(nib >= 8, -1.0, 1.0)
    k = vals.shape[-1]
    kb = math.ceil(k / 128)
    e = sbytes.to(torch.int64)
    pad = kb * 4 - e.shape[-1]
    e_max = torch.nn.functional.pad(e, (0, pad)).unflatten(-1, (kb, 4)).amax(-1)
    rel = _pow2_bits(e - e_max.repeat_interleave(4, dim=-1)[..., :e.shape[-1]])
    q = (vals * rel.repeat_interleave(32, dim=-1)).to(torch.float8_e4m3fn)
    return q, _pow2_bits(e_max - 127)
