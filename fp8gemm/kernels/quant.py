"""Triton kernels for the FP8 / FP4 casts (semantics: the "Scale factors and quantisation" section
of :mod:`fp8gemm.reference`), their shared device helpers and their launch heuristics.

Every kernel is one pass over the data: a program loads its tile once, reduces the group amaxes
in registers, derives the scales and writes codes and scales.  The kernels are memory bound; the
tile shapes aim at 16-byte loads along K (a whole 128-element group per row slice at least) and
4-16 KiB of input per program so that enough loads are in flight on every SM.

Bit-exactness with the reference rests on three choices (each documented where it is made):
IEEE division (``div_rn``) for ``amax / fmt_max`` and ``1 / sf`` (Triton's ``/`` is an approximate
division on NVIDIA GPUs); NaN-propagating max reductions (done on the FP32 bits as integers, see
``abs_bits``); and a software E4M3 rounding in the interpreter, whose own
fp32->fp8 conversion does not round to nearest even (on the GPU the hardware ``cvt.rn.satfinite``
is used: it rounds to nearest even and agrees with the reference on every value the casts produce).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..runtime import get_num_sms


# -------------------------------------------------------------------------------------
# Device helpers (shared with the MoE pre-dispatch kernel)
# -------------------------------------------------------------------------------------

@triton.jit
def abs_bits(x):
    """|x| in FP32 as int32 bits.  For non-negative floats the integer order is the float order and
    every NaN sorts above inf, so an integer max over these bits is a NaN-propagating amax (tl.max
    on floats drops NaNs, on the GPU and in the interpreter alike) at the cost of a plain max."""
    return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def group_amax(x, axis: tl.constexpr):
    """max |x| along ``axis`` in FP32; a NaN anywhere in the group makes the result NaN."""
    return tl.max(abs_bits(x), axis).to(tl.float32, bitcast=True)


@triton.jit
def scale_from_amax(amax, FMT_MAX: tl.constexpr, USE_UE8M0: tl.constexpr):
    """(sf, 1/sf) from group amaxes: sf = max(amax, 1e-4) / FMT_MAX, optionally rounded up to a power
    of two; NaN scales are written as the canonical 0x7FC00000 so the output bytes do not depend on
    the NaN payload the hardware produces."""
    # `amax < floor` is false for NaN, so the clamp keeps NaN (tl.maximum would drop it on the GPU).
    amax = tl.where(amax < 1e-4, 1e-4, amax)
    sf = tl.math.div_rn(amax, FMT_MAX)
    bits = sf.to(tl.int32, bitcast=True)
    is_nan = sf != sf
    if USE_UE8M0:
        # ceil_to_ue8m0 on the bits: a non-zero mantissa carries into the exponent.  sf >= 0, and
        # NaN is zeroed first so the add cannot overflow.
        bits = (tl.where(is_nan, 0, bits) + 0x7FFFFF) & 0x7F800000
    bits = tl.where(is_nan, 0x7FC00000, bits)
    sf = bits.to(tl.float32, bitcast=True)
    return sf, tl.math.div_rn(1.0, sf)


@triton.jit
def ue8m0_byte(sf):
    """The exponent field of (positive) FP32 scales, as uint8."""
    return ((sf.to(tl.int32, bitcast=True) >> 23) & 0xFF).to(tl.uint8)


@triton.jit
def e4m3_bytes(y, SOFT: tl.constexpr):
    """FP32 -> E4M3 bytes (uint8), round to nearest even, NaN -> 0x7F, finite values saturate at 448.

    ``SOFT`` does the rounding with integer arithmetic on the FP32 bits (needed in the interpreter,
    whose conversion truncates and adds the half bit); otherwise the hardware conversion is used.
    """
    if SOFT:
        bits = y.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = bits & 0x7FFFFFFF
        a = tl.minimum(mag, 0x43E00000)                       # saturate at 448 (NaN is fixed below)
        # Normal range (|y| >= 2^-6): keep 3 mantissa bits, round half to even, re-bias 127 -> 7;
        # a carry out of the mantissa correctly bumps the exponent.
        normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        # Subnormal range: |y| * 2^9 rounded to an integer (0..8); adding 2^23 makes the FP32 adder
        # round half to even at the unit bit.  Both operations are exact apart from that rounding.
        t = a.to(tl.float32, bitcast=True) * 512.0 + 8388608.0
        sub = t.to(tl.int32, bitcast=True) - 0x4B000000
        code = tl.where(a < 0x3C800000, sub, normal) | sign
        code = tl.where(mag > 0x7F800000, 0x7F, code)
        return code.to(tl.uint8)
    else:
        b = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        return tl.where(y != y, 0x7F, b).to(tl.uint8)


@triton.jit
def e2m1_codes(y):
    """FP32 -> E2M1 codes (int32 0..15): nearest of {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even
    code, saturating; sign in bit 3 except for zero; NaN -> 0.

    From 1 on, E2M1 is a float with one mantissa bit, and its code is the (exponent, mantissa bit)
    pair: rounding the FP32 bits of |y| to one mantissa bit (half to even; a carry bumps the exponent)
    and taking ``bits >> 22`` gives ``code + 252``.  Below 1 the values are multiples of 0.5 and the
    code is ``rint(2 |y|)``, one FP32 add of 2^23 (the adder rounds half to even at the unit bit).
    About a dozen instructions an element, where seven threshold comparisons took twenty-five."""
    bits = y.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    normal = tl.minimum(((bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22) - 252, 7)
    t = bits.to(tl.float32, bitcast=True) * 2.0 + 8388608.0
    sub = t.to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(bits < 0x3F800000, sub, normal)
    code = tl.where(bits > 0x7F800000, 0, code)
    return tl.where((y < 0) & (code != 0), code | 8, code)


# -------------------------------------------------------------------------------------
# Kernels
# -------------------------------------------------------------------------------------

@triton.jit
def per_token_cast_kernel(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                          BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr,
                          USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr, SF_BYTES: tl.constexpr = False):
    """E4M3 codes + one FP32 scale per (row, GRAN columns) (with ``SF_BYTES`` its UE8M0 byte instead).
    Program (i, j): rows ``[i*BLOCK_M, (i+1)*BLOCK_M)``, groups ``[j*GROUPS, (j+1)*GROUPS)``; the tile
    is ``[BLOCK_M, GROUPS, GRAN]`` so each group reduces along the last (contiguous) axis.
    ``q_ptr`` is the output viewed as uint8 (unit column stride)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * GRAN + tl.arange(0, GRAN)[None, :]                # [GROUPS, GRAN]
    rows64 = rows.to(tl.int64)[:, None, None]
    mask = (rows[:, None, None] < M) & (cols[None, :, :] < K)
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :, :] * stride_xk, mask=mask, other=0.0)
    sf, inv = scale_from_amax(group_amax(x, 2), 448.0, USE_UE8M0)             # [BLOCK_M, GROUPS]
    q = e4m3_bytes(x.to(tl.float32) * inv[:, :, None], SOFT_CVT)
    tl.store(q_ptr + rows64 * stride_qm + cols[None, :, :], q, mask=mask)
    sf_mask = (rows[:, None] < M) & (groups[None, :] < tl.cdiv(K, GRAN))
    sf_offs = rows.to(tl.int64)[:, None] * stride_sm + groups[None, :]
    if SF_BYTES:
        tl.store(sf_ptr + sf_offs, ue8m0_byte(sf), mask=sf_mask)
    else:
        tl.store(sf_ptr + sf_offs, sf, mask=sf_mask)


@triton.jit
def per_block_cast_kernel(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                          BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr,
                          USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr):
    """E4M3 codes + one FP32 scale per (BLOCK_M rows x GRAN columns) block (BLOCK_M = 128): the
    per-token tile with the amax reduced over the rows as well."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * GRAN + tl.arange(0, GRAN)[None, :]
    rows64 = rows.to(tl.int64)[:, None, None]
    mask = (rows[:, None, None] < M) & (cols[None, :, :] < K)
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :, :] * stride_xk, mask=mask, other=0.0)
    amax = tl.max(tl.max(abs_bits(x), 2), 0).to(tl.float32, bitcast=True)   # [GROUPS]
    sf, inv = scale_from_amax(amax, 448.0, USE_UE8M0)
    q = e4m3_bytes(x.to(tl.float32) * inv[None, :, None], SOFT_CVT)
    tl.store(q_ptr + rows64 * stride_qm + cols[None, :, :], q, mask=mask)
    tl.store(sf_ptr + pid_m.to(tl.int64) * stride_sm + groups, sf, mask=groups < tl.cdiv(K, GRAN))


@triton.jit
def _block_tile_ptrs(x_ptr, tile, tiles_g, M, K, stride_xm, stride_xk,
                     BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr):
    """(row block, groups, cols, mask, input pointers) of tile number ``tile`` (row-block major)."""
    pid_m = tile // tiles_g
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = (tile % tiles_g) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * GRAN + tl.arange(0, GRAN)[None, :]
    mask = (rows[:, None, None] < M) & (cols[None, :, :] < K)
    ptrs = x_ptr + rows.to(tl.int64)[:, None, None] * stride_xm + cols[None, :, :] * stride_xk
    return pid_m, rows, groups, cols, mask, ptrs


@triton.jit
def per_block_cast_persistent_kernel(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                                     BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr,
                                     USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr):
    """:func:`per_block_cast_kernel` on a persistent grid that loads its next tile before it reduces,
    scales and stores the current one.  A 128-row block's amax needs every row before the first code can
    be written, so a one-tile program leaves the memory system idle while it reduces and stores; holding
    the next tile's loads in flight meanwhile keeps the HBM queue full at the cost of a second register
    tile."""
    tiles_g = tl.cdiv(tl.cdiv(K, GRAN), GROUPS)
    total = tl.cdiv(M, BLOCK_M) * tiles_g
    step = tl.num_programs(0)
    tile = tl.program_id(0)
    f_pid, f_rows, f_groups, f_cols, mask, ptrs = _block_tile_ptrs(x_ptr, tile, tiles_g, M, K, stride_xm, stride_xk, BLOCK_M, GROUPS, GRAN)
    x = tl.load(ptrs, mask=mask & (tile < total), other=0.0)
    for tile in range(tl.program_id(0), total, step):
        n_pid, n_rows, n_groups, n_cols, nmask, nptrs = _block_tile_ptrs(x_ptr, tile + step, tiles_g, M, K, stride_xm, stride_xk,
                                                    BLOCK_M, GROUPS, GRAN)
        x_next = tl.load(nptrs, mask=nmask & (tile + step < total), other=0.0)
        pid_m, rows, groups, cols, mask, c_ptrs = _block_tile_ptrs(x_ptr, tile, tiles_g, M, K, stride_xm, stride_xk,
                                                              BLOCK_M, GROUPS, GRAN)
        amax = tl.max(tl.max(abs_bits(x), 2), 0).to(tl.float32, bitcast=True)   # [GROUPS]
        sf, inv = scale_from_amax(amax, 448.0, USE_UE8M0)
        q = e4m3_bytes(x.to(tl.float32) * inv[None, :, None], SOFT_CVT)
        tl.store(q_ptr + rows.to(tl.int64)[:, None, None] * stride_qm + cols[None, :, :], q, mask=mask)
        tl.store(sf_ptr + pid_m.to(tl.int64) * stride_sm + groups, sf, mask=groups < tl.cdiv(K, GRAN))
        x = x_next


@triton.jit
def per_token_cast_persistent_kernel(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                                     BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr,
                                     USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr, SF_BYTES: tl.constexpr = False):
    """:func:`per_token_cast_kernel` on a persistent grid with the next tile's loads in flight (see
    :func:`per_block_cast_persistent_kernel`)."""
    tiles_g = tl.cdiv(tl.cdiv(K, GRAN), GROUPS)
    total = tl.cdiv(M, BLOCK_M) * tiles_g
    step = tl.num_programs(0)
    tile = tl.program_id(0)
    f_pid, f_rows, f_groups, f_cols, mask, ptrs = _block_tile_ptrs(x_ptr, tile, tiles_g, M, K, stride_xm, stride_xk, BLOCK_M, GROUPS, GRAN)
    x = tl.load(ptrs, mask=mask & (tile < total), other=0.0)
    for tile in range(tl.program_id(0), total, step):
        n_pid, n_rows, n_groups, n_cols, nmask, nptrs = _block_tile_ptrs(x_ptr, tile + step, tiles_g, M, K, stride_xm, stride_xk,
                                                    BLOCK_M, GROUPS, GRAN)
        x_next = tl.load(nptrs, mask=nmask & (tile + step < total), other=0.0)
        pid_m, rows, groups, cols, mask, c_ptrs = _block_tile_ptrs(x_ptr, tile, tiles_g, M, K, stride_xm, stride_xk,
                                                          BLOCK_M, GROUPS, GRAN)
        sf, inv = scale_from_amax(group_amax(x, 2), 448.0, USE_UE8M0)          # [BLOCK_M, GROUPS]
        q = e4m3_bytes(x.to(tl.float32) * inv[:, :, None], SOFT_CVT)
        rows64 = rows.to(tl.int64)
        tl.store(q_ptr + rows64[:, None, None] * stride_qm + cols[None, :, :], q, mask=mask)
        sf_mask = (rows[:, None] < M) & (groups[None, :] < tl.cdiv(K, GRAN))
        sf_offs = rows64[:, None] * stride_sm + groups[None, :]
        if SF_BYTES:
            tl.store(sf_ptr + sf_offs, ue8m0_byte(sf), mask=sf_mask)
        else:
            tl.store(sf_ptr + sf_offs, sf, mask=sf_mask)
        x = x_next


@triton.jit
def per_channel_cast_kernel(x_ptr, q_ptr, sf_ptr, M, N, stride_xm, stride_xn, stride_qm, stride_sm,
                            GRAN: tl.constexpr, BLOCK_N: tl.constexpr,
                            USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr):
    """E4M3 codes + one FP32 scale per (GRAN rows, column): a [GRAN, BLOCK_N] tile reduced over its rows."""
    pid_m = tl.program_id(0)
    rows = pid_m * GRAN + tl.arange(0, GRAN)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)[:, None]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    sf, inv = scale_from_amax(group_amax(x, 0), 448.0, USE_UE8M0)              # [BLOCK_N]
    q = e4m3_bytes(x.to(tl.float32) * inv[None, :], SOFT_CVT)
    tl.store(q_ptr + rows64 * stride_qm + cols[None, :], q, mask=mask)
    tl.store(sf_ptr + pid_m.to(tl.int64) * stride_sm + cols, sf, mask=cols < N)


@triton.jit
def per_token_cast_fp4_kernel(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                              BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr,
                              USE_UE8M0: tl.constexpr, SF_BYTES: tl.constexpr):
    """Packed E2M1 codes (low nibble = even column) + one scale per (row, GRAN columns), FP32 or,
    with ``SF_BYTES``, its UE8M0 byte.  The per-token tile ``[BLOCK_M, GROUPS, GRAN]``; the codes are
    then split into even and odd columns (a register-local reshape) and packed two a byte."""
    HALF: tl.constexpr = GRAN // 2
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * GRAN + tl.arange(0, GRAN)[None, :]                # [GROUPS, GRAN]
    rows64 = rows.to(tl.int64)
    mask = (rows[:, None, None] < M) & (cols[None, :, :] < K)
    x = tl.load(x_ptr + rows64[:, None, None] * stride_xm + cols[None, :, :] * stride_xk, mask=mask, other=0.0)
    sf, inv = scale_from_amax(group_amax(x, 2), 6.0, USE_UE8M0)               # [BLOCK_M, GROUPS]
    codes = e2m1_codes(x.to(tl.float32) * inv[:, :, None])
    even, odd = tl.split(tl.reshape(codes, [BLOCK_M, GROUPS, HALF, 2]))
    packed = (even | (odd << 4)).to(tl.uint8)
    # K is even, so byte j of a row is in range exactly when j < K / 2 (compared against K / 2
    # itself, not 2j < K, so the compiler can see the mask is constant over 16-byte stores).
    pairs = groups[:, None] * HALF + tl.arange(0, HALF)[None, :]               # [GROUPS, HALF]
    byte_mask = (rows[:, None, None] < M) & (pairs[None, :, :] < K // 2)
    tl.store(q_ptr + rows64[:, None, None] * stride_qm + pairs[None, :, :], packed, mask=byte_mask)
    sf_mask = (rows[:, None] < M) & (groups[None, :] < tl.cdiv(K, GRAN))
    sf_offs = rows64[:, None] * stride_sm + groups[None, :]
    if SF_BYTES:
        tl.store(sf_ptr + sf_offs, ue8m0_byte(sf), mask=sf_mask)
    else:
        tl.store(sf_ptr + sf_offs, sf, mask=sf_mask)


# -------------------------------------------------------------------------------------
# Launch heuristics and launchers (arguments are validated by fp8gemm.quant)
# -------------------------------------------------------------------------------------

def _pow2_at_most(n: int, cap: int) -> int:
    """The smallest power of two >= n, capped at cap (n >= 1)."""
    return min(triton.next_power_of_2(max(n, 1)), cap)


def row_group_config(m: int, k: int, gran: int, elem_bytes: int, fp4: bool = False):
    """(BLOCK_M, GROUPS, num_warps) for the per-(row, group) kernels: up to 512 columns per row slice
    (4 groups of 128, or 16 of 32) and about 16 KiB of input per program (8 KiB for the FP4 casts, whose
    rounding is ALU-heavy: smaller programs let more of them share an SM and hide each other's math).
    Up to 8192 values a program run on 4 warps: measured on an H100 (RESULTS.md, session 2) 4 warps beat
    8 by 2% on the FP8 pre-dispatch and 6–7% on the FP4 cast and pre-dispatch, and tie on the FP8 cast."""
    target_bytes = 8192 if fp4 else 16384
    groups = _pow2_at_most(-(-k // gran), max(1, 512 // gran))
    block_m = _pow2_at_most(m, max(1, target_bytes // (elem_bytes * groups * gran)))
    elems = block_m * groups * gran
    num_warps = 8 if elems > 8192 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return block_m, groups, num_warps


def _persistent_grid(tiles: int, ctas_per_sm: int) -> int:
    return max(1, min(tiles, get_num_sms() * ctas_per_sm))


def launch_per_token(x, q, sf, gran: int, use_ue8m0: bool, soft: bool, config=None) -> None:
    """``sf`` FP32 scales, or uint8 for UE8M0 bytes (then ``use_ue8m0`` must be set).  ``config`` is
    ``(BLOCK_M, GROUPS, num_warps)``, or with a fourth entry ``ctas_per_sm`` > 0 the persistent
    next-tile-prefetch kernel on ``ctas_per_sm * num_sms`` programs."""
    m, k = x.shape
    block_m, groups, warps, *rest = config or row_group_config(m, k, gran, x.element_size())
    ctas_per_sm = rest[0] if rest else 0
    tiles = (triton.cdiv(m, block_m), triton.cdiv(triton.cdiv(k, gran), groups))
    args = (x, q.view(torch.uint8), sf, m, k, x.stride(0), x.stride(1), q.stride(0), sf.stride(0))
    meta = dict(BLOCK_M=block_m, GROUPS=groups, GRAN=gran, USE_UE8M0=use_ue8m0, SOFT_CVT=soft,
                SF_BYTES=sf.dtype == torch.uint8, num_warps=warps)
    if ctas_per_sm:
        per_token_cast_persistent_kernel[(_persistent_grid(tiles[0] * tiles[1], ctas_per_sm),)](*args, **meta)
    else:
        per_token_cast_kernel[tiles](*args, **meta)


def launch_per_block(x, q, sf, gran: int, use_ue8m0: bool, soft: bool, config=None) -> None:
    """``config`` is ``(GROUPS, num_warps)`` or ``(GROUPS, num_warps, ctas_per_sm)`` (persistent kernel
    with the next tile in flight when ``ctas_per_sm`` > 0)."""
    m, k = x.shape
    block_m = 128
    groups, warps, *rest = config or (_pow2_at_most(-(-k // gran), max(1, 128 // gran)), 8)
    ctas_per_sm = rest[0] if rest else 0
    tiles = (triton.cdiv(m, block_m), triton.cdiv(triton.cdiv(k, gran), groups))
    args = (x, q.view(torch.uint8), sf, m, k, x.stride(0), x.stride(1), q.stride(0), sf.stride(0))
    meta = dict(BLOCK_M=block_m, GROUPS=groups, GRAN=gran, USE_UE8M0=use_ue8m0, SOFT_CVT=soft, num_warps=warps)
    if ctas_per_sm:
        per_block_cast_persistent_kernel[(_persistent_grid(tiles[0] * tiles[1], ctas_per_sm),)](*args, **meta)
    else:
        per_block_cast_kernel[tiles](*args, **meta)


def launch_per_channel(x, q, sf, gran: int, use_ue8m0: bool, soft: bool, config=None) -> None:
    m, n = x.shape
    block_n, warps = config or (_pow2_at_most(n, max(16, 16384 // (x.element_size() * gran))), 8)
    grid = (triton.cdiv(m, gran), triton.cdiv(n, block_n))
    per_channel_cast_kernel[grid](x, q.view(torch.uint8), sf, m, n, x.stride(0), x.stride(1), q.stride(0),
                                  sf.stride(0), GRAN=gran, BLOCK_N=block_n, USE_UE8M0=use_ue8m0, SOFT_CVT=soft,
                                  num_warps=warps)


def launch_per_token_fp4(x, q, sf, gran: int, use_ue8m0: bool, config=None) -> None:
    m, k = x.shape
    block_m, groups, warps = config or row_group_config(m, k, gran, x.element_size(), fp4=True)
    grid = (triton.cdiv(m, block_m), triton.cdiv(triton.cdiv(k, gran), groups))
    sf_bytes = sf.dtype == torch.uint8
    per_token_cast_fp4_kernel[grid](x, q, sf, m, k, x.stride(0), x.stride(1), q.stride(0), sf.stride(0),
                                    BLOCK_M=block_m, GROUPS=groups, GRAN=gran, USE_UE8M0=use_ue8m0,
                                    SF_BYTES=sf_bytes, num_warps=warps)
