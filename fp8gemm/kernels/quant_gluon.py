"""Gluon twins of the casts whose speed depends on a register layout Triton does not choose by itself.

The per-channel cast (:func:`fp8gemm.quant.per_channel_cast_to_fp8`) reduces each column of a
``[GRAN, BLOCK_N]`` tile over its rows.  Triton gives each thread 16 consecutive BF16 columns of 4 rows
(two 16-byte loads a row); here the layout is explicit (:class:`PerChannelConfig`) and the default gives
each thread 8 columns (one 16-byte load) of 8 rows, 8 threads a 128-byte row, the warps stacked along the
rows.  Measured on an H100 (benchmarks/RESULTS.md, session 5, 8192x7168 BF16): 69.3 µs against the Triton
kernel's 75.5 µs.  Laying the warps side by side along the columns instead (each column reduced inside
one warp, no barrier) was slower, 87-211 µs: a warp then reads 16-32 byte pieces of 16-32 rows.

Same device helpers as the Triton kernel (:mod:`fp8gemm.kernels.quant`), so the bytes are the same;
the Triton kernel stays the portable path and the interpreter-tested twin.  Importing this module never
fails: without Gluon, :func:`supports` is False.
"""
from __future__ import annotations

import dataclasses

import torch

from . import quant as KQ

try:  # pragma: no cover - depends on the installed triton
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    HAS_GLUON = True
except Exception:  # noqa: BLE001
    HAS_GLUON = False


@dataclasses.dataclass(frozen=True)
class PerChannelConfig:
    """A ``[gran, block_n]`` tile a program on ``warps`` warps; each thread holds ``vec`` consecutive
    columns of a row (16 bytes of BF16 input for ``vec`` 8), ``tpw_r`` of a warp's 32 threads stack along
    the rows and ``wpc_r`` of the warps.  ``block_n`` must equal ``vec * (32 // tpw_r) * (warps // wpc_r)``
    (no replicated columns) and ``tpw_r * wpc_r`` must divide the group's rows."""
    block_n: int = 64
    vec: int = 8
    tpw_r: int = 4
    wpc_r: int = 4
    warps: int = 4

    def valid_for(self, gran: int) -> bool:
        w = self.warps
        return (self.vec * (32 // self.tpw_r) * (w // self.wpc_r) == self.block_n and 32 % self.tpw_r == 0
                and w % self.wpc_r == 0 and gran % (self.tpw_r * self.wpc_r) == 0)


if HAS_GLUON:
    @gluon.jit
    def per_channel_cast_kernel(x_ptr, q_ptr, sf_ptr, M, N, stride_xm, stride_xn, stride_qm, stride_sm,
                                GRAN: gl.constexpr, BLOCK_N: gl.constexpr, VEC: gl.constexpr,
                                TPW_R: gl.constexpr, WPC_R: gl.constexpr, USE_UE8M0: gl.constexpr):
        """E4M3 codes + one FP32 scale per (GRAN rows, column); program ``pid`` takes column block
        ``pid % cdiv(N, BLOCK_N)`` of row band ``pid // cdiv(N, BLOCK_N)`` (band-major, as the Triton
        kernel)."""
        layout: gl.constexpr = gl.BlockedLayout([1, VEC], [TPW_R, 32 // TPW_R],
                                                [WPC_R, gl.num_warps() // WPC_R], [1, 0])
        pid = gl.program_id(0)
        n_blocks = gl.cdiv(N, BLOCK_N)
        band = pid // n_blocks
        rows = band * GRAN + gl.arange(0, GRAN, layout=gl.SliceLayout(1, layout))
        cols = (pid % n_blocks) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        rows64 = gl.expand_dims(rows.to(gl.int64), 1)
        cols2 = gl.expand_dims(cols, 0)
        mask = (gl.expand_dims(rows, 1) < M) & (cols2 < N)
        x = gl.load(x_ptr + rows64 * stride_xm + cols2 * stride_xn, mask=mask, other=0.0,
                    eviction_policy=KQ.STREAM_EVICT)
        sf, inv = KQ.scale_from_amax(KQ.group_amax(x, 0), 448.0, USE_UE8M0, True)
        q = KQ.e4m3_bytes(x.to(gl.float32) * gl.expand_dims(inv, 0), False)
        gl.store(q_ptr + rows64 * stride_qm + cols2, q, mask=mask)
        gl.store(sf_ptr + band.to(gl.int64) * stride_sm + cols, sf, mask=cols < N)


def per_channel_config(x: torch.Tensor, gran: int) -> PerChannelConfig:
    """The default tile: 64 columns of the group's rows on 4 warps stacked along the rows, 16 bytes of
    input a thread (8 BF16 or 4 FP32 columns), a warp's threads spread over whole 128-byte rows of BF16."""
    vec = max(1, 16 // x.element_size())
    tpw_c = 64 // vec
    return PerChannelConfig(block_n=64, vec=vec, tpw_r=32 // tpw_c, wpc_r=4, warps=4)


def supports(x: torch.Tensor) -> bool:
    """Whether the Gluon per-channel kernel can run on ``x``'s device (an SM90 GPU, no interpreter)."""
    from .. import runtime
    return HAS_GLUON and not runtime.interpreting() and x.is_cuda and runtime.is_sm90(x.device)


def launch_per_channel(x, q, sf, gran: int, use_ue8m0: bool, config: PerChannelConfig | None = None) -> None:
    """Arguments as :func:`fp8gemm.kernels.quant.launch_per_channel` (validated by the caller)."""
    m, n = x.shape
    cfg = config or per_channel_config(x, gran)
    if not cfg.valid_for(gran):
        raise ValueError(f"per-channel config {cfg} does not tile {gran} rows without replication")
    grid = (triton.cdiv(m, gran) * triton.cdiv(n, cfg.block_n),)
    per_channel_cast_kernel[grid](x, q.view(torch.uint8), sf, m, n, x.stride(0), x.stride(1), q.stride(0),
                                  sf.stride(0), GRAN=gran, BLOCK_N=cfg.block_n, VEC=cfg.vec, TPW_R=cfg.tpw_r,
                                  WPC_R=cfg.wpc_r, USE_UE8M0=use_ue8m0, num_warps=cfg.warps)


# -------------------------------------------------------------------------------------
# FP8 pre-dispatch (the MoE activation path): the row-group tile with 16 bytes a thread
# -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RowGroupConfig:
    """A ``[block_m, groups, gran]`` tile (rows, scale groups, a group's columns) on ``warps`` warps stacked
    along the rows; each thread holds ``vec`` consecutive columns (16 bytes of BF16 for 8)."""
    block_m: int = 16
    groups: int = 4
    vec: int = 8
    warps: int = 4

    def layout_dims(self, gran: int) -> tuple[int, int, int]:
        """(threads along the rows, along the groups, along a group) of one warp."""
        tpw_k = min(32, gran // self.vec)
        tpw_g = min(self.groups, 32 // tpw_k)
        return 32 // (tpw_k * tpw_g), tpw_g, tpw_k

    def valid_for(self, gran: int) -> bool:
        if gran % self.vec or (gran // self.vec) & (gran // self.vec - 1) or self.groups & (self.groups - 1):
            return False
        tpw_m, tpw_g, tpw_k = self.layout_dims(gran)
        return tpw_m * tpw_g * tpw_k == 32 and self.block_m % (tpw_m * self.warps) == 0 and tpw_k * self.vec == gran


if HAS_GLUON:
    @gluon.jit
    def pre_dispatch_fp8_kernel(x_ptr, idx_ptr, w_ptr, bx_ptr, bsf_ptr, bidx_ptr, bw_ptr,
                                num_tokens, capacity, hidden, topk,
                                stride_xm, stride_xk, stride_im, stride_ik, stride_wm, stride_wk,
                                stride_bxm, stride_bsm, stride_bim, stride_bwm,
                                BLOCK_M: gl.constexpr, GROUPS: gl.constexpr, GRAN: gl.constexpr,
                                TOPK_P2: gl.constexpr, VEC: gl.constexpr, TPW_M: gl.constexpr,
                                TPW_G: gl.constexpr, TPW_K: gl.constexpr,
                                SF_FP32: gl.constexpr, USE_UE8M0: gl.constexpr):
        """The FP8 branch of :func:`fp8gemm.kernels.moe_act.pre_dispatch_kernel` (same tiles, same bytes):
        tile t covers buffer rows ``[(t // tiles_g) * BLOCK_M, ...)`` and groups ``[(t % tiles_g) *
        GROUPS, ...)``; token rows get the cast, rows from ``num_tokens`` to ``capacity`` zeros, and the
        tiles of the first groups copy the rows' routing (``-1`` / ``0`` on padding rows)."""
        L3: gl.constexpr = gl.BlockedLayout([1, 1, VEC], [TPW_M, TPW_G, TPW_K], [gl.num_warps(), 1, 1], [2, 1, 0])
        L2: gl.constexpr = gl.SliceLayout(2, L3)                     # [BLOCK_M, GROUPS]
        tiles_g = gl.cdiv(gl.cdiv(hidden, GRAN), GROUPS)
        tile = gl.program_id(0)
        rows = (tile // tiles_g) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, L2))
        groups = (tile % tiles_g) * GROUPS + gl.arange(0, GROUPS, layout=gl.SliceLayout(0, L2))
        ks = gl.arange(0, GRAN, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        rows64 = rows.to(gl.int64)
        r3 = gl.expand_dims(gl.expand_dims(rows64, 1), 2)
        cols = gl.expand_dims(gl.expand_dims(groups, 0), 2) * GRAN + gl.expand_dims(gl.expand_dims(ks, 0), 1)
        token3 = gl.expand_dims(gl.expand_dims(rows < num_tokens, 1), 2)
        col_ok = cols < hidden
        x = gl.load(x_ptr + r3 * stride_xm + cols * stride_xk, mask=token3 & col_ok, other=0.0,
                    eviction_policy=KQ.ROWS_EVICT)
        sf, inv = KQ.scale_from_amax(KQ.group_amax(x, 2), 448.0, USE_UE8M0)
        q = KQ.e4m3_bytes(x.to(gl.float32) * gl.expand_dims(inv, 2), False)
        q = gl.where(token3, q, 0).to(gl.uint8)
        in_buf3 = gl.expand_dims(gl.expand_dims(rows < capacity, 1), 2)
        gl.store(bx_ptr + r3 * stride_bxm + cols, q, mask=in_buf3 & col_ok)
        token = gl.expand_dims(rows < num_tokens, 1)
        sf_offs = gl.expand_dims(rows64, 1) * stride_bsm + gl.expand_dims(groups, 0)
        sf_mask = gl.expand_dims(rows < capacity, 1) & gl.expand_dims(groups < gl.cdiv(hidden, GRAN), 0)
        if SF_FP32:
            gl.store(bsf_ptr + sf_offs, gl.where(token, sf, 0.0), mask=sf_mask)
        else:
            gl.store(bsf_ptr + sf_offs, gl.where(token, KQ.ue8m0_byte(sf), 0).to(gl.uint8), mask=sf_mask)

        if tile % tiles_g == 0:
            LR: gl.constexpr = gl.BlockedLayout([1, TOPK_P2], [32, 1], [gl.num_warps(), 1], [1, 0])
            r = (tile // tiles_g) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LR))
            k = gl.arange(0, TOPK_P2, layout=gl.SliceLayout(0, LR))
            r64 = gl.expand_dims(r.to(gl.int64), 1)
            k2 = gl.expand_dims(k, 0)
            k_ok = k2 < topk
            src = gl.expand_dims(r < num_tokens, 1) & k_ok
            ids = gl.load(idx_ptr + r64 * stride_im + k2 * stride_ik, mask=src, other=-1)
            ws = gl.load(w_ptr + r64 * stride_wm + k2 * stride_wk, mask=src, other=0.0)
            dst = gl.expand_dims(r < capacity, 1) & k_ok
            gl.store(bidx_ptr + r64 * stride_bim + k2, ids.to(bidx_ptr.dtype.element_ty), mask=dst)
            gl.store(bw_ptr + r64 * stride_bwm + k2, ws.to(gl.float32), mask=dst)


def pre_dispatch_config(capacity: int, hidden: int, gran: int, x: torch.Tensor) -> RowGroupConfig:
    """The Triton kernel's tile (:func:`fp8gemm.kernels.quant.row_group_config`) with 16 bytes a thread."""
    block_m, groups, warps = KQ.row_group_config(capacity, hidden, gran, x.element_size())
    vec = max(1, 16 // x.element_size())
    cfg = RowGroupConfig(block_m=block_m, groups=groups, vec=vec, warps=warps)
    while not cfg.valid_for(gran) and cfg.warps > 1:       # a short tile: fewer warps, no replicated rows
        cfg = dataclasses.replace(cfg, warps=cfg.warps // 2)
    return cfg


def supports_pre_dispatch(x: torch.Tensor, use_fp4_acts: bool) -> bool:
    """Whether the Gluon FP8 pre-dispatch can run: FP8 codes, an SM90 GPU, no interpreter."""
    return not use_fp4_acts and supports(x)


def launch_pre_dispatch_fp8(x, topk_idx, topk_weights, buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights,
                            num_tokens: int, group_size: int, fp32_scales: bool, use_ue8m0: bool,
                            config: RowGroupConfig | None = None) -> None:
    """Arguments as :func:`fp8gemm.kernels.moe_act.launch_pre_dispatch` (validated by the caller)."""
    capacity, hidden = buf_x.shape[0], x.shape[1]
    topk = buf_topk_idx.shape[1]
    cfg = config or pre_dispatch_config(capacity, hidden, group_size, x)
    if not cfg.valid_for(group_size):
        raise ValueError(f"pre-dispatch config {cfg} does not tile groups of {group_size} without replication")
    tpw_m, tpw_g, tpw_k = cfg.layout_dims(group_size)
    tiles = triton.cdiv(capacity, cfg.block_m) * triton.cdiv(triton.cdiv(hidden, group_size), cfg.groups)
    pre_dispatch_fp8_kernel[(tiles,)](
        x, topk_idx, topk_weights, buf_x.view(torch.uint8), buf_x_sf, buf_topk_idx, buf_topk_weights,
        num_tokens, capacity, hidden, topk,
        x.stride(0), x.stride(1), topk_idx.stride(0), topk_idx.stride(1), topk_weights.stride(0),
        topk_weights.stride(1), buf_x.stride(0), buf_x_sf.stride(0), buf_topk_idx.stride(0),
        buf_topk_weights.stride(0),
        BLOCK_M=cfg.block_m, GROUPS=cfg.groups, GRAN=group_size, TOPK_P2=triton.next_power_of_2(max(topk, 1)),
        VEC=cfg.vec, TPW_M=tpw_m, TPW_G=tpw_g, TPW_K=tpw_k, SF_FP32=fp32_scales, USE_UE8M0=use_ue8m0,
        num_warps=cfg.warps)
