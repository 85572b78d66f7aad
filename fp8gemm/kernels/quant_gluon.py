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

from .. import runtime
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
