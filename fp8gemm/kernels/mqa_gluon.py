"""Gluon (Triton's low-level dialect) warp-specialised MQA-logits prefill for Hopper (SM90).

Computes the plain (non-compressed) form of :func:`fp8gemm.reference.fp8_mqa_logits`::

    logit[i, j] = sum_h relu(q[i, h, :] . kv[j, :]) * w[i, h] * kv_scale[j]     for j in [ks[i], ke[i])

and -inf on the other positions of the key tiles a query block spans (with ``CLEAN``: on every other
position of the row).  Same MMA orientation as the Triton kernel (:func:`fp8gemm.kernels.mqa.mqa_logits_kernel`):
the keys are the MMA's M side (64 keys, ``[64, D]`` in shared memory), all heads of a few queries the N
side, so the head sum is a reduction along accumulator columns (inside a thread and its quad).

Structure (one persistent program per SM):

* a query block is ``BLOCK_Q = 256 // H`` queries = 256 (query, head) columns, split in two halves of 128
  columns, one per consumer warpgroup; both warpgroups read the same KV tile, so each KV byte that reaches
  the SM feeds 256 columns (as the Triton kernel's N = 256) while each warpgroup's accumulator stays at
  64 x 128 (64 registers a thread), small enough for **two** of them;
* a 1-warp **producer** partition walks the program's query blocks: q (both halves, TMA) into a
  double-buffered q slot, then the block's KV tiles ``[64, D]`` (TMA) into a ``STAGES``-deep ring
  (full/empty mbarriers); it also writes the -inf fill of ``CLEAN`` (columns outside the block's key range),
  which keeps those stores off the consumers;
* two **consumer** partitions (one warpgroup each, no partition-wide barrier couples them) issue one async
  ``warpgroup_mma`` per KV tile into scratch accumulators X/Y alternating by tile parity: the MMA of tile
  j+1 is issued before tile j's epilogue (``warpgroup_mma_wait(1)``), so the tensor cores run while the
  warpgroup computes ``relu(acc) * w``, the head sum, ``* kv_scale`` and the masked store; and the two
  warpgroups' MMAs queue behind each other on the tensor cores;
* weights and KV scales are read from global memory by the consumers (KV scales one tile ahead);
* query blocks are dealt out longest first (the causal pattern gives later queries more keys) in a
  boustrophedon order over the programs, so every program gets about the same number of keys.

Importing this module never fails: without Gluon (old Triton, interpreter) ``supports`` is False.
Host entry: :func:`supports` and :func:`launch`; the dispatcher is :func:`fp8gemm.attention._run_prefill`.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from .. import runtime

try:  # pragma: no cover - depends on the installed triton
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAS_GLUON = True
except Exception:  # noqa: BLE001
    HAS_GLUON = False

NUM_HEADS = (32, 64)
HEAD_DIMS = (64, 128)
BLOCK_KV = 64          # keys per tile: the MMA's M (one warpgroup)
HALF_N = 128           # (query, head) columns per consumer warpgroup
_SMEM_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True)
class MqaGluonConfig:
    block_q: int          # queries per block (both warpgroups): 2 * HALF_N // H
    stages: int           # KV ring depth
    producer_regs: int = 40
    num_warps: int = 4    # the default partition = consumer warpgroup 0

    @property
    def maxnreg(self) -> int:
        # 4 + 4 consumer warps + a producer warpgroup's share: 12 warps at launch, setmaxnreg moves them.
        return min(255, (65536 // (12 * 32)) // 8 * 8)


@functools.lru_cache(maxsize=None)
def config(num_heads: int, head_dim: int) -> MqaGluonConfig:
    q_bytes = 2 * 2 * HALF_N * head_dim          # two q slots of two halves
    stages = max(2, min(16, (_SMEM_BUDGET - q_bytes) // (BLOCK_KV * head_dim)))
    return MqaGluonConfig(block_q=2 * HALF_N // num_heads, stages=stages)


if HAS_GLUON:

    @gluon.jit
    def _block_at(r, pid, nprog, num_blocks):
        """Query block of round ``r`` for program ``pid`` (boustrophedon over the programs, longest first);
        ``valid`` is False past the last block."""
        lin = r * nprog + gl.where(r % 2 == 0, pid, nprog - 1 - pid)
        return num_blocks - 1 - lin, lin < num_blocks

    @gluon.jit
    def _query_keys(ks_ptr, ke_ptr, rq, seq_len, seq_len_kv):
        """Per query ``rq``: in range, and the keys it sees ``[start, end)`` clipped to the KV sequence."""
        q_ok = rq < seq_len
        ks = gl.load(ks_ptr + rq, mask=q_ok, other=0)
        ke = gl.load(ke_ptr + rq, mask=q_ok, other=0)
        return q_ok, gl.maximum(ks, 0), gl.minimum(ke, seq_len_kv)

    @gluon.jit
    def _key_range(ks_ptr, ke_ptr, q0, seq_len, seq_len_kv, NQ: gl.constexpr, BLOCK: gl.constexpr,
                   LAYOUT: gl.constexpr):
        """The key tiles of queries [q0, q0 + NQ): ``lo`` (a multiple of BLOCK) and ``hi`` (lo <= hi)."""
        q_ok, start, end = _query_keys(ks_ptr, ke_ptr, q0 + gl.arange(0, NQ, layout=LAYOUT), seq_len, seq_len_kv)
        busy = q_ok & (end > start)
        lo = gl.min(gl.where(busy, start, seq_len_kv), axis=0)
        hi = gl.max(gl.where(busy, end, 0), axis=0)
        lo = (lo // BLOCK) * BLOCK
        lo = gl.minimum(lo, hi)
        return lo, hi

    @gluon.jit
    def _producer(q_desc, kv_desc, q_bufs, kv_bufs, q_empty, q_full, kv_empty, kv_full,
                  ks_ptr, ke_ptr, out_ptr, seq_len, seq_len_kv, stride_out,
                  H: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, CLEAN: gl.constexpr):
        BK: gl.constexpr = kv_desc.block_type.shape[0]
        HN: gl.constexpr = q_desc.block_type.shape[0]
        q_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        FILL: gl.constexpr = 128
        fill_layout: gl.constexpr = gl.BlockedLayout([4], [32], [1], [0])
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        num_blocks = gl.cdiv(seq_len, BLOCK_Q)
        qi = 0
        it = 0
        for r in range(gl.cdiv(num_blocks, nprog)):
            blk, valid = _block_at(r, pid, nprog, num_blocks)
            if valid:
                q0 = blk * BLOCK_Q
                qs = qi % 2
                mbarrier.wait(q_empty.index(qs), ((qi // 2) & 1) ^ 1)
                mbarrier.expect(q_full.index(qs), 2 * q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [q0 * H, 0], q_full.index(qs), q_bufs.index(2 * qs))
                tma.async_copy_global_to_shared(q_desc, [q0 * H + HN, 0], q_full.index(qs), q_bufs.index(2 * qs + 1))
                qi += 1
                lo, hi = _key_range(ks_ptr, ke_ptr, q0, seq_len, seq_len_kv, BLOCK_Q, BK, q_layout)
                for k0 in range(lo, hi, BK):
                    s = it % STAGES
                    mbarrier.wait(kv_empty.index(s), ((it // STAGES) & 1) ^ 1)
                    mbarrier.expect(kv_full.index(s), kv_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(kv_desc, [k0, 0], kv_full.index(s), kv_bufs.index(s))
                    it += 1
                if CLEAN:
                    # The consumers write [lo, written); everything else of the block's rows is -inf.
                    written = gl.minimum(lo + gl.cdiv(hi - lo, BK) * BK, seq_len_kv)
                    neg = gl.full([FILL], float("-inf"), gl.float32, fill_layout)
                    rc = gl.arange(0, FILL, layout=fill_layout)
                    for i in range(BLOCK_Q):
                        if q0 + i < seq_len:
                            row = out_ptr + (q0 + i).to(gl.int64) * stride_out
                            for c0 in range(0, lo, FILL):
                                gl.store(row + c0 + rc, neg, mask=c0 + rc < lo)
                            for c0 in range(written, seq_len_kv, FILL):
                                gl.store(row + c0 + rc, neg, mask=c0 + rc < seq_len_kv)

    @gluon.jit
    def _issue(kv_bufs, kv_full, q_t, kvs_ptr, it, k0, seq_len_kv, acc, STAGES: gl.constexpr,
               SC_LAYOUT: gl.constexpr):
        """Wait for KV tile ``it`` (keys from ``k0``), start its MMA into ``acc`` (old value ignored);
        also start the load of the tile's KV scales (used by its epilogue, one tile later)."""
        BK: gl.constexpr = kv_bufs.type.shape[1]
        keys = k0 + gl.arange(0, BK, layout=SC_LAYOUT)
        sc = gl.load(kvs_ptr + keys, mask=keys < seq_len_kv, other=0.0)
        s = it % STAGES
        mbarrier.wait(kv_full.index(s), (it // STAGES) & 1)
        tok = warpgroup_mma(kv_bufs.index(s), q_t, acc, use_acc=False, is_async=True)
        return tok, sc

    @gluon.jit
    def _epilogue(tok, kv_empty, it, sc, k0, wv, start, end, q_ok, row_off, out_ptr, seq_len_kv, in_lo, in_hi,
                  H: gl.constexpr, STAGES: gl.constexpr, OUTSTANDING: gl.constexpr):
        """Wait for tile ``it``'s MMA (``OUTSTANDING`` newer ones stay in flight), free its KV stage, then
        ``sum_h relu(acc) * w`` per (key, query), ``* kv_scale``, -inf outside each query's range, store
        (without the range test and mask where the tile lies in every query's range: ``[in_lo, in_hi)``)."""
        acc = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(tok, ))
        mbarrier.arrive(kv_empty.index(it % STAGES), count=1)
        BK: gl.constexpr = acc.type.shape[0]
        HN: gl.constexpr = acc.type.shape[1]
        x = gl.maximum(acc, 0.0) * gl.expand_dims(wv, 0)
        logit = gl.sum(gl.reshape(x, [BK, HN // H, H]), axis=2)           # [keys, queries]
        keys = k0 + gl.arange(0, BK, layout=sc.type.layout)
        logit = logit * gl.expand_dims(sc, 1)
        keys2 = gl.expand_dims(keys, 1)
        if (k0 >= in_lo) & (k0 + BK <= in_hi):
            gl.store(out_ptr + gl.expand_dims(row_off, 0) + keys2, logit)
        else:
            valid = (keys2 >= gl.expand_dims(start, 0)) & (keys2 < gl.expand_dims(end, 0))
            logit = gl.where(valid, logit, float("-inf"))
            mask = (keys2 < seq_len_kv) & gl.expand_dims(q_ok, 0)
            gl.store(out_ptr + gl.expand_dims(row_off, 0) + keys2, logit, mask=mask)
        # The scratch registers go back to the next MMA only now (the caller reissues into them).
        return acc

    @gluon.jit
    def _consumer(kv_bufs, q_bufs, q_empty, q_full, kv_empty, kv_full,
                  kvs_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr, seq_len, seq_len_kv, stride_w, stride_out,
                  H: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr):
        BK: gl.constexpr = kv_bufs.type.shape[1]
        HN: gl.constexpr = q_bufs.type.shape[1]
        QW: gl.constexpr = HN // H                 # queries of this warpgroup
        num_warps: gl.constexpr = gl.num_warps()
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HN, 32])
        col_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        q_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        # The layout of the head-summed [keys, queries] tile, from a probe the compiler discards.
        probe = gl.sum(gl.reshape(gl.zeros([BK, HN], gl.float32, mma_layout), [BK, QW, H]), axis=2)
        key_layout: gl.constexpr = gl.SliceLayout(1, probe.type.layout)
        qry_layout: gl.constexpr = gl.SliceLayout(0, probe.type.layout)

        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        num_blocks = gl.cdiv(seq_len, BLOCK_Q)
        cols = gl.arange(0, HN, layout=col_layout)
        qi = 0
        it = 0
        X = gl.zeros([BK, HN], gl.float32, mma_layout)
        Y = gl.zeros([BK, HN], gl.float32, mma_layout)
        for r in range(gl.cdiv(num_blocks, nprog)):
            blk, valid = _block_at(r, pid, nprog, num_blocks)
            if valid:
                q0 = blk * BLOCK_Q
                qw0 = q0 + WG * QW
                # weights of this warpgroup's columns: column c is head c % H of query qw0 + c // H
                cq = qw0 + cols // H
                wv = gl.load(w_ptr + cq.to(gl.int64) * stride_w + cols % H, mask=cq < seq_len, other=0.0)
                rq = qw0 + gl.arange(0, QW, layout=qry_layout)
                q_ok, start, end = _query_keys(ks_ptr, ke_ptr, rq, seq_len, seq_len_kv)
                row_off = rq.to(gl.int64) * stride_out
                # key tiles inside every query's range of this warpgroup (none if one is past seq_len or empty)
                in_lo = gl.max(gl.where(q_ok, start, seq_len_kv), axis=0)
                in_hi = gl.min(gl.where(q_ok & (end > start), end, -1), axis=0)
                lo, hi = _key_range(ks_ptr, ke_ptr, q0, seq_len, seq_len_kv, BLOCK_Q, BK, q_layout)
                n = gl.cdiv(hi - lo, BK)

                qs = qi % 2
                mbarrier.wait(q_full.index(qs), (qi // 2) & 1)
                q_t = q_bufs.index(2 * qs + WG).permute((1, 0))        # [D, HN]
                qi += 1
                if n > 0:
                    # X holds even tiles, Y odd ones; tile t+1's MMA is in flight during tile t's epilogue.
                    xt, scX = _issue(kv_bufs, kv_full, q_t, kvs_ptr, it, lo, seq_len_kv, X, STAGES, key_layout)
                    for j in range(0, (n - 1) // 2):
                        t = it + 2 * j
                        kx = lo + 2 * j * BK
                        yt, scY = _issue(kv_bufs, kv_full, q_t, kvs_ptr, t + 1, kx + BK, seq_len_kv, Y, STAGES,
                                         key_layout)
                        X = _epilogue(xt, kv_empty, t, scX, kx, wv, start, end, q_ok, row_off, out_ptr,
                                      seq_len_kv, in_lo, in_hi, H, STAGES, 1)
                        xt, scX = _issue(kv_bufs, kv_full, q_t, kvs_ptr, t + 2, kx + 2 * BK, seq_len_kv, X, STAGES,
                                         key_layout)
                        Y = _epilogue(yt, kv_empty, t + 1, scY, kx + BK, wv, start, end, q_ok, row_off, out_ptr,
                                      seq_len_kv, in_lo, in_hi, H, STAGES, 1)
                    last = n - 1
                    if n % 2 == 0:
                        yt, scY = _issue(kv_bufs, kv_full, q_t, kvs_ptr, it + last, lo + last * BK, seq_len_kv, Y,
                                         STAGES, key_layout)
                        X = _epilogue(xt, kv_empty, it + last - 1, scX, lo + (last - 1) * BK, wv, start, end, q_ok,
                                      row_off, out_ptr, seq_len_kv, in_lo, in_hi, H, STAGES, 1)
                        Y = _epilogue(yt, kv_empty, it + last, scY, lo + last * BK, wv, start, end, q_ok,
                                      row_off, out_ptr, seq_len_kv, in_lo, in_hi, H, STAGES, 0)
                    else:
                        X = _epilogue(xt, kv_empty, it + last, scX, lo + last * BK, wv, start, end, q_ok,
                                      row_off, out_ptr, seq_len_kv, in_lo, in_hi, H, STAGES, 0)
                    it += n
                # every MMA reading this q slot has completed (wait 0 above)
                mbarrier.arrive(q_empty.index(qs), count=1)

    @gluon.jit
    def mqa_logits_ws_kernel(q_desc, kv_desc, kvs_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr,
                             seq_len, seq_len_kv, stride_w, stride_out,
                             H: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr,
                             CLEAN: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """Persistent warp-specialised MQA logits (see the module docstring).

        ``q_desc``: TMA over q as [seq_len * H, D] with [128, D] boxes (one consumer warpgroup's columns);
        ``kv_desc``: TMA over kv [seq_len_kv, D] with [64, D] boxes.  ``num_warps`` must be 4.
        """
        gl.static_assert(BLOCK_Q * H == 2 * q_desc.block_type.shape[0])
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [4] + q_desc.block_type.shape, q_desc.layout)
        kv_bufs = gl.allocate_shared_memory(kv_desc.dtype, [STAGES] + kv_desc.block_type.shape, kv_desc.layout)
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_empty.index(i), count=2)     # one arrive per consumer warpgroup
            mbarrier.init(q_full.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(kv_empty.index(i), count=2)
            mbarrier.init(kv_full.index(i), count=1)
        WG_REGS: gl.constexpr = (65536 // 32 - 4 * PRODUCER_REGS) // 8 // 8 * 8
        gl.warp_specialize([
            (_consumer, (kv_bufs, q_bufs, q_empty, q_full, kv_empty, kv_full,
                         kvs_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr, seq_len, seq_len_kv, stride_w, stride_out,
                         H, BLOCK_Q, STAGES, 0)),
            (_consumer, (kv_bufs, q_bufs, q_empty, q_full, kv_empty, kv_full,
                         kvs_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr, seq_len, seq_len_kv, stride_w, stride_out,
                         H, BLOCK_Q, STAGES, 1)),
            (_producer, (q_desc, kv_desc, q_bufs, kv_bufs, q_empty, q_full, kv_empty, kv_full,
                         ks_ptr, ke_ptr, out_ptr, seq_len, seq_len_kv, stride_out, H, BLOCK_Q, STAGES, CLEAN)),
        ], [4, 1], [WG_REGS, PRODUCER_REGS])


# =====================================================================================
# Host side
# =====================================================================================

def _tma_ok(t: torch.Tensor) -> bool:
    if t.stride(-1) != 1 or t.data_ptr() % 16 != 0:
        return False
    es = t.element_size()
    return all((s * es) % 16 == 0 for s in t.stride()[:-1])


def supports(q, kv, kv_sf, weights, ks, ke, clean_logits: bool, max_seqlen_k: int) -> bool:
    """True when the Gluon kernel can run this (validated) prefill call on this device."""
    if not HAS_GLUON or runtime.interpreting() or max_seqlen_k != 0:
        return False
    try:
        if not (q.is_cuda and runtime.is_sm90(q.device)):
            return False
        seq_len, h, d = q.shape
        if h not in NUM_HEADS or d not in HEAD_DIMS:
            return False
        if not (q.is_contiguous() and kv.is_contiguous() and kv_sf.is_contiguous()):
            return False
        if weights.stride(1) != 1 or kv_sf.dtype != torch.float32 or weights.dtype != torch.float32:
            return False
        return _tma_ok(q.view(seq_len * h, d)) and _tma_ok(kv)
    except Exception:  # noqa: BLE001 - any odd object means "not for us"
        return False


@functools.lru_cache(maxsize=None)
def _nvmma(block: tuple):
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.float8e4nv)


def _desc2d(t: torch.Tensor, rows: int, block: tuple):
    """TMA descriptor over ``t`` as a 2-D [rows, D] matrix, without the dataclass' checks (``supports``)."""
    desc = object.__new__(TensorDescriptor)
    desc.base = t
    desc.shape = [rows, t.shape[-1]]
    desc.strides = [t.shape[-1], 1]
    desc.block_shape = list(block)
    desc.layout = _nvmma(block)
    desc.padding = "zero"
    return desc


def launch(q, kv, kv_sf, weights, ks, ke, out, clean_logits: bool, num_sms: int,
           cfg: MqaGluonConfig | None = None) -> None:
    """Fill ``out`` [seq_len, seq_len_kv] (row stride ``out.stride(0)``) with the logits; arguments validated
    and checked by :func:`supports`.  No host synchronisation: safe under CUDA-graph capture."""
    seq_len, h, d = q.shape
    seq_len_kv = kv.shape[0]
    if seq_len == 0 or seq_len_kv == 0:
        return
    cfg = cfg or config(h, d)
    q_desc = _desc2d(q, seq_len * h, (HALF_N, d))
    kv_desc = _desc2d(kv, seq_len_kv, (BLOCK_KV, d))
    num_blocks = triton.cdiv(seq_len, cfg.block_q)
    grid = (max(1, min(num_sms, num_blocks)),)
    mqa_logits_ws_kernel[grid](
        q_desc, kv_desc, kv_sf, weights, ks, ke, out,
        seq_len, seq_len_kv, weights.stride(0), out.stride(0),
        H=h, BLOCK_Q=cfg.block_q, STAGES=cfg.stages, CLEAN=bool(clean_logits),
        PRODUCER_REGS=cfg.producer_regs, num_warps=cfg.num_warps, maxnreg=cfg.maxnreg)
