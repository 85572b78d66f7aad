"""Triton kernels of the MoE activation path: the fused pre-dispatch (cast + routing copy + padding in one
launch) and the FP8 combine reduction.  Semantics: the "MoE activations" section of :mod:`fp8gemm.reference`.

The cast itself reuses the device helpers of :mod:`fp8gemm.kernels.quant` (same amax, scale and rounding
code, hence the same bytes as the public casts): the FP8 tile body of the per-token cast's helpers, and for
FP4 the per-token FP4 cast's own tile helpers (``fp4_tile_load`` / ``fp4_tile_cast`` / ``fp4_tile_store``:
UE8M0 scale from the amax bits, the 1/sf scaling folded into the rounding FMA, BF16 read as 32-bit pairs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..runtime import get_num_sms
from .quant import (PRE_STORE_CACHE, PRE_STORE_EVICT, ROWS_EVICT, bf16_pairs_ok, e4m3_bytes, fp4_tile_cast,
                    fp4_tile_load, fp4_tile_store, group_amax, row_group_config, row_group_tile, scale_from_amax,
                    ue8m0_byte)


@triton.jit
def _pre_dispatch_load(x_ptr, tile, tiles_g, num_tokens, hidden, stride_xm, stride_xk,
                       BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr, FP4: tl.constexpr,
                       X_PAIRS: tl.constexpr):
    """The input of tile ``tile``; only token rows are read, zeros elsewhere (also for a tile past the last
    one, the persistent loop's last prefetch: its rows start at or past ``capacity >= num_tokens``).  FP8:
    [BLOCK_M, GROUPS, GRAN] values; FP4: the tile of :func:`fp8gemm.kernels.quant.fp4_tile_load` (32-bit
    pairs with ``X_PAIRS``)."""
    pid_m, rows, groups, cols, load_mask = row_group_tile(tile, tiles_g, num_tokens, hidden, BLOCK_M, GROUPS, GRAN)
    if FP4:
        return fp4_tile_load(x_ptr, rows, groups, num_tokens, hidden, stride_xm, stride_xk, GRAN, X_PAIRS)
    else:
        ptrs = x_ptr + rows.to(tl.int64)[:, None, None] * stride_xm + cols[None, :, :] * stride_xk
        return tl.load(ptrs, mask=load_mask, other=0.0, eviction_policy=ROWS_EVICT)


@triton.jit
def _pre_dispatch_tile(x, tile, tiles_g, idx_ptr, w_ptr, bx_ptr, bsf_ptr, bidx_ptr, bw_ptr,
                       num_tokens, capacity, hidden, topk,
                       stride_im, stride_ik, stride_wm, stride_wk, stride_bxm, stride_bsm, stride_bim, stride_bwm,
                       BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr, TOPK_P2: tl.constexpr,
                       FP4: tl.constexpr, SF_FP32: tl.constexpr, USE_UE8M0: tl.constexpr, SOFT_CVT: tl.constexpr,
                       X_PAIRS: tl.constexpr):
    """Writes one tile's codes and scales (the cast of ``x`` for token rows, zeros for padding rows) and,
    for the tile of the first groups, the rows' routing."""
    pid_m, rows, groups, cols, in_tile = row_group_tile(tile, tiles_g, capacity, hidden, BLOCK_M, GROUPS, GRAN)
    rows64 = rows.to(tl.int64)
    token = rows < num_tokens
    in_buf = rows < capacity
    if FP4:
        # Always UE8M0 scales (the per-token FP4 cast's bit path, whatever USE_UE8M0 says).  Padding rows
        # were loaded as zeros, whose codes are 0 (an all-zero group): only their scales need zeroing.
        packed, sf = fp4_tile_cast(x, BLOCK_M, GROUPS, GRAN, X_PAIRS, True, SOFT_CVT)
        fp4_tile_store(bx_ptr, packed, rows, groups, capacity, hidden, stride_bxm, GRAN)
        sf = tl.trans(sf)                                                             # [BLOCK_M, GROUPS]
    else:
        sf, inv = scale_from_amax(group_amax(x, 2), 448.0, USE_UE8M0)
        q = e4m3_bytes(x.to(tl.float32) * inv[:, :, None], SOFT_CVT)
        q = tl.where(token[:, None, None], q, 0).to(tl.uint8)
        tl.store(bx_ptr + rows64[:, None, None] * stride_bxm + cols[None, :, :], q,
                 mask=in_tile, eviction_policy=PRE_STORE_EVICT, cache_modifier=PRE_STORE_CACHE)
    sf_offs = rows64[:, None] * stride_bsm + groups[None, :]
    sf_mask = in_buf[:, None] & (groups[None, :] < tl.cdiv(hidden, GRAN))
    if SF_FP32:
        tl.store(bsf_ptr + sf_offs, tl.where(token[:, None], sf, 0.0), mask=sf_mask)
    else:
        tl.store(bsf_ptr + sf_offs, tl.where(token[:, None], ue8m0_byte(sf), 0).to(tl.uint8), mask=sf_mask)

    if tile % tiles_g == 0:
        k = tl.arange(0, TOPK_P2)
        k_ok = k[None, :] < topk
        # Padding rows read nothing: the masked loads' fill values (-1, 0) are their routing.
        src = token[:, None] & k_ok
        ids = tl.load(idx_ptr + rows64[:, None] * stride_im + k[None, :] * stride_ik, mask=src, other=-1)
        ws = tl.load(w_ptr + rows64[:, None] * stride_wm + k[None, :] * stride_wk, mask=src, other=0.0)
        dst = in_buf[:, None] & k_ok
        tl.store(bidx_ptr + rows64[:, None] * stride_bim + k[None, :], ids.to(bidx_ptr.dtype.element_ty), mask=dst)
        tl.store(bw_ptr + rows64[:, None] * stride_bwm + k[None, :], ws.to(tl.float32), mask=dst)


@triton.jit
def pre_dispatch_kernel(x_ptr, idx_ptr, w_ptr, bx_ptr, bsf_ptr, bidx_ptr, bw_ptr,
                        num_tokens, capacity, hidden, topk,
                        stride_xm, stride_xk, stride_im, stride_ik, stride_wm, stride_wk,
                        stride_bxm, stride_bsm, stride_bim, stride_bwm,
                        BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GRAN: tl.constexpr, TOPK_P2: tl.constexpr,
                        FP4: tl.constexpr, SF_FP32: tl.constexpr, USE_UE8M0: tl.constexpr,
                        SOFT_CVT: tl.constexpr, PERSISTENT: tl.constexpr = False, X_PAIRS: tl.constexpr = False):
    """Tile t covers buffer rows ``[(t // tiles_g) * BLOCK_M, ... + BLOCK_M)`` and scale groups
    ``[(t % tiles_g) * GROUPS, ... + GROUPS)`` of every buffer; rows below ``num_tokens`` get the token's
    cast, rows from ``num_tokens`` to ``capacity`` the padding values.  The tiles of the first groups also
    write the rows' routing (top-k ids and weights), so one launch fills all four buffers.

    FP4 (UE8M0 scales only): the tile is the per-token FP4 cast's [GRAN / 16, GROUPS, BLOCK_M, *] layout over
    the same rows and groups, and ``X_PAIRS`` reads the BF16 input as 32-bit pairs (unit column stride, even
    row stride, 4-byte aligned start: ``bf16_pairs_ok``).

    Plain grid: one program per tile.  ``PERSISTENT``: programs stride over the tiles and load the next
    tile before casting and storing the current one, so the loads of one tile overlap the stores of the
    previous one inside each program."""
    tiles_g = tl.cdiv(tl.cdiv(hidden, GRAN), GROUPS)
    total = tl.cdiv(capacity, BLOCK_M) * tiles_g
    tile = tl.program_id(0)
    x = _pre_dispatch_load(x_ptr, tile, tiles_g, num_tokens, hidden, stride_xm, stride_xk,
                           BLOCK_M, GROUPS, GRAN, FP4, X_PAIRS)
    if PERSISTENT:
        step = tl.num_programs(0)
        for tile in range(tl.program_id(0), total, step):
            x_next = _pre_dispatch_load(x_ptr, tile + step, tiles_g, num_tokens, hidden, stride_xm, stride_xk,
                                        BLOCK_M, GROUPS, GRAN, FP4, X_PAIRS)
            _pre_dispatch_tile(x, tile, tiles_g, idx_ptr, w_ptr, bx_ptr, bsf_ptr, bidx_ptr, bw_ptr,
                               num_tokens, capacity, hidden, topk, stride_im, stride_ik, stride_wm, stride_wk,
                               stride_bxm, stride_bsm, stride_bim, stride_bwm,
                               BLOCK_M, GROUPS, GRAN, TOPK_P2, FP4, SF_FP32, USE_UE8M0, SOFT_CVT, X_PAIRS)
            x = x_next
    else:
        _pre_dispatch_tile(x, tile, tiles_g, idx_ptr, w_ptr, bx_ptr, bsf_ptr, bidx_ptr, bw_ptr,
                           num_tokens, capacity, hidden, topk, stride_im, stride_ik, stride_wm, stride_wk,
                           stride_bxm, stride_bsm, stride_bim, stride_bwm,
                           BLOCK_M, GROUPS, GRAN, TOPK_P2, FP4, SF_FP32, USE_UE8M0, SOFT_CVT, X_PAIRS)


@triton.jit
def e4m3_to_f32(codes, SOFT: tl.constexpr):
    """E4M3 bytes (uint8) -> FP32, exact; 0x7F / 0xFF -> NaN.  ``SOFT`` decodes on the bits (the
    interpreter's conversion does not know E4M3's NaN), else the hardware conversion is used."""
    if SOFT:
        c = codes.to(tl.int32)
        e = (c >> 3) & 0xF
        m = c & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125                                      # m * 2^-9, exact
        mag = tl.where(e == 0, sub, normal)
        val = tl.where((c & 0x80) != 0, -mag, mag)
        return tl.where((c & 0x7F) == 0x7F, float("nan"), val)
    else:
        return codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def ue8m0_to_f32(b):
    """UE8M0 bytes -> FP32 2^(b - 127), exact (byte 0 is the subnormal 2^-127)."""
    e = b.to(tl.int32)
    return tl.where(e == 0, 0x00400000, e << 23).to(tl.float32, bitcast=True)


@triton.jit
def bf16_bits(acc, SOFT: tl.constexpr):
    """FP32 -> BF16 bits (int16), round to nearest even, NaN -> 0x7FC0.  ``SOFT`` rounds on the bits (the
    interpreter's conversion truncates)."""
    if SOFT:
        bits = acc.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(acc != acc, 0x7FC0, r & 0xFFFF)
        return r.to(tl.int16)
    else:
        b = acc.to(tl.bfloat16).to(tl.int16, bitcast=True)
        return tl.where(acc != acc, 0x7FC0, b).to(tl.int16)


@triton.jit
def combine_reduce_kernel(p_ptr, sf_ptr, w_ptr, idx_ptr, out_ptr, T, hidden, topk,
                          stride_pt, stride_pk, stride_st, stride_sk, stride_wt, stride_wk, stride_it, stride_ik,
                          stride_ot, num_experts,
                          BLOCK_T: tl.constexpr, GROUPS: tl.constexpr, HAS_IDX: tl.constexpr, SOFT: tl.constexpr,
                          trace_ptr=None, TRACE: tl.constexpr = False):
    """Program (i, j): tokens ``[i*BLOCK_T, (i+1)*BLOCK_T)``, 128-column groups ``[j*GROUPS, (j+1)*GROUPS)``;
    loops over the top-k slots in order, accumulating ``w * (code * scale)`` in FP32 registers.  Launched
    with FP contraction off so that ``acc + w * v`` rounds twice, as the reference does.  With ``HAS_IDX`` a
    slot counts where ``0 <= idx < num_experts``.  ``TRACE`` (GPU only, the EP layer's benchmark stamps,
    :attr:`fp8gemm.moe.ep.EPCommunicator.recv_trace`): program (0, 0) stores the global timer at its start in
    ``trace_ptr[2]``, every program raises ``trace_ptr[3]`` to its end time."""
    if TRACE:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(trace_ptr + 2, tl.extra.cuda.globaltimer())
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * 128 + tl.arange(0, 128)[None, :]
    rows64 = rows.to(tl.int64)
    row_ok = rows < T
    mask = row_ok[:, None, None] & (cols[None, :, :] < hidden)
    sf_mask = row_ok[:, None] & (groups[None, :] < tl.cdiv(hidden, 128))
    acc = tl.zeros([BLOCK_T, GROUPS, 128], dtype=tl.float32)
    for k in range(0, topk):
        codes = tl.load(p_ptr + rows64[:, None, None] * stride_pt + k * stride_pk + cols[None, :, :], mask=mask,
                        other=0)
        b = tl.load(sf_ptr + rows64[:, None] * stride_st + k * stride_sk + groups[None, :], mask=sf_mask, other=127)
        w = tl.load(w_ptr + rows64 * stride_wt + k * stride_wk, mask=row_ok, other=0.0).to(tl.float32)
        value = e4m3_to_f32(codes, SOFT) * ue8m0_to_f32(b)[:, :, None]
        summed = acc + w[:, None, None] * value
        if HAS_IDX:
            idx = tl.load(idx_ptr + rows64 * stride_it + k * stride_ik, mask=row_ok, other=-1)
            acc = tl.where(((idx >= 0) & (idx < num_experts))[:, None, None], summed, acc)
        else:
            acc = summed
    tl.store(out_ptr + rows64[:, None, None] * stride_ot + cols[None, :, :], bf16_bits(acc, SOFT), mask=mask)
    if TRACE:
        tl.debug_barrier()
        tl.atomic_max(trace_ptr + 3, tl.extra.cuda.globaltimer(), sem="relaxed")


def launch_pre_dispatch(x, topk_idx, topk_weights, buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights,
                        num_tokens: int, group_size: int, use_fp4_acts: bool, fp32_scales: bool, use_ue8m0: bool,
                        soft: bool, config=None) -> None:
    capacity, hidden = buf_x.shape[0], x.shape[1]
    topk = buf_topk_idx.shape[1]
    block_m, groups, warps, *rest = config or row_group_config(capacity, hidden, group_size, x.element_size(),
                                                               fp4=use_fp4_acts)
    ctas_per_sm = rest[0] if rest else 0
    tiles = triton.cdiv(capacity, block_m) * triton.cdiv(triton.cdiv(hidden, group_size), groups)
    grid = (max(1, min(tiles, get_num_sms() * ctas_per_sm)) if ctas_per_sm else tiles,)
    pre_dispatch_kernel[grid](
        x, topk_idx, topk_weights, buf_x.view(torch.uint8), buf_x_sf, buf_topk_idx, buf_topk_weights,
        num_tokens, capacity, hidden, topk,
        x.stride(0), x.stride(1), topk_idx.stride(0), topk_idx.stride(1), topk_weights.stride(0),
        topk_weights.stride(1), buf_x.stride(0), buf_x_sf.stride(0), buf_topk_idx.stride(0),
        buf_topk_weights.stride(0),
        BLOCK_M=block_m, GROUPS=groups, GRAN=group_size, TOPK_P2=triton.next_power_of_2(max(topk, 1)),
        FP4=use_fp4_acts, SF_FP32=fp32_scales, USE_UE8M0=use_ue8m0, SOFT_CVT=soft, PERSISTENT=bool(ctas_per_sm),
        X_PAIRS=use_fp4_acts and bf16_pairs_ok(x), num_warps=warps)


def launch_combine_reduce(payload, sf, weights, topk_idx, out, soft: bool, config=None,
                          num_experts: int = 2**31 - 1, trace=None) -> None:
    t, topk, hidden = payload.shape
    groups_total = triton.cdiv(hidden, 128)
    if config is None:
        groups = min(triton.next_power_of_2(groups_total), 4)
        block_t = min(triton.next_power_of_2(t), max(1, 4096 // (groups * 128)))
        warps = 8 if block_t * groups * 128 >= 4096 else 4
    else:
        block_t, groups, warps = config
    grid = (triton.cdiv(t, block_t), triton.cdiv(groups_total, groups))
    idx = topk_idx if topk_idx is not None else weights      # any pointer; not read without HAS_IDX
    combine_reduce_kernel[grid](
        payload.view(torch.uint8), sf, weights, idx, out.view(torch.int16), t, hidden, topk,
        payload.stride(0), payload.stride(1), sf.stride(0), sf.stride(1), weights.stride(0), weights.stride(1),
        idx.stride(0), idx.stride(1), out.stride(0), num_experts,
        BLOCK_T=block_t, GROUPS=groups, HAS_IDX=topk_idx is not None, SOFT=soft, num_warps=warps,
        enable_fp_fusion=False, **({} if trace is None else dict(trace_ptr=trace, TRACE=True)))
