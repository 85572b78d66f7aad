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
The UE8M0 FP4 cast needs no division at all: its power-of-two scale comes from the amax bits
(``e2m1_scale_ue8m0``, equal to the rounded division's result) and the 1/sf scaling is exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..runtime import backend, get_num_sms, interpreting, store_evict, stream_evict

# L2 eviction priority of the casts' input loads (each element is read once).  Measured on an H100 (RESULTS.md,
# session 4, same card and flush, A/B in one call): evict-first on the input makes the per-channel cast, the
# FP4 cast and the FP4 pre-dispatch 1-3% faster, and the row-group FP8 casts (per-token, per-block, FP8
# pre-dispatch) 0-1.5% slower, so each gets the faster one.  FP8GEMM_STREAM_EVICT ("" or "evict_first") sets
# both, for A/B runs.
_EVICT_ENV = stream_evict()
STREAM_EVICT = tl.constexpr("evict_first" if _EVICT_ENV is None else _EVICT_ENV)    # per-channel, FP4 tiles
ROWS_EVICT = tl.constexpr("" if _EVICT_ENV is None else _EVICT_ENV)                 # FP8 row-group tiles
# L2 policy of the FP8 pre-dispatch's code stores, for A/B runs only (benchmarks/evict_ab.py):
# FP8GEMM_STORE_EVICT "" (plain stores, the default), "evict_first", or a PTX cache modifier such as ".cs".
# Measured on an H100 (RESULTS.md, session 6, write flush, interleaved rounds in two calls): every setting
# within 0.0-0.3 us of 38, so the default stays plain.
_STORE_ENV = store_evict()
PRE_STORE_EVICT = tl.constexpr("" if _STORE_ENV.startswith(".") else _STORE_ENV)
PRE_STORE_CACHE = tl.constexpr(_STORE_ENV if _STORE_ENV.startswith(".") else "")


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
def scale_from_amax(amax, FMT_MAX: tl.constexpr, USE_UE8M0: tl.constexpr, HW_DIV: tl.constexpr = False):
    """(sf, 1/sf) from group amaxes: sf = max(amax, 1e-4) / FMT_MAX, optionally rounded up to a power
    of two; NaN scales are written as the canonical 0x7FC00000 so the output bytes do not depend on
    the NaN payload the hardware produces.

    ``HW_DIV`` (GPU only, FMT_MAX 448 or 6): the same correctly rounded results in fewer instructions,
    for kernels where every thread derives many scales (the per-channel cast: a column's scale is
    recomputed by every thread holding a piece of the column).  ``amax / FMT_MAX`` is
    ``q0 = amax * RN(1/FMT_MAX)`` corrected by one FMA residual step, which equals IEEE division for every
    finite amax >= 1e-4 — checked exhaustively over all such FP32 values for 448 and 6 (not a general
    property of the method: small subnormal quotients do differ), with inf handled apart; and
    ``1 / sf`` is PTX ``rcp.rn.f32`` (IEEE round to nearest).  Off: ``div_rn`` (also what the
    interpreter needs: its ``fma`` rounds twice and it has no inline assembly)."""
    # `amax < floor` is false for NaN, so the clamp keeps NaN (tl.maximum would drop it on the GPU).
    amax = tl.where(amax < 1e-4, 1e-4, amax)
    if HW_DIV:
        tl.static_assert((FMT_MAX == 448.0) or (FMT_MAX == 6.0), "HW_DIV is verified for 448 and 6 only")
        # 1/448 and 1/6 have repeating binary expansions, so rounding the double constant to FP32 equals
        # rounding the exact quotient (no tie in between).
        q0 = amax * (1.0 / FMT_MAX)
        r = tl.fma(-q0, FMT_MAX, amax)
        sf = tl.fma(r, 1.0 / FMT_MAX, q0)
        sf = tl.where(amax == float("inf"), amax, sf)          # inf - inf in the residual would give NaN
    else:
        sf = tl.math.div_rn(amax, FMT_MAX)
    bits = sf.to(tl.int32, bitcast=True)
    is_nan = sf != sf
    if USE_UE8M0:
        # ceil_to_ue8m0 on the bits: a non-zero mantissa carries into the exponent.  sf >= 0, and
        # NaN is zeroed first so the add cannot overflow.
        bits = (tl.where(is_nan, 0, bits) + 0x7FFFFF) & 0x7F800000
    bits = tl.where(is_nan, 0x7FC00000, bits)
    sf = bits.to(tl.float32, bitcast=True)
    if HW_DIV:
        inv = tl.inline_asm_elementwise("rcp.rn.f32 $0, $1;", "=r,r", [sf], dtype=tl.float32, is_pure=True,
                                        pack=1)
    else:
        inv = tl.math.div_rn(1.0, sf)
    return sf, inv


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

    The E2M1 grid is uniform within three ranges: steps of 0.5 below 2, of 1 in [2, 4), of 2 from 4
    on, and there the code is ``rint(|y| * 2^(1-j)) + 2j`` with ``j = clamp(exponent(y), 0, 2)``
    (round half to even: the tie goes to the even integer, which is the even code).  One FMA does it:
    ``|y| * 2^(1-j)`` is exact and adding ``2^23 + 2j`` makes the FP32 adder round at the unit bit, so
    the low bits of the sum are the code.  A negative ``y`` below -0.25 (a non-zero code) is an
    unsigned comparison of the bits.  About twelve SASS instructions an element."""
    bits = y.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    j = tl.minimum(tl.maximum((a >> 23) - 127, 0), 2)
    t = tl.fma(a.to(tl.float32, bitcast=True), ((128 - j) << 23).to(tl.float32, bitcast=True),
               (0x4B000000 + 2 * j).to(tl.float32, bitcast=True))
    code = tl.minimum(t.to(tl.int32, bitcast=True) - 0x4B000000, 7)
    code += tl.where(bits.to(tl.uint32, bitcast=True) > 0xBE800000, 8, 0)        # y < -0.25 (or NaN)
    return tl.where(a > 0x7F800000, 0, code)


@triton.jit
def e2m1_scale_ue8m0(amax_bits):
    """The UE8M0 scale of E2M1 groups from their NaN-propagating amax bits (``tl.max`` of
    :func:`abs_bits`), without a division: ``(sf bits, s, special)``, ``sf = 2^s``.

    Equal to :func:`scale_from_amax` ``(amax, 6.0, True)``: ``ceil_to_ue8m0(max(amax, 1e-4) / 6)`` is the
    smallest ``2^s >= amax / 6`` even with the division rounded (``amax <= 6 * 2^s`` exactly when the
    rounded quotient is at most ``2^s``: the next float above ``6 * 2^s`` is 2/3 of an ulp of the
    quotient away), i.e. ``s = E - 2`` for ``amax = 1.m * 2^E`` with ``m <= 0.5``, else ``E - 1``.
    ``special``: an inf (scale inf) or NaN (scale the canonical NaN) amax; every code of such a group
    is 0 (its values times ``1 / sf`` are 0 or NaN)."""
    ab = tl.maximum(amax_bits, 0x38D1B717)                                     # max(amax, 1e-4)
    special = ab >= 0x7F800000
    sf_bits = ((ab + 0x3FFFFF) & 0x7F800000) - 0x01000000
    sf_bits = tl.where(special, tl.where(ab == 0x7F800000, 0x7F800000, 0x7FC00000), sf_bits)
    return sf_bits, (sf_bits >> 23) - 127, special


@triton.jit
def e2m1_code_bits_ue8m0(xb, a, s, BF16: tl.constexpr = False, SOFT: tl.constexpr = True):
    """E2M1 codes of ``x / 2^s`` (``x`` FP32 given as bits ``xb`` and ``a = xb & 0x7FFFFFFF``; ``s`` from
    :func:`e2m1_scale_ue8m0`, broadcast to ``x``), as int32 whose low nibble is the code (bits 4-22 are 0,
    the high bits are not: mask or truncate).  Same codes as :func:`e2m1_codes` of ``x * (1 / 2^s)`` in
    groups where ``|x| <= 6 * 2^s`` (so no saturation) and not ``special`` (those give garbage: the caller
    zeroes them).  The scaling folds into the FMA's power-of-two multiplier ``2^(1-j-s)``.

    ``BF16``: ``x`` came from BF16, so only the top 16 bits of ``xb`` matter for the sign test (the low
    half may hold anything, e.g. the other value of a 32-bit pair).  ``SOFT`` (the interpreter) spells
    out the two steps the GPU path writes in PTX so that ptxas keeps them one instruction each (a
    multiply-add that LLVM would otherwise turn into a shift and an or, and a predicated add that it
    would turn into an add and a select).  About nine instructions a value."""
    j = tl.maximum(a - ((s + 127) << 23), 0) >> 23                             # clamp(exponent(y), 0, 2)
    if SOFT:
        mult = ((128 - s) << 23) - (j << 23)                                   # 2^(1-j-s)
        addend = 0x4B000000 + 2 * j                                            # 2^23 + 2j
    else:
        mult, addend = tl.inline_asm_elementwise(
            "mad.lo.s32 $0, $2, -8388608, $3; mad.lo.s32 $1, $2, 2, 1258291200;", "=r,=r,r,r",
            [j, (128 - s) << 23], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    t = tl.fma(a.to(tl.float32, bitcast=True), mult.to(tl.float32, bitcast=True),
               addend.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
    # y < -0.25 <=> x < -0.25 * 2^s: the unsigned bits of x above those of -2^(s-2)
    thr = ((s + 125) << 23) | (-0x7FFF0001 if BF16 else -0x80000000)          # | 0x8000FFFF or 0x80000000
    if SOFT:
        return t + tl.where(xb.to(tl.uint32, bitcast=True) > thr.to(tl.uint32, bitcast=True), 8, 0)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.hi.u32 p, $2, $3; mov.b32 $0, $1; @p add.s32 $0, $1, 8; }", "=r,r,r,r",
            [t, xb, thr], dtype=tl.int32, is_pure=True, pack=1)


# FP4 tiles: [GRAN / 16, GROUPS, BLOCK_M, *] for the rows ``rows`` [BLOCK_M] and the GRAN-column groups
# ``groups`` [GROUPS] (the caller picks them: the cast's 2-D grid, the pre-dispatch's row_group_tile).
# A thread owns a piece of 16 consecutive values (two 16-byte BF16 loads, one 8-byte store of codes).
# Triton's coalescing takes the contiguous axis first and then the others in index order, so lanes run
# over a group's pieces and then over groups (a warp reads contiguous runs of a row), and the packed codes
# [GRAN / 16, GROUPS, BLOCK_M, 8] get the same layout for their stores (no shared-memory round trip).

@triton.jit
def fp4_tile_load(x_ptr, rows, groups, M, K, stride_xm, stride_xk, GRAN: tl.constexpr, PAIRS: tl.constexpr):
    """The input of an FP4 tile (rows ``>= M`` and columns ``>= K`` read as 0): [GRAN / 16, GROUPS,
    BLOCK_M, 16] values, or with ``PAIRS`` (a BF16 input with unit column stride, even row stride and a
    4-byte aligned start: see :func:`bf16_pairs_ok`) [GRAN / 16, GROUPS, BLOCK_M, 8] int32 pairs, the
    even column in the low half."""
    NP: tl.constexpr = GRAN // 16
    rows64 = rows.to(tl.int64)[None, None, :, None]
    row_ok = (rows < M)[None, None, :, None]
    first = groups[None, :, None] * GRAN + tl.arange(0, NP)[:, None, None] * 16                 # [NP, GROUPS, 1]
    if PAIRS:
        wcols = first // 2 + tl.arange(0, 8)[None, None, :]                                      # pair index
        return tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + rows64 * (stride_xm // 2) + wcols[:, :, None, :],
                       eviction_policy=STREAM_EVICT,
                       mask=row_ok & (wcols < K // 2)[:, :, None, :], other=0)
    else:
        cols = first + tl.arange(0, 16)[None, None, :]
        return tl.load(x_ptr + rows64 * stride_xm + cols[:, :, None, :] * stride_xk, eviction_policy=STREAM_EVICT,
                       mask=row_ok & (cols < K)[:, :, None, :], other=0.0)


@triton.jit
def fp4_tile_cast(x, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr, PAIRS: tl.constexpr,
                  USE_UE8M0: tl.constexpr, SOFT: tl.constexpr):
    """``(packed, sf)`` of a tile from :func:`fp4_tile_load`: packed E2M1 codes [GRAN / 16, GROUPS, BLOCK_M, 8]
    uint8 (low nibble = even column) and the FP32 scales [GROUPS, BLOCK_M].  An all-zero group gets code
    bytes 0 (and the 1e-4 floor's scale).

    ``USE_UE8M0`` works on the bits: :func:`e2m1_scale_ue8m0` (no division) and :func:`e2m1_code_bits_ue8m0`
    (the scaling folded into one FMA a value); with ``PAIRS`` the halves of a pair give the FP32 bits with
    one shift or mask.  Without ``USE_UE8M0`` (``PAIRS`` off): the IEEE scale path of
    :func:`scale_from_amax` and :func:`e2m1_codes`.  ``SOFT``: the interpreter (no inline assembly)."""
    NP: tl.constexpr = GRAN // 16
    if PAIRS:
        # The FP32 bits of the even value are w << 16, those of the odd one w with its low half ignored.
        lo = x << 16
        a_lo = lo & 0x7FFFFFFF
        a_hi = x & 0x7FFF0000
        sf_bits, s, special = e2m1_scale_ue8m0(tl.max(tl.max(tl.maximum(a_lo, a_hi), 3), 0))   # [GROUPS, BM]
        s4 = s[None, :, :, None]
        packed = (e2m1_code_bits_ue8m0(lo, a_lo, s4, True, SOFT)
                  + (e2m1_code_bits_ue8m0(x, a_hi, s4, True, SOFT) << 4))
        packed = tl.where(special[None, :, :, None], 0, packed).to(tl.uint8)
        sf = sf_bits.to(tl.float32, bitcast=True)
    elif USE_UE8M0:
        xb = x.to(tl.float32).to(tl.int32, bitcast=True)
        a = xb & 0x7FFFFFFF
        sf_bits, s, special = e2m1_scale_ue8m0(tl.max(tl.max(a, 3), 0))              # [GROUPS, BLOCK_M]
        t = e2m1_code_bits_ue8m0(xb, a, s[None, :, :, None], False, SOFT)
        even, odd = tl.split(tl.reshape(t, [NP, GROUPS, BLOCK_M, 8, 2]))
        packed = tl.where(special[None, :, :, None], 0, even + (odd << 4)).to(tl.uint8)
        sf = sf_bits.to(tl.float32, bitcast=True)
    else:
        sf, inv = scale_from_amax(tl.max(tl.max(abs_bits(x), 3), 0).to(tl.float32, bitcast=True), 6.0, False)
        codes = e2m1_codes(x.to(tl.float32) * inv[None, :, :, None])
        even, odd = tl.split(tl.reshape(codes, [NP, GROUPS, BLOCK_M, 8, 2]))
        packed = (even | (odd << 4)).to(tl.uint8)
    return packed, sf


@triton.jit
def fp4_tile_store(q_ptr, packed, rows, groups, M, K, stride_qm, GRAN: tl.constexpr):
    """The packed codes of :func:`fp4_tile_cast` into rows ``< M`` of the [*, K / 2] code bytes."""
    NP: tl.constexpr = GRAN // 16
    # K is even, so byte j of a row is in range exactly when j < K / 2 (compared against K / 2
    # itself, not 2j < K, so the compiler can see the mask is constant over 8-byte stores).
    pairs = groups[None, :, None] * (GRAN // 2) + tl.arange(0, NP)[:, None, None] * 8 + tl.arange(0, 8)[None, None, :]
    tl.store(q_ptr + rows.to(tl.int64)[None, None, :, None] * stride_qm + pairs[:, :, None, :], packed,
             mask=(rows < M)[None, None, :, None] & (pairs < K // 2)[:, :, None, :])


# -------------------------------------------------------------------------------------
# Kernels
# -------------------------------------------------------------------------------------

@triton.jit
def store_row_group_scales(sf_ptr, sf, rows, groups, M, K, stride_sm, GRAN: tl.constexpr, SF_BYTES: tl.constexpr):
    """``sf [rows, groups]`` into the per-(row, group) scale tensor: FP32, or its UE8M0 byte (``SF_BYTES``)."""
    mask = (rows[:, None] < M) & (groups[None, :] < tl.cdiv(K, GRAN))
    offs = rows.to(tl.int64)[:, None] * stride_sm + groups[None, :]
    if SF_BYTES:
        tl.store(sf_ptr + offs, ue8m0_byte(sf), mask=mask)
    else:
        tl.store(sf_ptr + offs, sf, mask=mask)


@triton.jit
def row_group_tile(tile, tiles_g, M, K, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr):
    """Tile ``tile`` of a [M, K] input cut into [BLOCK_M rows, GROUPS x GRAN columns] tiles, row-block major
    (``tiles_g`` tiles a row block): ``(row block, rows, groups, cols [GROUPS, GRAN], mask [BLOCK_M, GROUPS,
    GRAN])``.  Shared by the casts and the MoE pre-dispatch."""
    pid_m = tile // tiles_g
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = (tile % tiles_g) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * GRAN + tl.arange(0, GRAN)[None, :]
    mask = (rows[:, None, None] < M) & (cols[None, :, :] < K)
    return pid_m, rows, groups, cols, mask


@triton.jit
def _load_row_group_tile(x_ptr, tile, tiles_g, total, M, K, stride_xm, stride_xk,
                         BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr):
    """The input of tile ``tile`` (zeros past ``total`` tiles: the persistent loop's last prefetch)."""
    pid_m, rows, groups, cols, mask = row_group_tile(tile, tiles_g, M, K, BLOCK_M, GROUPS, GRAN)
    ptrs = x_ptr + rows.to(tl.int64)[:, None, None] * stride_xm + cols[None, :, :] * stride_xk
    return tl.load(ptrs, mask=mask & (tile < total), other=0.0, eviction_policy=ROWS_EVICT)


@triton.jit
def _cast_fp8_tile(x, tile, tiles_g, q_ptr, sf_ptr, M, K, stride_qm, stride_sm,
                   BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr, PER_BLOCK: tl.constexpr,
                   USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr, SF_BYTES: tl.constexpr):
    """Codes and scales of one loaded tile: one scale per (row, group), or with ``PER_BLOCK`` one per
    (row block, group) (the amax reduced over the rows as well)."""
    pid_m, rows, groups, cols, mask = row_group_tile(tile, tiles_g, M, K, BLOCK_M, GROUPS, GRAN)
    rows64 = rows.to(tl.int64)
    if PER_BLOCK:
        amax = tl.max(tl.max(abs_bits(x), 2), 0).to(tl.float32, bitcast=True)   # [GROUPS]
        sf, inv = scale_from_amax(amax, 448.0, USE_UE8M0)
        q = e4m3_bytes(x.to(tl.float32) * inv[None, :, None], SOFT_CVT)
        tl.store(q_ptr + rows64[:, None, None] * stride_qm + cols[None, :, :], q, mask=mask)
        tl.store(sf_ptr + pid_m.to(tl.int64) * stride_sm + groups, sf, mask=groups < tl.cdiv(K, GRAN))
    else:
        sf, inv = scale_from_amax(group_amax(x, 2), 448.0, USE_UE8M0)         # [BLOCK_M, GROUPS]
        q = e4m3_bytes(x.to(tl.float32) * inv[:, :, None], SOFT_CVT)
        tl.store(q_ptr + rows64[:, None, None] * stride_qm + cols[None, :, :], q, mask=mask)
        store_row_group_scales(sf_ptr, sf, rows, groups, M, K, stride_sm, GRAN, SF_BYTES)


@triton.jit
def _cast_fp8_rows(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                   BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr, PER_BLOCK: tl.constexpr,
                   USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr, SF_BYTES: tl.constexpr,
                   PERSISTENT: tl.constexpr):
    """One program per tile, or with ``PERSISTENT`` programs striding over the tiles that load the next
    tile before they reduce, scale and store the current one (a per-block tile needs all its rows before
    its first code can be written, and a one-tile program leaves memory idle meanwhile).  Measured on an
    H100: 0-2.5% at best, up to 40% slower with too few programs per SM, so it is opt-in by config."""
    tiles_g = tl.cdiv(tl.cdiv(K, GRAN), GROUPS)
    total = tl.cdiv(M, BLOCK_M) * tiles_g
    tile = tl.program_id(0)
    x = _load_row_group_tile(x_ptr, tile, tiles_g, total, M, K, stride_xm, stride_xk, BLOCK_M, GROUPS, GRAN)
    if PERSISTENT:
        step = tl.num_programs(0)
        for tile in range(tl.program_id(0), total, step):
            x_next = _load_row_group_tile(x_ptr, tile + step, tiles_g, total, M, K, stride_xm, stride_xk,
                                          BLOCK_M, GROUPS, GRAN)
            _cast_fp8_tile(x, tile, tiles_g, q_ptr, sf_ptr, M, K, stride_qm, stride_sm,
                           BLOCK_M, GROUPS, GRAN, PER_BLOCK, USE_UE8M0, SOFT_CVT, SF_BYTES)
            x = x_next
    else:
        _cast_fp8_tile(x, tile, tiles_g, q_ptr, sf_ptr, M, K, stride_qm, stride_sm,
                       BLOCK_M, GROUPS, GRAN, PER_BLOCK, USE_UE8M0, SOFT_CVT, SF_BYTES)


@triton.jit
def per_token_cast_kernel(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                          BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr,
                          USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr, SF_BYTES: tl.constexpr = False,
                          PERSISTENT: tl.constexpr = False):
    """E4M3 codes + one FP32 scale per (row, GRAN columns) (with ``SF_BYTES`` its UE8M0 byte instead).
    Tiles ``[BLOCK_M, GROUPS, GRAN]`` (see :func:`row_group_tile`), each group reduced along the last
    (contiguous) axis; grid and ``PERSISTENT`` as :func:`_cast_fp8_rows`.  ``q_ptr`` is the output viewed
    as uint8 (unit column stride)."""
    _cast_fp8_rows(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                   BLOCK_M, GROUPS, GRAN, False, USE_UE8M0, SOFT_CVT, SF_BYTES, PERSISTENT)


@triton.jit
def per_block_cast_kernel(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                          BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr,
                          USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr, PERSISTENT: tl.constexpr = False):
    """E4M3 codes + one FP32 scale per (BLOCK_M rows x GRAN columns) block (BLOCK_M = 128): the
    per-token tile with the amax reduced over the rows as well."""
    _cast_fp8_rows(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                   BLOCK_M, GROUPS, GRAN, True, USE_UE8M0, SOFT_CVT, False, PERSISTENT)


@triton.jit
def per_channel_cast_kernel(x_ptr, q_ptr, sf_ptr, M, N, stride_xm, stride_xn, stride_qm, stride_sm,
                            GRAN: tl.constexpr, BLOCK_N: tl.constexpr,
                            USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr):
    """E4M3 codes + one FP32 scale per (GRAN rows, column): [GRAN, BLOCK_N] tiles reduced over their rows.

    1-D grid of tiles, band-major: consecutive programs take consecutive column blocks of one GRAN-row
    band (measured no faster than the column-major order on an H100, 91.3 vs 91.6 µs, but it keeps the
    resident programs on whole rows).  Each column's scale is derived by every
    thread holding a piece of the column, hence the division-free scale path on the GPU."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_blocks
    rows = pid_m * GRAN + tl.arange(0, GRAN)
    cols = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)[:, None]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0,
                eviction_policy=STREAM_EVICT)
    sf, inv = scale_from_amax(group_amax(x, 0), 448.0, USE_UE8M0, not SOFT_CVT)  # [BLOCK_N]
    q = e4m3_bytes(x.to(tl.float32) * inv[None, :], SOFT_CVT)
    tl.store(q_ptr + rows64 * stride_qm + cols[None, :], q, mask=mask)
    tl.store(sf_ptr + pid_m.to(tl.int64) * stride_sm + cols, sf, mask=cols < N)


@triton.jit
def per_token_cast_fp4_kernel(x_ptr, q_ptr, sf_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                              BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr,
                              USE_UE8M0: tl.constexpr, SF_BYTES: tl.constexpr,
                              X_GENERIC: tl.constexpr = False, SOFT: tl.constexpr = False):
    """Packed E2M1 codes (low nibble = even column) + one scale per (row, GRAN columns), FP32 or,
    with ``SF_BYTES``, its UE8M0 byte.  Program (i, j): rows ``[i*BLOCK_M, (i+1)*BLOCK_M)``, groups
    ``[j*GROUPS, (j+1)*GROUPS)``, one FP4 tile (:func:`fp4_tile_load`, :func:`fp4_tile_cast`,
    :func:`fp4_tile_store`).  A BF16 input is read as 32-bit pairs under ``USE_UE8M0`` unless
    ``X_GENERIC`` (strides or alignment that pairs cannot take).  ``SOFT``: the interpreter."""
    PAIRS: tl.constexpr = USE_UE8M0 and not X_GENERIC and x_ptr.dtype.element_ty == tl.bfloat16
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    x = fp4_tile_load(x_ptr, rows, groups, M, K, stride_xm, stride_xk, GRAN, PAIRS)
    packed, sf = fp4_tile_cast(x, BLOCK_M, GROUPS, GRAN, PAIRS, USE_UE8M0, SOFT)
    fp4_tile_store(q_ptr, packed, rows, groups, M, K, stride_qm, GRAN)
    store_row_group_scales(sf_ptr, tl.trans(sf), rows, groups, M, K, stride_sm, GRAN, SF_BYTES)


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
    8 by 2% on the FP8 pre-dispatch, 6% on the FP4 cast and 5% on the FP4 pre-dispatch, and tie on the FP8
    cast (before the FP4 cast's rewrite on the bits, after which 8 and 4 warps tie)."""
    target_bytes = 8192 if fp4 else 16384
    groups = _pow2_at_most(-(-k // gran), max(1, 512 // gran))
    block_m = _pow2_at_most(m, max(1, target_bytes // (elem_bytes * groups * gran)))
    elems = block_m * groups * gran
    num_warps = 8 if elems > 8192 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return block_m, groups, num_warps


def bf16_pairs_ok(x) -> bool:
    """Whether the FP4 tiles may read ``x`` [M, K] as 32-bit BF16 pairs (:func:`fp4_tile_load` ``PAIRS``):
    BF16, unit column stride, even row stride, 4-byte aligned start."""
    return x.dtype == torch.bfloat16 and x.stride(1) == 1 and x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0


def _persistent_grid(tiles: int, ctas_per_sm: int) -> int:
    return max(1, min(tiles, get_num_sms() * ctas_per_sm))


def _launch_row_group_cast(kernel, x, q, sf, gran: int, block_m: int, groups: int, warps: int, ctas_per_sm: int,
                           **meta) -> None:
    """One program per tile, or ``ctas_per_sm * num_sms`` persistent programs when ``ctas_per_sm`` > 0."""
    m, k = x.shape
    tiles = triton.cdiv(m, block_m) * triton.cdiv(triton.cdiv(k, gran), groups)
    grid = (_persistent_grid(tiles, ctas_per_sm) if ctas_per_sm else tiles,)
    kernel[grid](x, q.view(torch.uint8), sf, m, k, x.stride(0), x.stride(1), q.stride(0), sf.stride(0),
                 BLOCK_M=block_m, GROUPS=groups, GRAN=gran, PERSISTENT=bool(ctas_per_sm), num_warps=warps, **meta)


def launch_per_token(x, q, sf, gran: int, use_ue8m0: bool, soft: bool, config=None) -> None:
    """``sf`` FP32 scales, or uint8 for UE8M0 bytes (then ``use_ue8m0`` must be set).  ``config`` is
    ``(BLOCK_M, GROUPS, num_warps)``, or with a fourth entry ``ctas_per_sm`` > 0 the persistent
    next-tile-prefetch grid on ``ctas_per_sm * num_sms`` programs."""
    m, k = x.shape
    block_m, groups, warps, *rest = config or row_group_config(m, k, gran, x.element_size())
    _launch_row_group_cast(per_token_cast_kernel, x, q, sf, gran, block_m, groups, warps, rest[0] if rest else 0,
                           USE_UE8M0=use_ue8m0, SOFT_CVT=soft, SF_BYTES=sf.dtype == torch.uint8)


def launch_per_block(x, q, sf, gran: int, use_ue8m0: bool, soft: bool, config=None) -> None:
    """``config`` is ``(GROUPS, num_warps)`` or ``(GROUPS, num_warps, ctas_per_sm)`` (persistent grid
    with the next tile in flight when ``ctas_per_sm`` > 0)."""
    k = x.shape[1]
    groups, warps, *rest = config or (_pow2_at_most(-(-k // gran), max(1, 128 // gran)), 8)
    _launch_row_group_cast(per_block_cast_kernel, x, q, sf, gran, 128, groups, warps, rest[0] if rest else 0,
                           USE_UE8M0=use_ue8m0, SOFT_CVT=soft)


def launch_per_channel(x, q, sf, gran: int, use_ue8m0: bool, soft: bool, config=None) -> None:
    """``config`` is ``(BLOCK_N, num_warps)`` for this Triton kernel, or a
    :class:`fp8gemm.kernels.quant_gluon.PerChannelConfig` for the Gluon one.  Without a config, the Gluon
    kernel runs where it can (an SM90 GPU, ``FP8GEMM_BACKEND`` not ``triton``): measured faster on an H100
    (benchmarks/RESULTS.md, session 5)."""
    from . import quant_gluon
    if not soft and (isinstance(config, quant_gluon.PerChannelConfig)
                     or (config is None and backend() != "triton" and quant_gluon.supports(x))):
        quant_gluon.launch_per_channel(x, q, sf, gran, use_ue8m0, config)
        return
    m, n = x.shape
    # 16 KiB of input a program (64 columns of 128 BF16 rows) on 4 warps: 77.5 µs on 8192x7168 (H100),
    # against 91.6 µs for 128 columns on 8 warps (same registers a thread, half the programs an SM).
    block_n, warps = config or (_pow2_at_most(n, max(16, 16384 // (x.element_size() * gran))), 4)
    grid = (triton.cdiv(m, gran) * triton.cdiv(n, block_n),)
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
                                    SF_BYTES=sf_bytes, X_GENERIC=not bf16_pairs_ok(x), SOFT=interpreting(),
                                    num_warps=warps)
