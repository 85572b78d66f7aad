"""Dense FP8 GEMMs with few rows (decode, m <= 128): swap-A/B tiles split along K.

``D[m, n] = sum_kb (A[m, kb] . B[n, kb]) * sfa[m, kb] * sfb[n // 128, kb]`` (the 1D2D recipe,
:func:`fp8gemm.reference.fp8_gemm_nt`) when A has a handful of rows is a stream over the weights B.  The
persistent kernels give each SM whole column tiles of B, so with N = 2112 a 16-wide column tile is one
SM's whole share, and each 128-K step of it moves only 2 KB of weights for the fixed cost of a pipeline
step: the weights stream at ~750 GB/s (H100; ~500 cycles a step, our reading of that rate).  Here the
weights sit on the MMA's 64/128-row side (swap-A/B: ``part[n, m] = B_tile . A_tile^T``, 8-16 KB of
weights a step) and the K range is split over ``SPLIT`` programs per column block so that the grid still
covers the SMs.

Split-K reduction without a second launch: each program stores its FP32 partial tile in a workspace,
then adds 1 to its column block's counter (``acq_rel``); the program that brings the counter to
``SPLIT`` sums the partials (L1-bypassing loads), writes D and resets the counter to 0 for the next call.
The counters are always left at zero; eager calls reuse one set per (device, stream), and every call captured
into a CUDA graph gets its own (see :func:`_counters`), so no two launches that can run at the same time
share them.

Host entry: :func:`supports`, :func:`plan` and :func:`launch` (arguments validated by ``fp8gemm.gemm``).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

BLOCK_K = 128
_BK = tl.constexpr(BLOCK_K)        # the same, for the kernel


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    """``block_n`` weight rows a program (64 or 128: one B scale block), ``block_m`` token columns (16, 32, 64
    or 128; more rows than that take several token blocks), ``split`` programs along K per column block."""
    block_n: int = 64
    block_m: int = 16
    split: int = 1
    num_warps: int = 4
    num_stages: int = 6


@triton.jit
def skinny_gemm_kernel(a_ptr, sfa_ptr, b_ptr, sfb_ptr, d_ptr, ws_ptr, cnt_ptr, M, N, K,
                       stride_am, stride_ak, stride_bn, stride_bk, stride_dm, stride_dn,
                       stride_sam, stride_sak, stride_sbn, stride_sbk, slices_per_split,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr):
    """Program (pn, ps, pm): weight rows ``[pn * BLOCK_N, ...)``, 128-K slices ``[ps * slices_per_split,
    ...)``, token rows ``[pm * BLOCK_M, ...)``."""
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    pm = tl.program_id(2)
    n_blocks = tl.num_programs(0)
    kb0 = ps * slices_per_split
    kb1 = tl.minimum(kb0 + slices_per_split, K // _BK)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, _BK)
    n_ok = offs_n < N
    m_ok = offs_m < M
    b_rows = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn
    a_cols = a_ptr + offs_m[None, :].to(tl.int64) * stride_am
    sb_ptr = sfb_ptr + ((pn * BLOCK_N) // 128) * stride_sbn           # the block lies in one scale block
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for kb in range(kb0, kb1):
        k = kb * _BK + offs_k
        w = tl.load(b_rows + k[None, :] * stride_bk, mask=n_ok[:, None], other=0.0)
        x = tl.load(a_cols + k[:, None] * stride_ak, mask=m_ok[None, :], other=0.0)
        part = tl.dot(w, x)                                             # [BLOCK_N, BLOCK_M]
        sw = tl.load(sb_ptr + kb * stride_sbk)
        sx = tl.load(sfa_ptr + offs_m * stride_sam + kb * stride_sak, mask=m_ok, other=0.0)
        acc += part * (sx * sw)[None, :]
    d_ptrs = d_ptr + offs_m[None, :].to(tl.int64) * stride_dm + offs_n[:, None] * stride_dn
    d_mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT == 1:
        tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty), mask=d_mask)
    else:
        m_blocks = tl.num_programs(2)
        tile = ((pm * n_blocks * BLOCK_N + offs_n[:, None]) * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]).to(tl.int64)
        plane = m_blocks * n_blocks * BLOCK_N * BLOCK_M
        cnt_ptr += pm * n_blocks
        tl.store(ws_ptr + ps * plane + tile, acc)
        # Every thread's partial is stored before the counter's release (the barrier), and the last
        # arriver's loads come after its acquire; .cg keeps them off the (incoherent) L1.
        tl.debug_barrier()
        prev = tl.atomic_add(cnt_ptr + pn, 1, sem="acq_rel", scope="gpu")
        if prev == SPLIT - 1:
            total = tl.load(ws_ptr + tile, cache_modifier=".cg")
            for s in range(1, SPLIT):
                total += tl.load(ws_ptr + s * plane + tile, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + pn, 0, sem="relaxed", scope="gpu")
            tl.store(d_ptrs, total.to(d_ptr.dtype.element_ty), mask=d_mask)


_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, at least ``n``, that no other launch can be using at the same time (the kernel
    leaves them at zero).  Eager calls share one set per (device, stream): calls on one stream run one after
    another.  A call being captured into a CUDA graph gets its own set (a zero-fill node in the graph):
    graphs may be replayed on several streams at once, so they must not share counters with each other or
    with eager calls."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (device.index if device.type == "cuda" else -1, device.type,
           torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    cnt = _COUNTERS.get(key)
    if cnt is None or cnt.numel() < n:         # a smaller old set is freed in stream order, as any tensor
        cnt = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = cnt
    return cnt


def supports(a, sfa, b, sfb, d, c=None) -> bool:
    """Dense FP8 x FP8 with FP32 scales (A per row per 128 K, B per 128 x 128), K a multiple of 128, at most
    128 rows, no C, BF16 or FP32 output."""
    fp8 = torch.float8_e4m3fn
    return (c is None and a.dim() == 2 and a.dtype == fp8 and b.dtype == fp8 and sfa is not None
            and sfb is not None and sfa.dtype == torch.float32 and sfb.dtype == torch.float32
            and a.shape[0] <= 128 and a.shape[1] % BLOCK_K == 0 and a.shape[1] > 0 and b.shape[0] > 0
            and d.dtype in (torch.bfloat16, torch.float32))


def pays(m: int, n: int, k: int, num_sms: int) -> bool:
    """Whether this kernel beats the warp-specialised Gluon one.  Measured on an H100 (benchmarks/RESULTS.md,
    session 5, ``benchmarks/skinny_ab.py``, the planned config against the Gluon kernel): one row, every
    DeepSeek shape 1.02-1.49x; 4-128 rows where the 64 x 64 (weights x tokens) tiles fill at most half the SMs
    (n 576-4096) 0.98-1.60x.  Since the Gluon kernel takes A's scales through shared memory (session 9, H200,
    ``benchmarks/sa_smem_ab.py``) it is 1.04-1.34x faster than this one at 64 and 128 rows on every shape this
    took, so this keeps at most 32 rows (33-64 rows run the same 64-row tiles in both kernels as 64 do)."""
    return m == 1 or (m <= 32 and 2 * triton.cdiv(n, 64) * triton.cdiv(m, 64) <= num_sms)


def plan(m: int, n: int, k: int, num_sms: int) -> SkinnyConfig:
    """64 weight rows and up to 64 tokens a program; the K split that brings the programs closest to two per
    SM (one per SM for K < 4096: at K 2048 the split programs were slower), keeping at least eight 128-K slices
    a program; 4 stages where a program has no more than 4 slices or the token tile is 32 wide or more (its A
    stage grows).  Measured best or within 3% of the best split and depth on every shape it is picked for
    (RESULTS.md, session 5)."""
    block_n = 64
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    slices = k // BLOCK_K
    target = 2 * num_sms if slices >= 32 else num_sms
    split = max(1, min(round(target / tiles), slices // 8))
    stages = 4 if triton.cdiv(slices, split) <= 4 or block_m >= 32 else 6
    return SkinnyConfig(block_n=block_n, block_m=block_m, split=split, num_stages=stages)


def launch(a, sfa, b, sfb, d, num_sms: int, config: SkinnyConfig | None = None) -> SkinnyConfig:
    m, k = a.shape
    n = b.shape[0]
    cfg = config or plan(m, n, k, num_sms)
    if cfg.block_n not in (64, 128) or cfg.block_m not in (16, 32, 64, 128):
        raise ValueError(f"skinny GEMM config {cfg}: block_n must be 64 or 128, block_m 16, 32, 64 or 128")
    slices = k // BLOCK_K
    per = triton.cdiv(slices, cfg.split)
    split = triton.cdiv(slices, per)                 # no empty splits
    n_blocks = triton.cdiv(n, cfg.block_n)
    m_blocks = triton.cdiv(m, cfg.block_m)
    if split > 1:
        ws = torch.empty(split * m_blocks * n_blocks * cfg.block_n * cfg.block_m, dtype=torch.float32,
                         device=a.device)
        cnt = _counters(a.device, m_blocks * n_blocks)
    else:
        ws = cnt = d
    skinny_gemm_kernel[(n_blocks, split, m_blocks)](
        a, sfa, b, sfb, d, ws, cnt, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), d.stride(0), d.stride(1),
        sfa.stride(0), sfa.stride(1), sfb.stride(0), sfb.stride(1), per,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, SPLIT=split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dataclasses.replace(cfg, split=split)
