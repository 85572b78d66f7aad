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

The kernel never goes through FP32 per value (the conversion is ALU-bound otherwise, ~30 SASS instructions a
value): E2M1 * 2^d has only eight magnitudes per 32-chunk, so it builds their eight E4M3 bytes once per chunk
(hardware conversions, round to nearest even) and turns each int32 word of eight codes into its eight bytes
with ``prmt`` table look-ups (:func:`_fp4_words_to_fp8`), about 7 SASS instructions a value in all on sm_90a.
Codes or outputs that cannot be addressed as aligned words take the value-by-value path (same bytes).

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
def _prmt(a, b, sel, SOFT: tl.constexpr):
    """PTX ``prmt.b32 d, a, b, sel`` (generic mode): byte i of the result is byte ``sel[4i+2:4i]`` of the
    eight bytes ``{b, a}`` (a's bytes are 0-3), or, when ``sel`` bit 4i+3 is set, that byte's top bit
    copied into all eight bits.  One instruction on the GPU; ``SOFT`` spells it out for the interpreter
    (which has no inline assembly)."""
    if SOFT:
        out = tl.zeros_like(sel)
        for i in tl.static_range(4):
            s = (sel >> (4 * i)) & 0xF
            src = tl.where((s & 4) != 0, b, a)
            byte = (src >> ((s & 3) * 8)) & 0xFF
            byte = tl.where((s & 8) != 0, tl.where(byte >= 0x80, 0xFF, 0), byte)
            out = out | (byte << (8 * i))
        return out
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _sign_bytes(sel, SOFT: tl.constexpr):
    """``prmt(0, 0x40404040, sel)`` for selectors whose nibbles all have bits 0-2 set: byte i is 0x40 where
    nibble i is 7 and 0 where it is 15 (the replicated top bit of 0x40).  The constants are immediates."""
    if SOFT:
        return _prmt(tl.zeros_like(sel), tl.full(sel.shape, 0x40404040, tl.int32), sel, SOFT)
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, 0, 0x40404040, $1;", "=r,r", [sel],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _e4m3x4(v0, v1, v2, v3, SOFT: tl.constexpr, V0_ZERO: tl.constexpr = False):
    """Four finite non-negative FP32 values -> their E4M3 bytes (round to nearest even) in one int32 word,
    ``v0`` in the low byte: two paired conversions whose second merges into the first's register.
    ``V0_ZERO``: ``v0`` is 0 (an immediate operand, ``v0`` unused)."""
    if SOFT:
        b0 = 0 if V0_ZERO else e4m3_bytes(v0, True).to(tl.int32)
        return (b0 | (e4m3_bytes(v1, True).to(tl.int32) << 8)
                | (e4m3_bytes(v2, True).to(tl.int32) << 16) | (e4m3_bytes(v3, True).to(tl.int32) << 24))
    elif V0_ZERO:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; cvt.rn.satfinite.e4m3x2.f32 l, $1, 0f00000000; "
            "cvt.rn.satfinite.e4m3x2.f32 h, $3, $2; mov.b32 $0, {l, h}; }",
            "=r,f,f,f", [v1, v2, v3], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; cvt.rn.satfinite.e4m3x2.f32 l, $2, $1; cvt.rn.satfinite.e4m3x2.f32 h, $4, $3; "
            "mov.b32 $0, {l, h}; }", "=r,f,f,f,f", [v0, v1, v2, v3], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _e4m3_table(d, SOFT: tl.constexpr):
    """The E4M3 bytes of ``E2M1[t] * 2^d`` for the eight magnitudes t (``d <= 0``, integer), as the two
    words a ``prmt`` reads: (bytes of t = 0..3, bytes of t = 4..7).  Below 2^-12 every product rounds
    to zero, so ``d`` is clamped at -20 and every value is a normal FP32 number (exact); the conversion
    rounds to nearest even (E4M3 subnormals included), as the reference's does."""
    p = ((tl.maximum(d, -20) + 127) << 23).to(tl.float32, bitcast=True)
    lo = _e4m3x4(p, p * 0.5, p, p * 1.5, SOFT, True)
    hi = _e4m3x4(p * 2.0, p * 3.0, p * 4.0, p * 6.0, SOFT)
    return lo, hi


@triton.jit
def _fp4_words_to_fp8(w, t_lo, t_hi, SOFT: tl.constexpr):
    """Eight E2M1 codes (one int32 word, value 0 in the low nibble) -> their eight E4M3 bytes as two int32
    words (values 0-3, values 4-7), through the per-chunk table ``(t_lo, t_hi)`` of :func:`_e4m3_table`.

    A ``prmt`` whose selector nibbles are the codes' magnitudes (sign bits cleared) looks four of them up
    at once.  The signs take a second ``prmt``: with the selector ``~code | 7`` every nibble picks the byte
    0x40, copied for a negative code and replaced by its top bit (0) for a positive one; shifted left once
    that is the E4M3 sign bit (negative zero included), added to the magnitudes with one ``lea``.  Ten
    instructions for the eight values."""
    mag = w & 0x77777777
    sel = ~w | 0x77777777
    out_lo = _prmt(t_lo, t_hi, mag, SOFT) + (_sign_bytes(sel, SOFT) << 1)
    out_hi = _prmt(t_lo, t_hi, mag >> 16, SOFT) + (_sign_bytes(sel >> 16, SOFT) << 1)
    return out_lo, out_hi


@triton.jit
def _launch_dependents():
    """PTX ``griddepcontrol.launch_dependents``: the kernel launched after this one with programmatic
    dependent launch (``launch_pdl=True``) may be scheduled once every program of this grid has executed it
    (or exited).  That kernel still waits for this grid's completion and memory writes with its own
    ``griddepcontrol.wait``; without a dependent launch this is a no-op.  Not pure, so it is not moved
    or removed."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit(do_not_specialize=["stride_bk", "stride_fm"])
def fp4_to_fp8_kernel(codes_ptr, sbytes_ptr, q_ptr, sf_ptr, rows_ptr,
                      M, K, num_groups, num_progs,
                      stride_cg, stride_cm, stride_ck, stride_bg, stride_bm, stride_bk,
                      stride_qg, stride_qm, stride_fg, stride_fm, stride_fk,
                      ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUPS_POW2: tl.constexpr, SOFT: tl.constexpr, WORDS: tl.constexpr = True,
                      PDL_TRIGGER: tl.constexpr = False):
    """Persistent over tiles ``(m-block, group, k-block)`` (k fastest), ``[BLOCK_M, BLOCK_K]`` values each.

    ROWS_MASKED walks only the m-blocks below the largest ``masked_m`` (read here, on the device) and skips
    a group's blocks past its own count, so a decode batch far below M costs no time on the empty tail.
    ``SOFT`` rounds to E4M3 on the bits (the interpreter's conversion does not round to nearest even) and
    emulates ``prmt``.

    ``WORDS`` (codes and E4M3 bytes 4-byte aligned, unit stride along K, K a multiple of 32): the codes are
    read and the bytes written as int32 words, and each word of eight codes becomes its eight bytes by two
    table look-ups (:func:`_fp4_words_to_fp8`), the table (:func:`_e4m3_table`) built once per 32-chunk.
    Otherwise each value goes through FP32 (the codes' values times the chunk's relative scale, converted).

    ``PDL_TRIGGER`` (GPU only, never with ``SOFT``): the first instruction lets a dependent launch (the Gluon
    GEMM on this operand, ``launch_pdl=True``) be scheduled while this grid runs, see :func:`_launch_dependents`.
    """
    if PDL_TRIGGER:
        _launch_dependents()
    NB: tl.constexpr = BLOCK_K // 128
    NG: tl.constexpr = BLOCK_K // 32
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    if ROWS == 2:
        offs_g = tl.arange(0, GROUPS_POW2)
        all_valid = tl.load(rows_ptr + offs_g, mask=offs_g < num_groups, other=0)
        live_m_blocks = tl.minimum(tl.cdiv(tl.maximum(tl.max(all_valid, axis=0), 0), BLOCK_M), num_m_blocks)
    else:
        live_m_blocks = num_m_blocks
    num_tiles = live_m_blocks * num_groups * num_k_tiles
    # The tile's (m-block, group, k-block) digits, advanced by num_progs with carries instead of three
    # divisions per tile.
    pid = tl.program_id(0)
    rest = pid // num_k_tiles
    pid_k = pid - rest * num_k_tiles
    pid_m = rest // num_groups
    group = rest - pid_m * num_groups
    rest = num_progs // num_k_tiles
    step_k = num_progs - rest * num_k_tiles
    step_m = rest // num_groups
    step_g = rest - step_m * num_groups
    for tile in range(pid, num_tiles, num_progs):
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
            if WORDS:
                # Axes [4 chunks, NB blocks, BLOCK_M rows, 2 halves, 2 words]: word j of half h of chunk c of
                # block b holds values 128b + 32c + 16h + 8j .. + 7.  A thread reads two words (8 bytes) and
                # writes four (16 bytes) at a time.  Triton's coalescing orders axes of equal contiguity by
                # their index, so lanes run over chunks, then blocks, then rows, and the halves are repeats
                # within a thread: with the scale bytes [4, NB, BLOCK_M] laid out alike (the stride along K
                # is not specialised, so they have no contiguous axis either), a thread builds the tables of
                # its own chunks and nothing goes through shared memory.  Bytes past K read as 0 and so never
                # raise a block's e_max.  Offsets within the tile are 32-bit (the launcher checks they fit).
                chunk = (pid_k * NB + tl.arange(0, NB))[None, :] * 4 + tl.arange(0, 4)[:, None]   # [4, NB]
                rows_l = tl.arange(0, BLOCK_M)
                ok = (chunk < K // 32)[:, :, None] & row_ok[None, None, :]                        # [4, NB, BM]
                m0 = (pid_m * BLOCK_M).to(tl.int64)
                s_base = sbytes_ptr + g64 * stride_bg + m0 * stride_bm
                exps = tl.load(s_base + (chunk * stride_bk)[:, :, None] + (rows_l * stride_bm)[None, None, :],
                               mask=ok, other=0).to(tl.int32)
                e_max = tl.max(exps, axis=0)                                                      # [NB, BM]
                t_lo, t_hi = _e4m3_table(exps - e_max[None, :, :], SOFT)
                # Codes and E4M3 bytes addressed as int32 words (row strides in words: multiples of 4 bytes).
                c_words = (codes_ptr + g64 * stride_cg + m0 * stride_cm).to(tl.pointer_type(tl.int32))
                c_off = (chunk * 4)[:, :, None] + (rows_l * (stride_cm // 4))[None, None, :]
                hw = tl.arange(0, 2)[:, None] * 2 + tl.arange(0, 2)[None, :]                     # [2, 2]
                w = tl.load(c_words + c_off[:, :, :, None, None] + hw[None, None, None],
                            mask=ok[:, :, :, None, None], other=0)
                out_lo, out_hi = _fp4_words_to_fp8(w, t_lo[:, :, :, None, None], t_hi[:, :, :, None, None], SOFT)
                out = tl.reshape(tl.join(out_lo, out_hi), (4, NB, BLOCK_M, 2, 4))
                q_words = (q_ptr + g64 * stride_qg + m0 * stride_qm).to(tl.pointer_type(tl.int32))
                q_off = (chunk * 8)[:, :, None] + (rows_l * (stride_qm // 4))[None, None, :]
                hq = tl.arange(0, 2)[:, None] * 4 + tl.arange(0, 4)[None, :]                     # [2, 4]
                tl.store(q_words + q_off[:, :, :, None, None] + hq[None, None, None], out,
                         mask=ok[:, :, :, None, None])
                # The FP32 scales from the same layout (stride along M not specialised either), one chunk's lane
                # of each block writing.
                sf_ptrs = (sf_ptr + g64 * stride_fg + m0 * stride_fm
                           + ((chunk // 4) * stride_fk)[:, :, None] + (rows_l * stride_fm)[None, None, :])
                first = (tl.arange(0, 4) == 0)[:, None, None]
                tl.store(sf_ptrs, tl.broadcast_to(_pow2(e_max[None, :, :] - 127), (4, NB, BLOCK_M)),
                         mask=ok & first)
            else:
                offs_s = pid_k * NG + tl.arange(0, NG)
                exps = tl.load(sbytes_ptr + g64 * stride_bg + rows64[:, None] * stride_bm + offs_s[None, :] * stride_bk,
                               mask=row_ok[:, None] & (offs_s < K // 32)[None, :], other=0).to(tl.int32)
                e_max = tl.max(tl.reshape(exps, (BLOCK_M, NB, 4)), axis=2)                   # [BLOCK_M, NB]
                e_max_c = tl.reshape(tl.broadcast_to(e_max[:, :, None], (BLOCK_M, NB, 4)), (BLOCK_M, NG))
                # Packed codes [BLOCK_M, BLOCK_K / 2] -> one code per value, low nibble first.
                offs_b = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(codes_ptr + g64 * stride_cg + rows64[:, None] * stride_cm
                                 + offs_b[None, :] * stride_ck,
                                 mask=row_ok[:, None] & (offs_b < K // 2)[None, :], other=0).to(tl.int32)
                codes = tl.reshape(tl.join(packed & 0xF, (packed >> 4) & 0xF), (BLOCK_M, BLOCK_K))
                exp_field = (codes >> 1) & 3
                mant = codes & 1
                # Twice the magnitude is an integer: 0,1 (subnormal), then (2 + m) << (e - 1).
                twice = tl.where(exp_field == 0, mant, (2 + mant) << tl.maximum(exp_field - 1, 0))
                value = tl.where((codes & 8) != 0, -0.5, 0.5) * twice.to(tl.float32)
                rel = _pow2(exps - e_max_c)
                value = tl.reshape(tl.reshape(value, (BLOCK_M, NG, 32)) * rel[:, :, None], (BLOCK_M, BLOCK_K))
                q = e4m3_bytes(value, SOFT)
                offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
                tl.store(q_ptr + g64 * stride_qg + rows64[:, None] * stride_qm + offs_k[None, :], q,
                         mask=row_ok[:, None] & (offs_k < K)[None, :])
                offs_kb = pid_k * NB + tl.arange(0, NB)
                tl.store(sf_ptr + g64 * stride_fg + rows64[:, None] * stride_fm + offs_kb[None, :] * stride_fk,
                         _pow2(e_max - 127), mask=row_ok[:, None] & (offs_kb < tl.cdiv(K, 128))[None, :])
        pid_k += step_k
        carry = pid_k >= num_k_tiles
        pid_k = tl.where(carry, pid_k - num_k_tiles, pid_k)
        group += step_g + carry.to(tl.int32)
        carry = group >= num_groups
        group = tl.where(carry, group - num_groups, group)
        pid_m += step_m + carry.to(tl.int32)


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
                      ctas_per_sm: int = 3, pdl_trigger: bool = False) -> None:
    """Fill ``q``/``sf`` (see :func:`empty_fp8_operand`; any strides with unit stride along K for ``q``)
    from ``codes``/``sbytes`` (validated by the caller; 3-D ``[G, M, *]`` or 2-D ``[M, *]``).

    ``masked_m`` (int32 [G]): only rows below it per group; ``m_indices`` (int32 [M], 2-D operands): only
    rows whose id is >= 0; neither: every row.  ``rows_hint``: the typical rows per group (tile choice, and
    with ``masked_m`` the number of programs: enough for twice the hint, at least one per SM; more rows are
    still all converted, by the persistent loop).  ``ctas_per_sm`` caps the programs (3 of 8 warps at ~80
    registers fit an SM at once, so the decode's single wave never queues).
    ``pdl_trigger``: the kernel executes ``griddepcontrol.launch_dependents`` first, so that the next launch on
    the stream, if made with programmatic dependent launch, can start its prologue while this one runs
    (ignored in the interpreter; a no-op for a normal next launch).
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
    q8 = q.view(torch.uint8)
    fp4_to_fp8_kernel[grid](
        codes, sbytes, q8, sf, rows_t, m, k, g, grid[0],
        *s3(codes), *s3(sbytes), *s3(q)[:2], *s3(sf),
        ROWS=rows, BLOCK_M=block_m, BLOCK_K=block_k, GROUPS_POW2=triton.next_power_of_2(g),
        SOFT=runtime.interpreting(), WORDS=_words_fit(codes, sbytes, q8, k, block_m),
        PDL_TRIGGER=bool(pdl_trigger) and not runtime.interpreting(), num_warps=warps)


def _words_fit(codes: torch.Tensor, sbytes: torch.Tensor, q8: torch.Tensor, k: int, block_m: int) -> bool:
    """Whether the kernel's word path applies: codes and E4M3 bytes read and written as 4-byte words (unit
    stride along K, 4-byte aligned starts and strides, K a multiple of 32) and a tile's row offsets within
    32 bits for all three tensors."""
    if k % 32 or codes.stride(-1) != 1 or q8.stride(-1) != 1:
        return False
    for t in (codes, q8):
        if t.data_ptr() % 4 or any(s % 4 for s in t.stride()[:-1]):
            return False
    return all(0 <= t.stride(-2) and t.stride(-2) * block_m < 2 ** 31 for t in (codes, sbytes, q8))


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
