"""Portable Triton GEMM kernels: dense, contiguous-grouped, masked-grouped (with SBO signals), K-grouped.

One persistent kernel covers the M-grouped family; the mode and the operand formats are
compile-time constants, so each combination compiles to straight-line code.  It is the
fallback wherever the Gluon kernels do not apply, and the interpreter-tested twin of them.
Semantics: :mod:`fp8gemm.reference`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .quant import e4m3_bytes, group_amax, scale_from_amax, ue8m0_byte

MODE_DENSE = 0
MODE_CONTIGUOUS = 1
MODE_MASKED = 2


@triton.jit
def _load_scale(ptr, row_idx, row_stride, kb, k_stride, mask, PACKED: tl.constexpr):
    """One FP32 scale per (row, 128-K block); packed UE8M0 holds four exponent bytes per int32 word."""
    if PACKED:
        word = tl.load(ptr + row_idx * row_stride + (kb // 4) * k_stride, mask=mask, other=127 << ((kb % 4) * 8))
        exponent = (word >> ((kb % 4) * 8)) & 0xFF
        # An exponent byte in the FP32 exponent field is exactly 2^(e - 127).
        return (exponent << 23).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + row_idx * row_stride + kb * k_stride, mask=mask, other=1.0)


@triton.jit
def _pow2(exponent):
    """2^exponent for integer exponents in [-126, 127], built from the bits (exact)."""
    return ((tl.maximum(exponent, -126) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_fp4_as_fp8(a_base, sfa_base, offs_m, m_ok, kb, K, stride_am, stride_ak, stride_sam, stride_sak,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_K] tile of E2M1 activations (two codes a byte, low nibble first, one UE8M0
    scale byte per 32) as E4M3 plus one power-of-two scale per row.

    Each row's 32-element chunks are rescaled to the largest scale of the block: the E2M1 values times
    2^(e_chunk - e_max) stay exact in E4M3 while e_max - e_chunk <= 8 (E4M3 subnormals reach 2^-9);
    a chunk more than 256x smaller than its row's largest rounds to E4M3's subnormal grid.
    """
    offs_b = kb * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(a_base + offs_m[:, None].to(tl.int64) * stride_am + offs_b[None, :] * stride_ak,
                     mask=m_ok[:, None] & (offs_b < K // 2)[None, :], other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 0xF, (packed >> 4) & 0xF), (BLOCK_M, BLOCK_K))
    exp_field = (codes >> 1) & 3
    mant = codes & 1
    # Twice the magnitude is an integer: 0,1 (subnormal), then (2 + m) << (e - 1).
    twice = tl.where(exp_field == 0, mant, (2 + mant) << tl.maximum(exp_field - 1, 0))
    value = tl.where((codes & 8) != 0, -0.5, 0.5) * twice.to(tl.float32)
    offs_s = kb * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    exps = tl.load(sfa_base + offs_m[:, None].to(tl.int64) * stride_sam + offs_s[None, :] * stride_sak,
                   mask=m_ok[:, None] & (offs_s < K // 32)[None, :], other=0).to(tl.int32)
    e_max = tl.max(exps, axis=1)
    rel = _pow2(exps - e_max[:, None])
    value = tl.reshape(tl.reshape(value, (BLOCK_M, BLOCK_K // 32, 32)) * rel[:, :, None], (BLOCK_M, BLOCK_K))
    return value.to(tl.float8e4nv), _pow2(e_max - 127)


@triton.jit
def m_grouped_gemm_kernel(
    a_ptr, b_ptr, d_ptr, c_ptr, sfa_ptr, sfb_ptr, m_indices_ptr, masked_m_ptr, signal_ptr,
    M, N, K, num_groups, num_b_groups, num_progs,
    stride_ag, stride_am, stride_ak,
    stride_bg, stride_bn, stride_bk,
    stride_dg, stride_dm, stride_dn,
    stride_cg, stride_cm, stride_cn,
    stride_sag, stride_sam, stride_sak,
    stride_sbg, stride_sbn, stride_sbk,
    MODE: tl.constexpr, SCALED: tl.constexpr, SFA_PACKED: tl.constexpr, SFB_PACKED: tl.constexpr,
    SFB_GRAN_N: tl.constexpr, HAS_C: tl.constexpr, SIGNAL: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GROUPS_POW2: tl.constexpr, UPCAST_DOT: tl.constexpr, A_FP4: tl.constexpr,
    dsf_ptr=None, stride_sfg=0, stride_sfm=0, D_FP8: tl.constexpr = False, SOFT: tl.constexpr = False,
):
    """``D[g] = C[g] + A[g] @ B[g].T`` tile by tile, persistent over ``num_progs`` programs.

    MODE_DENSE: one group.  MODE_CONTIGUOUS: ``A``/``D`` rows of all experts concatenated; a
    block's expert is the (one) non-negative id among its rows, rows with id -1 are neither read
    nor written.  MODE_MASKED: ``A``/``D`` are [G, M, *]; only rows < ``masked_m[g]`` are touched,
    and with SIGNAL each finished (group, m-block) tile adds 1 to its counter (release, after the
    tile's stores).  SCALED: FP8 operands promoted per 128-K block with the A (per row) and B (per
    ``SFB_GRAN_N`` rows) scales.  A_FP4: A holds packed E2M1 codes with UE8M0 scale bytes per 32,
    turned into E4M3 tiles on the way to the tensor cores (see ``_load_fp4_as_fp8``).  SWAP_AB computes the tile transposed (B rows on the MMA's M side),
    which suits few rows of A.  D_FP8 (BLOCK_N = 128, N a multiple of 128): D gets the FP8 combine payload of
    the BF16 result instead -- E4M3 codes (``d_ptr`` as bytes) and one UE8M0 byte per row per 128 columns at
    ``dsf_ptr`` (``fp8gemm.reference.quantize_combine_payload``; ``SOFT``: the interpreter's rounding).
    """
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    tiles_per_group = num_m_blocks * num_n_blocks
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    if MODE == 2:
        # Masked: walk m-blocks outermost and stop after the last m-block any group uses, so a
        # decode batch far below max_m costs no time on the empty tail.
        offs_g = tl.arange(0, GROUPS_POW2)
        all_valid = tl.load(masked_m_ptr + offs_g, mask=offs_g < num_groups, other=0)
        live_m_blocks = tl.minimum(tl.cdiv(tl.max(all_valid, axis=0), BLOCK_M), num_m_blocks)
        num_tiles = live_m_blocks * num_groups * num_n_blocks
    else:
        num_tiles = tiles_per_group * num_groups

    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(pid, num_tiles, num_progs):
        if MODE == 2:
            pid_m = tile // (num_groups * num_n_blocks)
            group = (tile // num_n_blocks) % num_groups
            pid_n = tile % num_n_blocks
        else:
            # Rasterise GROUP_M m-blocks at a time so neighbouring programs share B tiles in L2.
            group = tile // tiles_per_group
            local = tile % tiles_per_group
            width = GROUP_M * num_n_blocks
            first_m = (local // width) * GROUP_M
            rows_in_band = tl.minimum(num_m_blocks - first_m, GROUP_M)
            pid_m = first_m + (local % width) % rows_in_band
            pid_n = (local % width) // rows_in_band

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if MODE == 1:
            expert_ids = tl.load(m_indices_ptr + offs_m, mask=offs_m < M, other=-1)
            expert = tl.max(expert_ids, axis=0)
            m_ok = (expert_ids == expert) & (expert >= 0)
            # An id past the last expert would read outside B: such blocks are skipped like padding.
            active = (expert >= 0) & (expert < num_b_groups)
            b_group = expert
        elif MODE == 2:
            valid_m = tl.minimum(tl.load(masked_m_ptr + group), M)
            m_ok = offs_m < valid_m
            active = pid_m * BLOCK_M < valid_m
            b_group = group
        else:
            m_ok = offs_m < M
            active = pid_m * BLOCK_M < M
            b_group = group

        if active:
            a_base = a_ptr + group.to(tl.int64) * stride_ag
            b_base = b_ptr + b_group.to(tl.int64) * stride_bg
            a_ptrs = a_base + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
            b_ptrs = b_base + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :] * stride_bk
            sfa_base = sfa_ptr + group.to(tl.int64) * stride_sag
            sfb_base = sfb_ptr + b_group.to(tl.int64) * stride_sbg
            if SWAP_AB:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kb in range(0, num_k_blocks):
                k_ok = offs_k < K - kb * BLOCK_K
                if A_FP4:
                    a, sa = _load_fp4_as_fp8(a_base, sfa_base, offs_m, m_ok, kb, K, stride_am, stride_ak,
                                             stride_sam, stride_sak, BLOCK_M, BLOCK_K)
                else:
                    a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST_DOT:
                    # Triton 3.6's interpreter multiplies BF16 tiles as raw bits; FP32 is exact here.
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if SWAP_AB:
                    partial = tl.dot(b, tl.trans(a))
                else:
                    partial = tl.dot(a, tl.trans(b))
                if SCALED:
                    if not A_FP4:
                        sa = _load_scale(sfa_base, offs_m, stride_sam, kb, stride_sak, m_ok, SFA_PACKED)
                    sb = _load_scale(sfb_base, offs_n // SFB_GRAN_N, stride_sbn, kb, stride_sbk, n_ok, SFB_PACKED)
                    if SWAP_AB:
                        acc += partial * sb[:, None] * sa[None, :]
                    else:
                        acc += partial * sa[:, None] * sb[None, :]
                else:
                    acc += partial
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk

            if SWAP_AB:
                out = tl.trans(acc)
            else:
                out = acc
            out_mask = m_ok[:, None] & n_ok[None, :]
            row_off = offs_m[:, None].to(tl.int64)
            if HAS_C:
                c_ptrs = c_ptr + group.to(tl.int64) * stride_cg + row_off * stride_cm + offs_n[None, :] * stride_cn
                out += tl.load(c_ptrs, mask=out_mask, other=0.0)
            d_ptrs = d_ptr + group.to(tl.int64) * stride_dg + row_off * stride_dm + offs_n[None, :] * stride_dn
            if D_FP8:
                # the tile is one 128-column group: the payload of the BF16-rounded row
                v = out.to(tl.bfloat16).to(tl.float32)
                sf, inv = scale_from_amax(group_amax(v, 1), 448.0, True, not SOFT)
                tl.store(d_ptrs, e4m3_bytes(v * inv[:, None], SOFT), mask=out_mask)
                tl.store(dsf_ptr + group.to(tl.int64) * stride_sfg + offs_m.to(tl.int64) * stride_sfm + pid_n,
                         ue8m0_byte(sf), mask=m_ok)
            else:
                tl.store(d_ptrs, out.to(d_ptr.dtype.element_ty), mask=out_mask)
            if SIGNAL:
                # Every thread's stores of this tile happen before the barrier; the release
                # atomic then publishes them to a consumer that acquires the counter.
                tl.debug_barrier()
                tl.atomic_add(signal_ptr + group * num_m_blocks + pid_m, 1, sem="release", scope="gpu")


@triton.jit
def k_grouped_gemm_kernel(
    a_ptr, b_ptr, d_ptr, c_ptr, sfa_ptr, sfb_ptr, ks_ptr,
    M, N, num_groups, num_progs,
    stride_ak, stride_am, stride_bk, stride_bn,
    stride_dg, stride_dm, stride_dn, stride_cg, stride_cm, stride_cn,
    stride_sak, stride_sam, stride_sbk, stride_sbn,
    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``D[g] = C[g] + A_g.T @ B_g`` where group g owns K-rows ``[sum(ks[:g]), sum(ks[:g+1]))``.

    A [sum K, M] and B [sum K, N] FP8, scales one per 128 K-rows per column ([sum K / 128, M|N]).
    Each ``ks[g]`` is a multiple of ``BLOCK_K`` (= 128, the scale granularity).
    """
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    tiles_per_group = num_m_blocks * num_n_blocks
    num_tiles = tiles_per_group * num_groups
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(pid, num_tiles, num_progs):
        group = tile // tiles_per_group
        local = tile % tiles_per_group
        pid_m = local // num_n_blocks
        pid_n = local % num_n_blocks
        # K offset of this group: a short scalar scan keeps the launch free of host work.
        k_start = 0
        for g in range(0, group):
            k_start += tl.load(ks_ptr + g)
        k_len = tl.load(ks_ptr + group)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, k_len // BLOCK_K):
            rows = (k_start + kb * BLOCK_K + offs_k).to(tl.int64)
            a = tl.load(a_ptr + rows[:, None] * stride_ak + offs_m[None, :] * stride_am, mask=m_ok[None, :], other=0.0)
            b = tl.load(b_ptr + rows[:, None] * stride_bk + offs_n[None, :] * stride_bn, mask=n_ok[None, :], other=0.0)
            sblock = k_start // BLOCK_K + kb
            sa = tl.load(sfa_ptr + sblock * stride_sak + offs_m * stride_sam, mask=m_ok, other=1.0)
            sb = tl.load(sfb_ptr + sblock * stride_sbk + offs_n * stride_sbn, mask=n_ok, other=1.0)
            acc += tl.dot(tl.trans(a), b) * sa[:, None] * sb[None, :]
        out_mask = m_ok[:, None] & n_ok[None, :]
        row_off = offs_m[:, None].to(tl.int64)
        if HAS_C:
            acc += tl.load(c_ptr + group.to(tl.int64) * stride_cg + row_off * stride_cm + offs_n[None, :] * stride_cn,
                           mask=out_mask, other=0.0)
        tl.store(d_ptr + group.to(tl.int64) * stride_dg + row_off * stride_dm + offs_n[None, :] * stride_dn,
                 acc.to(d_ptr.dtype.element_ty), mask=out_mask)
