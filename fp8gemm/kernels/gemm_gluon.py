"""Gluon (Triton's low-level dialect) warp-specialised FP8 GEMM for Hopper (SM90), 1D2D scaling.

Computes ``D = C + A @ B.T`` exactly as :func:`fp8gemm.reference.fp8_gemm_nt` (dense),
:func:`fp8gemm.reference.m_grouped_fp8_gemm_nt_masked` and
:func:`fp8gemm.reference.m_grouped_fp8_gemm_nt_contiguous` define it.

Structure of the kernel (one persistent program per SM, at most ``num_sms`` programs):

* a 1-warp **producer** partition walks the program's tiles and streams 128-wide K slices of A
  ([BLOCK_M, 128]) and B ([BLOCK_N, 128]) with TMA into a ``STAGES``-deep shared-memory ring
  (``full``/``empty`` mbarriers per stage);
* the **consumer** (default partition, one or two warpgroups) issues one async ``warpgroup_mma``
  (QGMMA) per K slice into a scratch accumulator, and while the tensor cores run slice k it
  promotes slice k-1 into the FP32 result: ``acc += partial * sfa[row, k] * sfb[n_block, k]``
  (``warpgroup_mma_wait(num_outstanding=1)``); the scratch registers of slice k-2 are reused as
  the input of slice k's MMA (``use_acc=False``), so no zeroing is spent per slice;
* epilogue: BF16 output goes through shared memory and a TMA store (overlapping the next tile's main
  loop; the grouped modes store their full blocks so, partial ones and FP32/``c`` outputs through masked
  vector stores); a masked call with SBO signals hands each finished tile (a TMA-stored one at the next
  tile's epilogue, once its writes are complete) to a third partition, the signal warp
  (:func:`_signaller`), which bumps the tile's counter with a release atomic at GPU scope;
* tiles: BLOCK_M 64 (one consumer warpgroup) or 128 (two), BLOCK_N 16..128, chosen per shape by
  :func:`pick_config` (narrow tiles give small-M shapes enough programs); scale factors are read
  in any strides straight from global memory, two K-slices ahead of their use;
* opt-in (``GluonConfig.wide_n``, :func:`wide_config`, :data:`WIDE_N_DEFAULT` off): dense 128x256 tiles
  with two independent one-warpgroup consumer partitions, each 64x256 as two 128-wide halves through one
  scratch accumulator (:func:`_consumer_wide`): 25% fewer operand bytes per FLOP than 128x128.
* opt-in only (:func:`split_config`, never picked): the same structure with one half, a 128x128 tile whose two
  warpgroups are independent 64x128 partitions promoting in DeepGEMM's order (MMA, wait(0), release, promote).
* a ragged N (``N = 128 q + r``): where it saves a wave, :func:`pick_config` gives dense calls the remainder-tail
  tile (``GluonConfig.bn_tail``, :func:`tail_config`, :func:`_consumer_tail`): q tile columns, each a 128-wide
  block plus a 16-wide slice of the remainder; otherwise, where the remainder's own tiles cost a wave,
  :func:`launch` runs the full blocks and the remainder as two launches on two streams
  (:func:`split_n_columns`).
* programmatic dependent launch (``PDL_WAIT``, ``launch(..., pdl=True)``; the FP4 route launches it right
  after the convert kernel that writes A and its scales): the programs start while that kernel runs, the
  producer prefetches the first tile's first B stages, then every partition executes ``griddepcontrol.wait``
  before it touches A or the A scales.
* diagnostics only (``benchmarks/gluon_probe.py``; both off by default, off = the production SASS): ``PROBE``
  (%clock64 stamps of the main loop) and ``DIAG`` (modes that each remove one suspect of the slice period:
  L2-resident operands, no stage refill, no promotion, both; see :data:`DIAG_MODES`); the wide/split kernels
  take ``PROBE`` and ``DIAG`` 3.

Measured numbers and the history of each version: ``benchmarks/GLUON_NOTES.md``.

Modes: ``dense`` (A [M, K]), ``masked`` (A [G, max_m, K], rows < masked_m[g]),
``contiguous`` (A [M_total, K], expert id per row, -1 rows untouched).
Importing this module never fails: without Gluon (old Triton, interpreter) ``supports`` is False.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .. import runtime

try:  # pragma: no cover - depends on the installed triton
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAS_GLUON = True
except Exception:  # noqa: BLE001
    HAS_GLUON = False

if HAS_GLUON:
    _GL_DTYPES_INIT = {"fp8": gl.float8e4nv, "bf16": gl.bfloat16}
else:
    _GL_DTYPES_INIT = {}

MODE_DENSE = 0
MODE_MASKED = 1
MODE_CONTIGUOUS = 2
_MODES = {"dense": MODE_DENSE, "masked": MODE_MASKED, "contiguous": MODE_CONTIGUOUS}

BLOCK_K = 128
# Grouped GEMMs under PDL (the FP4 convert route) store full blocks by TMA too: test_pdl_gpu.py's "grouped_tma"
# variant passed on an H200 (session 9), so it is on.
GROUPED_TMA_STORE_UNDER_PDL = True
# Masked calls with an SBO signal store their full blocks by TMA too (each signalled once its store's writes are
# complete); False: register stores for every block of a signalled call (the kernel before session 11).
SIGNAL_TMA_STORE = True
# Masked calls with an SBO signal bump their counters from a separate signal warp (SIG_WARP, _signaller) instead of
# the consumer (whose release atomic stalled its warpgroup every tile); False: the consumer signals.
SIGNAL_WARP = True
SIG_SLOTS = 8        # tiles a program's consumer may hand off ahead of its signal warp
_SMEM_BUDGET = 220 * 1024     # of the 227 KB an H100/H200 block may use; the rest is barriers and scratch
_SMEM_LIMIT = 227 * 1024      # what a block may use at all (the launch fails above it)
# A's scales through shared memory (SA_SMEM) when the call's own config does not say (GluonConfig.sa_smem None)
# and FP8GEMM_GLUON_SA_SMEM is unset.  H200, benchmarks/sa_smem_ab.py (RESULTS.md session 9), against the same
# scales loaded by the consumer: with MN-major scales (DeepGEMM's layout) 1.30-1.36x faster at m = 64/128 on the
# k = 7168 rows (1.01-1.24x on the others) and 1.03-1.12x at m = 4096 (n576 level: its tail kernel has no
# SA_SMEM); with row-major scales 1.13-1.17x faster at m = 64/128 on the k = 7168 rows (within 2.6% elsewhere)
# and up to 7% slower at m = 4096 (each row's 128 scales then come from 128 rows).  Grouped calls with MN-major
# scales: masked 1.01-1.10x and contiguous 1.03-1.05x faster (row-major: up to 14% slower, so those stay off).
SA_SMEM_ROW_MAJOR_MAX_M = 256
SA_SMEM_GROUPED = True
# Larger dense and contiguous calls with row-major A scales: copy the scales MN-major first (one PyTorch copy
# kernel, ~1-7 MB) and run SA_SMEM.  H200, benchmarks/sa_smem_ab.py (RESULTS.md session 10), copy + kernel against
# the plain kernel on the row-major scales at m = 4096: 1.05-1.09x faster at k = 7168/16384 (contiguous g8
# 1.08x), 1.02x at k = 1536/2048 dense, level on contiguous g4 k = 2048; the predicted 3-9% held.
TRANSPOSE_ROW_MAJOR_FOR_SA = True

# Cycle probe (``PROBE=True``, diagnostics only: benchmarks/gluon_probe.py).  int64 buffer, per program
# PROBE_ROWS rows of PROBE_SLICES x PROBE_EVENTS timestamps: row 0/1 = consumer warpgroup 0/1, row 2 = the
# producer warp, row 3 = header (PROBE_HDR_*).  Slot [row, s, e] = %clock64 of event e for the program's
# s-th K-slice (counted over its tiles, s < PROBE_SLICES); 0 = not reached.
PROBE_SLICES = 32
PROBE_EVENTS = 8
PROBE_ROWS = 4
PROBE_CTA_STRIDE = PROBE_ROWS * PROBE_SLICES * PROBE_EVENTS
assert PROBE_SLICES == 32    # spelled out in _stamp's PTX
# consumer events (slice s): before the partition bar.sync that precedes the full-barrier wait, after it,
# after the wait, after the MMA issue (commit), after warpgroup_mma_wait of s, after the empty arrive of s,
# after the promotion of s
EV_C_PRE_BAR, EV_C_PRE_WAIT, EV_C_FULL, EV_C_ISSUED, EV_C_MMA_DONE, EV_C_ARRIVED, EV_C_PROMOTED = range(7)
# The wide/split consumer (_consumer_wide: one partition per warpgroup, wait(0)) stamps the same events PER SLICE:
# pre_bar / pre_wait around the explicit bar.sync of its 4-warp partition before the full wait, full after it;
# issued / mma_done around the slice's LAST MMA (split: its only one; wide: the right half's) and its wait(0);
# arrived after the empty arrive; promoted after the promotion that follows the arrive (64 FFMA a thread in both).
# Wide only (two MMAs a slice): EV_C_HALF = after the left half's MMA, wait(0) and promotion (full -> half = the
# left half; half -> issued = the right MMA's issue).
EV_C_HALF = 7
# producer events (slice s): before the empty-barrier wait, after it, after both TMA issues
EV_P_PRE_WAIT, EV_P_EMPTY, EV_P_ISSUED = range(3)
# header row (consumer warpgroup 0): clock64 and globaltimer (ns) at the consumer's start and end, %smid;
# clock64 at the producer's start (its writer thread)
PROBE_HDR_CLK0, PROBE_HDR_NS0, PROBE_HDR_CLK1, PROBE_HDR_NS1, PROBE_HDR_SMID, PROBE_HDR_PCLK0 = range(6)

# Diagnostic modes (``DIAG``, dense 128xN default kernel; the wide/split kernels mode 3 only; diagnostics only:
# ``benchmarks/gluon_probe.py --diag``).  Each removes one suspect of the main loop's slice period; the output is
# garbage in every mode but DIAG_OFF.  DIAG_OFF (0) compiles to the production kernel (byte-identical SASS, AOT-tested).
DIAG_OFF = 0
DIAG_L2_RESIDENT = 1   # producer loads every K-slice from K coordinate 0: same TMA/smem bytes, L2 hits only
DIAG_NO_REFILL = 2     # producer fills each stage once (its first STAGES slices), then only arrives on full
DIAG_NO_PROMOTE = 3    # consumer: MMAs, waits and releases as usual, no scale loads and no promotion FFMAs
DIAG_MMA_ONLY = 4      # DIAG_NO_REFILL + DIAG_NO_PROMOTE: the MMA + barrier loop alone
DIAG_NO_SCALE_LOADS = 5  # promotion FFMAs as in production, scales computed in registers (no global loads)
DIAG_NO_SFA_LOADS = 6    # as 5 for A's scales only (B's loaded as in production)
DIAG_NO_SFB_LOADS = 7    # as 5 for B's scales only (A's loaded as in production)
DIAG_NO_GLOBAL_STORE = 8  # the epilogue converts and writes the tile to shared memory but issues no TMA store
DIAG_MODES = (DIAG_OFF, DIAG_L2_RESIDENT, DIAG_NO_REFILL, DIAG_NO_PROMOTE, DIAG_MMA_ONLY, DIAG_NO_SCALE_LOADS,
              DIAG_NO_SFA_LOADS, DIAG_NO_SFB_LOADS, DIAG_NO_GLOBAL_STORE)


if HAS_GLUON:

    _SIG_SLOTS = gl.constexpr(SIG_SLOTS)

    # ---------------- cycle probe (PROBE=True only; nothing of it is emitted otherwise) ----------------
    _PR_ROW = gl.constexpr(PROBE_SLICES * PROBE_EVENTS)
    _PR_CTA = gl.constexpr(PROBE_CTA_STRIDE)
    _PR_EVENTS = gl.constexpr(PROBE_EVENTS)
    _EV_C_PRE_BAR = gl.constexpr(EV_C_PRE_BAR)
    _EV_C_PRE_WAIT = gl.constexpr(EV_C_PRE_WAIT)
    _EV_C_FULL = gl.constexpr(EV_C_FULL)
    _EV_C_ISSUED = gl.constexpr(EV_C_ISSUED)
    _EV_C_MMA_DONE = gl.constexpr(EV_C_MMA_DONE)
    _EV_C_ARRIVED = gl.constexpr(EV_C_ARRIVED)
    _EV_C_PROMOTED = gl.constexpr(EV_C_PROMOTED)
    _EV_C_HALF = gl.constexpr(EV_C_HALF)
    _EV_P_PRE_WAIT = gl.constexpr(EV_P_PRE_WAIT)
    _EV_P_EMPTY = gl.constexpr(EV_P_EMPTY)
    _EV_P_ISSUED = gl.constexpr(EV_P_ISSUED)
    _HDR_CLK0 = gl.constexpr(PROBE_HDR_CLK0)
    _HDR_NS0 = gl.constexpr(PROBE_HDR_NS0)
    _HDR_CLK1 = gl.constexpr(PROBE_HDR_CLK1)
    _HDR_NS1 = gl.constexpr(PROBE_HDR_NS1)
    _HDR_SMID = gl.constexpr(PROBE_HDR_SMID)
    _HDR_PCLK0 = gl.constexpr(PROBE_HDR_PCLK0)

    @gluon.jit
    def _probe_row(probe_ptr, PRODUCER: gl.constexpr, ROW: gl.constexpr = -1):
        """This thread's row of the probe buffer and whether it writes: one thread per consumer warpgroup
        (rows 0/1: threads 0 and 128 of the default partition, which holds warps 0..num_warps-1) and lane 0 of
        the producer warp (row 2).  ``ROW`` >= 0 (the one-warpgroup partitions of ``_consumer_wide``): that row,
        written by the partition's first thread (a warpgroup-aligned partition: %tid.x a multiple of 128)."""
        tid = gl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r", [], dtype=gl.int32, is_pure=True, pack=1)
        if PRODUCER:
            row = tid * 0 + 2
            writer = (tid % 32 == 0).to(gl.int32)
        elif ROW >= 0:
            row = tid * 0 + ROW
            writer = (tid % 128 == 0).to(gl.int32)
        else:
            row = tid // 128
            writer = (tid % 128 == 0).to(gl.int32)
        base = probe_ptr + gl.program_id(0) * _PR_CTA + row * _PR_ROW
        return base, writer, row

    @gluon.jit
    def _stamp(base, writer, slot, EV: gl.constexpr, SRC: gl.constexpr = 0):
        """Read a clock first (``SRC`` 0: ``%clock64``, 1: ``%globaltimer`` ns, 2: ``%smid``), then store it
        at ``base[slot * PROBE_EVENTS + EV]`` from the writer thread when ``slot < PROBE_SLICES`` (32).
        Not pure: LLVM keeps it in order with the other side-effecting operations (barrier waits/arrives,
        wgmma fence/commit/wait)."""
        if SRC == 2:
            head: gl.constexpr = "{ .reg .u32 t; mov.u32 t, %smid; cvt.u64.u32 $0, t; "
        elif SRC == 1:
            head: gl.constexpr = "{ mov.u64 $0, %globaltimer; "
        else:
            head: gl.constexpr = "{ mov.u64 $0, %clock64; "
        return gl.inline_asm_elementwise(
            head + ".reg .pred p; setp.lt.u32 p, $2, 32; setp.ne.and.b32 p, $3, 0, p; @p st.global.b64 [$1], $0; }",
            "=l,l,r,r", [base + (slot * _PR_EVENTS + EV), slot, writer], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _num_tiles(M, N, G, masked_m_ptr, MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        num_n = gl.cdiv(N, BLOCK_N)
        if MODE == 1:
            total = gl.to_tensor(0)
            for g in range(G):
                rows = gl.minimum(gl.load(masked_m_ptr + g), M)
                total += gl.cdiv(rows, BLOCK_M) * num_n
        else:
            total = gl.cdiv(M, BLOCK_M) * num_n
        return total

    @gluon.jit
    def _first_group_count(M, N, masked_m_ptr, MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        if MODE == 1:
            cnt = gl.cdiv(gl.minimum(gl.load(masked_m_ptr), M), BLOCK_M) * gl.cdiv(N, BLOCK_N)
        else:
            cnt = gl.to_tensor(0)
        return cnt

    @gluon.jit
    def _walk_start(M, N, G, masked_m_ptr, MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """The persistent walk over the tiles of N columns: ``(total tiles, cursor)``, the cursor being the
        ``(group, its first tile, its tile count)`` that :func:`_locate` advances."""
        total = _num_tiles(M, N, G, masked_m_ptr, MODE, BLOCK_M, BLOCK_N)
        return (total, gl.to_tensor(0), gl.to_tensor(0),
                _first_group_count(M, N, masked_m_ptr, MODE, BLOCK_M, BLOCK_N))

    @gluon.jit
    def _locate(t, cur_g, cur_base, cur_cnt, M, N, G, masked_m_ptr, m_indices_ptr,
                MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                IDX_LAYOUT: gl.constexpr):
        """Tile ``t`` of the persistent walk -> (group, m-block, n-block, first A row, valid, cursor).

        Masked mode enumerates only the m-blocks below ``masked_m[g]``; the cursor (group, first tile
        of the group, tiles in the group) only moves forward because ``t`` increases.
        """
        num_n = gl.cdiv(N, BLOCK_N)
        if MODE == 1:
            while t >= cur_base + cur_cnt:
                cur_base += cur_cnt
                cur_g += 1
                cur_cnt = gl.cdiv(gl.minimum(gl.load(masked_m_ptr + cur_g), M), BLOCK_M) * num_n
            local = t - cur_base
            num_m_g = cur_cnt // num_n
            m_blk = local % num_m_g
            n_blk = local // num_m_g
            g = cur_g
            row_a = g * M + m_blk * BLOCK_M
            valid = t >= 0
        else:
            num_m = gl.cdiv(M, BLOCK_M)
            if GROUP_M == 0:
                # Whole-M order (see whole_m_order): every m-block takes an n-block before the next one starts,
                # so A stays in L2 and B streams through once.
                m_blk = t % num_m
                n_blk = t // num_m
            else:
                # Grouped rasterisation: GROUP_M m-blocks sweep all n-blocks together (L2 reuse of B).
                per_group = GROUP_M * num_n
                first_m = (t // per_group) * GROUP_M
                group_rows = gl.minimum(num_m - first_m, GROUP_M)
                m_blk = first_m + (t % per_group) % group_rows
                n_blk = (t % per_group) // group_rows
            row_a = m_blk * BLOCK_M
            if MODE == 2:
                offs = row_a + gl.arange(0, BLOCK_M, layout=IDX_LAYOUT)
                ids = gl.load(m_indices_ptr + offs, mask=offs < M, other=-1)
                g = gl.max(ids, axis=0)
                # An id past the last expert would read outside B: skipped like padding.
                valid = (g >= 0) & (g < G)
            else:
                g = t * 0
                valid = t >= 0
        return g, m_blk, n_blk, row_a, valid, cur_g, cur_base, cur_cnt

    @gluon.jit
    def _grid_dependency_wait():
        """PTX ``griddepcontrol.wait``: block until the grid this launch depends on programmatically (PDL:
        the kernel before it on the stream, launched with ``launch_pdl=True``) has completed and its memory
        writes are visible.  A no-op when the launch has no programmatic dependency.  Not pure: it stays in
        order with the loads, barrier operations and TMA copies around it."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _prefetch_b(b_desc, b_bufs, full_bars, total, M, N, K, G, masked_m_ptr, m_indices_ptr,
                    nbytes: gl.constexpr, MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    GROUP_M: gl.constexpr, STAGES: gl.constexpr, K_ROTATE: gl.constexpr, WIDE_N: gl.constexpr,
                    IDX_LAYOUT: gl.constexpr):
        """PDL_WAIT only, before the grid-dependency wait: start the B (weight) loads of the first
        ``min(STAGES, num_k)`` K-slices of this program's first tile, each with its stage's full-barrier
        ``expect`` of the whole stage (A + B bytes), so the phase completes only once the A box, loaded
        after the wait, lands too.  Returns how many slices it started (0 when the first tile is not this
        program's or is skipped): :func:`_producer` loads only A for those.  B, ``masked_m`` and
        ``m_indices`` are not written by the kernel this launch waits for (the FP4 convert), and whatever
        wrote them completed before that kernel started, so reading them here is safe."""
        BK: gl.constexpr = b_bufs.type.shape[2]
        pid = gl.program_id(0)
        num_k = K // BK
        npre = gl.to_tensor(0)
        if pid < total:
            zero = gl.to_tensor(0)
            cnt = _first_group_count(M, N, masked_m_ptr, MODE, BLOCK_M, BLOCK_N)
            g, m_blk, n_blk, row_a, valid, c0, c1, c2 = _locate(
                pid, zero, zero, cnt, M, N, G, masked_m_ptr, m_indices_ptr,
                MODE, BLOCK_M, BLOCK_N, GROUP_M, IDX_LAYOUT)
            if valid:
                row_b = g * N + n_blk * BLOCK_N
                rot = _k_rotation(pid, num_k, K_ROTATE)
                npre = gl.minimum(num_k, STAGES)
                for kb in range(npre):
                    kk = _rotated(kb, rot, num_k) * BK
                    bar = full_bars.index(kb)
                    mbarrier.expect(bar, nbytes)
                    if WIDE_N and BLOCK_N == 2 * b_desc.block_type.shape[0]:
                        HALF_N: gl.constexpr = b_desc.block_type.shape[0]
                        row_b_hi = gl.where(row_b + HALF_N < N, row_b + HALF_N, row_b)
                        tma.async_copy_global_to_shared(b_desc, [row_b, kk], bar, b_bufs.index(2 * kb))
                        tma.async_copy_global_to_shared(b_desc, [row_b_hi, kk], bar, b_bufs.index(2 * kb + 1))
                    else:       # default kernel, and the split tile (one B box a stage)
                        tma.async_copy_global_to_shared(b_desc, [row_b, kk], bar, b_bufs.index(kb))
        return npre

    @gluon.jit
    def _load_stage(a_desc, b_desc, a_bufs, b_bufs, bar, s, row_a, row_b, kk, M, N, with_b,
                    nbytes: gl.constexpr, WIDE_N: gl.constexpr, WIDE_NH: gl.constexpr = 2,
                    b2_desc=None, b2_bufs=None, row_b2=None, BN_TAIL: gl.constexpr = 0):
        """One stage of :func:`_producer`: the A box(es) always; the full-barrier ``expect`` and the B box(es)
        only with ``with_b`` (True outside PDL; under PDL_WAIT False for the slices :func:`_prefetch_b` has
        started).  ``WIDE_NH`` (wide path): B boxes a stage, 2 (128x256) or 1 (the split 128x128 tile: two
        64-row A boxes, one B box).  Wide: an upper half wholly past M (N) loads the lower rows again instead,
        so no box is ever entirely out of bounds; those rows (columns) are not stored.  ``BN_TAIL``: also the
        tail slice's B box (``b2_desc`` rows ``row_b2``) into ``b2_bufs``."""
        mbarrier.expect(bar, nbytes, pred=with_b)
        if WIDE_N and WIDE_NH == 1:
            HALF_M1: gl.constexpr = a_desc.block_type.shape[0]
            row_a_hi1 = gl.where(row_a + HALF_M1 < M, row_a + HALF_M1, row_a)
            tma.async_copy_global_to_shared(a_desc, [row_a, kk], bar, a_bufs.index(2 * s))
            tma.async_copy_global_to_shared(a_desc, [row_a_hi1, kk], bar, a_bufs.index(2 * s + 1))
            tma.async_copy_global_to_shared(b_desc, [row_b, kk], bar, b_bufs.index(s), pred=with_b)
        elif WIDE_N:
            HALF_M: gl.constexpr = a_desc.block_type.shape[0]
            HALF_N: gl.constexpr = b_desc.block_type.shape[0]
            row_a_hi = gl.where(row_a + HALF_M < M, row_a + HALF_M, row_a)
            row_b_hi = gl.where(row_b + HALF_N < N, row_b + HALF_N, row_b)
            tma.async_copy_global_to_shared(a_desc, [row_a, kk], bar, a_bufs.index(2 * s))
            tma.async_copy_global_to_shared(a_desc, [row_a_hi, kk], bar, a_bufs.index(2 * s + 1))
            tma.async_copy_global_to_shared(b_desc, [row_b, kk], bar, b_bufs.index(2 * s), pred=with_b)
            tma.async_copy_global_to_shared(b_desc, [row_b_hi, kk], bar, b_bufs.index(2 * s + 1), pred=with_b)
        else:
            tma.async_copy_global_to_shared(a_desc, [row_a, kk], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [row_b, kk], bar, b_bufs.index(s), pred=with_b)
            if BN_TAIL:
                tma.async_copy_global_to_shared(b2_desc, [row_b2, kk], bar, b2_bufs.index(s))

    @gluon.jit
    def _producer(a_desc, b_desc, a_bufs, b_bufs, empty_bars, full_bars, M, N, K, G,
                  masked_m_ptr, m_indices_ptr,
                  MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                  STAGES: gl.constexpr, K_ROTATE: gl.constexpr, WIDE_N: gl.constexpr = False,
                  PROBE: gl.constexpr = False, probe_ptr=None, PDL_WAIT: gl.constexpr = False,
                  DIAG: gl.constexpr = 0, b2_desc=None, b2_bufs=None, BN_TAIL: gl.constexpr = 0,
                  sa_bufs=None, sfa_ptr=None, s_ag=0, s_am=0, s_ak=0, SA_SMEM: gl.constexpr = False):
        BK: gl.constexpr = a_desc.block_type.shape[1]
        idx_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
        if WIDE_N:
            # Two A boxes (64 rows, one per consumer warpgroup) and two B boxes (128 rows) per stage; the split
            # 128x128 tile (BLOCK_N = one B box): one B box.
            WIDE_NH: gl.constexpr = BLOCK_N // b_desc.block_type.shape[0]
            nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + WIDE_NH * b_desc.block_type.nbytes
        elif BN_TAIL:
            WIDE_NH: gl.constexpr = 0
            nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes + b2_desc.block_type.nbytes
        else:
            WIDE_NH: gl.constexpr = 0
            nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        # BN_TAIL: the tiles cover the N // BLOCK_N full column blocks, each with a BN_TAIL-wide slice of the
        # remainder (_tail_col)
        NT = N // BLOCK_N * BLOCK_N if BN_TAIL else N
        total, cur_g, cur_base, cur_cnt = _walk_start(M, NT, G, masked_m_ptr, MODE, BLOCK_M, BLOCK_N)
        num_k = K // BK
        it = gl.to_tensor(0)
        if PROBE:
            pbase, pw, prow = _probe_row(probe_ptr, True)
            hdr = probe_ptr + pid * _PR_CTA + 3 * _PR_ROW
            _stamp(hdr, pw, 0, _HDR_PCLK0)
        if PDL_WAIT:
            # The weights' first stages stream in while the previous kernel still runs; A (its output) only
            # after the wait.
            npre = _prefetch_b(b_desc, b_bufs, full_bars, total, M, N, K, G, masked_m_ptr, m_indices_ptr,
                               nbytes, MODE, BLOCK_M, BLOCK_N, GROUP_M, STAGES, K_ROTATE, WIDE_N, idx_layout)
            _grid_dependency_wait()
        for t in range(pid, total, nprog):
            g, m_blk, n_blk, row_a, valid, cur_g, cur_base, cur_cnt = _locate(
                t, cur_g, cur_base, cur_cnt, M, NT, G, masked_m_ptr, m_indices_ptr,
                MODE, BLOCK_M, BLOCK_N, GROUP_M, idx_layout)
            if valid:
                row_b = g * N + n_blk * BLOCK_N
                if BN_TAIL:
                    row_b2 = g * N + _tail_col(n_blk, N, BLOCK_N, BN_TAIL)
                else:
                    row_b2 = row_b
                rot = _k_rotation(t, num_k, K_ROTATE)
                for kb in range(num_k):
                    s = it % STAGES
                    ph = (it // STAGES) & 1
                    kk = _rotated(kb, rot, num_k) * BK
                    if PROBE:
                        _stamp(pbase, pw, it, _EV_P_PRE_WAIT)
                    mbarrier.wait(empty_bars.index(s), ph ^ 1)
                    if PROBE:
                        _stamp(pbase, pw, it, _EV_P_EMPTY)
                    bar = full_bars.index(s)
                    if SA_SMEM:
                        _copy_sa(sa_bufs.index(s), bar, sfa_ptr, g, m_blk, _rotated(kb, rot, num_k), M,
                                 s_ag, s_am, s_ak, BLOCK_M, idx_layout)
                    if DIAG == 1 or DIAG == 2 or DIAG == 4:
                        _diag_load_stage(a_desc, b_desc, a_bufs, b_bufs, bar, s, it, row_a, row_b, kk, nbytes,
                                         STAGES, DIAG)
                    elif PDL_WAIT:
                        # Slices _prefetch_b started (the first tile's first ones) have their expect and B.
                        _load_stage(a_desc, b_desc, a_bufs, b_bufs, bar, s, row_a, row_b, kk, M, N, it >= npre,
                                    nbytes, WIDE_N, WIDE_NH)
                    else:
                        _load_stage(a_desc, b_desc, a_bufs, b_bufs, bar, s, row_a, row_b, kk, M, N, True,
                                    nbytes, WIDE_N, WIDE_NH, b2_desc, b2_bufs, row_b2, BN_TAIL)
                    if PROBE:
                        _stamp(pbase, pw, it, _EV_P_ISSUED)
                    it += 1

    @gluon.jit
    def _copy_sa(sa_buf, bar, sfa_ptr, g, m_blk, kb, M, s_ag, s_am, s_ak, BLOCK_M: gl.constexpr,
                 layout: gl.constexpr):
        """Copy A's scales of one K-slice (rows ``m_blk * BLOCK_M ..`` of group ``g``, column ``kb``) into the
        stage's ``sa_buf`` with cp.async, tracked by the stage's full barrier: every lane of the producer warp
        gives one ``cp.async.mbarrier.arrive.noinc``, which arrives once that lane's copies are complete, and
        the barrier expects those 32 arrivals besides the producer's expect-arrive (init count 33), so its phase
        completes only after the TMA bytes and the copies.  The first try used the default form (no
        ``.noinc``, barrier count 1), relying on its pending-count increment to hold the phase open; the 61
        Gluon GEMM GPU tests passed with it, but the PDL test (FP4 convert -> GEMM) saw outputs differ from the
        non-PDL run, i.e. stale scales, which is what a phase completing on the TMA bytes alone would give
        (our reading).  This form passed every Gluon GEMM, PDL and public-API GPU test on an H200 (session 9).
        Rows past M read as 0.
        Loading these scales in the consumer, from global memory two slices ahead, cost 1.17-1.31x the time of
        the small-m tiles and 7-8% at 4096x4096x7168 (benchmarks/small_m_diag.py, DIAG 6, H100)."""
        offs = m_blk * BLOCK_M + gl.arange(0, BLOCK_M, layout=layout)
        ptrs = sfa_ptr + g.to(gl.int64) * s_ag + offs * s_am + kb * s_ak
        async_copy.async_copy_global_to_shared(sa_buf, ptrs, mask=offs < M)
        async_copy.mbarrier_arrive(bar, increment_count=False)

    @gluon.jit
    def _stage_sa(sa_bufs, it, STAGES: gl.constexpr, sa_layout: gl.constexpr):
        """A's scales of slice ``it`` from its stage (``SA_SMEM``): read right after the slice's MMA is issued,
        while it runs, and before the stage is released."""
        return sa_bufs.index(it % STAGES).load(sa_layout)

    @gluon.jit
    def _diag_load_stage(a_desc, b_desc, a_bufs, b_bufs, bar, s, it, row_a, row_b, kk, nbytes: gl.constexpr,
                         STAGES: gl.constexpr, DIAG: gl.constexpr):
        """One stage of :func:`_producer` in a diagnostic mode (dense, not wide, no PDL).

        DIAG 1 (L2-resident operands): the tile's A and B boxes at K coordinate 0 for every slice: the same
        bytes through TMA into shared memory, but the whole working set (M + N rows x 128 bytes) stays in L2.
        DIAG 2/4 (no refill): the program's first ``STAGES`` slices (``it`` < STAGES: each stage once) load as
        usual; after that the full barrier only gets the producer's plain arrive (init count 1, no transaction
        bytes: the phase completes at once) and the MMAs read whatever the stage holds."""
        if DIAG == 1:
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(a_desc, [row_a, kk * 0], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [row_b, kk * 0], bar, b_bufs.index(s))
        else:
            fill = it < STAGES
            mbarrier.expect(bar, nbytes, pred=fill)
            tma.async_copy_global_to_shared(a_desc, [row_a, kk], bar, a_bufs.index(s), pred=fill)
            tma.async_copy_global_to_shared(b_desc, [row_b, kk], bar, b_bufs.index(s), pred=fill)
            mbarrier.arrive(bar, count=1, pred=it >= STAGES)

    @gluon.jit
    def _tail_col(n_blk, N, BLOCK_N: gl.constexpr, BN_TAIL: gl.constexpr):
        """First column of the BN_TAIL-wide remainder slice that tile column ``n_blk`` computes beside its full
        block: the remainder ``N - N // BLOCK_N * BLOCK_N`` is shared out in BN_TAIL-wide slices to the first
        tiles; later tiles repeat the last slice (computed, never stored: :func:`_tail_owned`)."""
        NT = N // BLOCK_N * BLOCK_N
        return NT + BN_TAIL * gl.minimum(n_blk, (N - NT) // BN_TAIL - 1)

    @gluon.jit
    def _tail_owned(n_blk, N, BLOCK_N: gl.constexpr, BN_TAIL: gl.constexpr):
        return n_blk < (N - N // BLOCK_N * BLOCK_N) // BN_TAIL

    @gluon.jit
    def _k_rotation(t, num_k, K_ROTATE: gl.constexpr):
        """First K-slice of tile ``t``: tiles running side by side start at different K so that they do
        not all read the same lines of the shared operand at the same moment (the sum is order-free)."""
        if K_ROTATE:
            rot = (t * 7) % num_k
        else:
            rot = t * 0
        return rot

    @gluon.jit
    def _rotated(kb, rot, num_k):
        kr = kb + rot
        return gl.where(kr >= num_k, kr - num_k, kr)

    @gluon.jit
    def _load_scales(sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nb1, kb_logical, rot, num_k,
                     s_ag, s_am, s_ak, s_bg, s_bn, s_bk, SB_SCALAR: gl.constexpr, NO_PROMO: gl.constexpr = False,
                     NO_LOADS: gl.constexpr = 0):
        if NO_PROMO:
            # DIAG 3/4: no scale loads (the values are never read)
            sa = gl.to_tensor(0.0)
            sb0 = sa
            sb1 = sa
        elif NO_LOADS != 0:
            # DIAG 5 (NO_LOADS 1): scales that vary by row and slice like loaded ones, from registers only;
            # DIAG 6 / 7 (NO_LOADS 2 / 3): only A's / only B's made so, the other loaded as in production
            kb = _rotated(kb_logical, rot, num_k)
            if NO_LOADS == 3:
                sa = gl.load(sfa_ptr + g64 * s_ag + offs_m * s_am + kb * s_ak, mask=m_ok, other=0.0)
            else:
                sa = (offs_m & 3).to(gl.float32) * 0.25 + 1.0
            if NO_LOADS == 2:
                sb0 = gl.load(sfb_ptr + g64 * s_bg + nb0 * s_bn + kb * s_bk)
            else:
                sb0 = kb.to(gl.float32) * 0.001 + 1.0
            sb1 = sb0
        else:
            kb = _rotated(kb_logical, rot, num_k)
            sa = gl.load(sfa_ptr + g64 * s_ag + offs_m * s_am + kb * s_ak, mask=m_ok, other=0.0)
            sb0, sb1 = _load_sb(sfb_ptr, g64, nb0, nb1, kb_logical, rot, num_k, s_bg, s_bn, s_bk, SB_SCALAR)
        return sa, sb0, sb1

    @gluon.jit
    def _load_sb(sfb_ptr, g64, nb0, nb1, kb_logical, rot, num_k, s_bg, s_bn, s_bk, SB_SCALAR: gl.constexpr):
        """B's scales of one K-slice (with SA_SMEM the consumer loads only these; :func:`_load_scales` otherwise)."""
        kb = _rotated(kb_logical, rot, num_k)
        sb0 = gl.load(sfb_ptr + g64 * s_bg + nb0 * s_bn + kb * s_bk)
        if SB_SCALAR:
            sb1 = sb0
        else:
            sb1 = gl.load(sfb_ptr + g64 * s_bg + nb1 * s_bn + kb * s_bk)
        return sb0, sb1

    @gluon.jit
    def _promote(acc, part, sa, sb0, sb1, col_lo, SB_SCALAR: gl.constexpr):
        if SB_SCALAR:
            scale = sa * sb0
            acc = acc + part * gl.expand_dims(scale, 1)
        else:
            sbv = gl.where(col_lo, sb0, sb1)
            acc = acc + part * (gl.expand_dims(sa, 1) * gl.expand_dims(sbv, 0))
        return acc

    @gluon.jit
    def _issue(a_bufs, b_bufs, full_bars, it, buf, STAGES: gl.constexpr,
               PROBE: gl.constexpr = False, pbase=None, pw=None):
        """Wait for K-slice ``it`` to land, start its MMA into ``buf`` (whose old value is ignored)."""
        s = it % STAGES
        if PROBE:
            # The compiler puts a partition bar.sync right before every mbarrier.wait (membar); the probe
            # makes it explicit so that a stamp can sit between it and the wait (membar then adds none).
            _stamp(pbase, pw, it, _EV_C_PRE_BAR)
            gl.thread_barrier()
            _stamp(pbase, pw, it, _EV_C_PRE_WAIT)
        mbarrier.wait(full_bars.index(s), (it // STAGES) & 1)
        if PROBE:
            _stamp(pbase, pw, it, _EV_C_FULL)
        tok = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), buf, use_acc=False, is_async=True)
        if PROBE:
            _stamp(pbase, pw, it, _EV_C_ISSUED)
        return tok

    @gluon.jit
    def _pin(x, after):
        """``x`` unchanged, as an identity that also reads ``after``: the scratch registers of a finished MMA are
        handed to the next MMA through it, which pins the promotion into ``after`` before that MMA is issued.
        Otherwise LLVM may schedule the FMAs after the issue, the scratch must then be copied while the MMA
        writes it, and ptxas serialises every MMA of the kernel (C7514).  ptxas coalesces the moves away."""
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [x, after], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _retire(tok, empty_bars, it, acc, sa, sb0, sb1, col_lo, SB_SCALAR: gl.constexpr, STAGES: gl.constexpr,
                OUTSTANDING: gl.constexpr, PROBE: gl.constexpr = False, pbase=None, pw=None,
                NO_PROMO: gl.constexpr = False):
        """Wait for K-slice ``it``'s MMA, free its stage, promote it into ``acc`` with its scales
        (``NO_PROMO``, DIAG 3/4: no promotion, ``acc`` is returned unchanged and the MMA's registers are
        handed on as they are)."""
        done = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(tok, ))
        if PROBE:
            _stamp(pbase, pw, it, _EV_C_MMA_DONE)
        mbarrier.arrive(empty_bars.index(it % STAGES), count=1)
        if PROBE:
            _stamp(pbase, pw, it, _EV_C_ARRIVED)
        if NO_PROMO:
            free = done
        else:
            acc = _promote(acc, done, sa, sb0, sb1, col_lo, SB_SCALAR)
            free = _pin(done, acc)
        if PROBE:
            _stamp(pbase, pw, it, _EV_C_PROMOTED)
        return acc, free

    @gluon.jit
    def _store_fp8_payload(out, d_ptrs, sf_ptrs, mask, r_ok):
        """The FP8 combine payload of a 128-column tile ``out`` (FP32, one scale group a row): E4M3 codes of the
        BF16-rounded values at ``d_ptrs`` and each row's UE8M0 byte at ``sf_ptrs``, bit for bit
        ``fp8gemm.reference.quantize_combine_payload`` of the BF16 result.  The scale is
        ``ceil_pow2(max(amax, 1e-4) / 448)``, found on the amax's bits: ``amax = (1 + f) 2^(e - 127)`` gives
        exponent ``e - 8``, plus one where ``1 + f > 1.75`` (448 = 1.75 * 2^8), exact without a division; an
        inf or NaN amax gives the byte 0xFF and codes 0 / 0x7F as the reference's division by inf / NaN does."""
        ob = out.to(gl.bfloat16).to(gl.float32)
        bits = ob.to(gl.int32, bitcast=True) & 0x7FFFFFFF        # NaN sorts above inf: a NaN-propagating amax
        amax = gl.maximum(gl.max(bits, axis=1), 0x38D1B717)       # max(amax, 1e-4f)
        sf_exp = ((amax >> 23) & 0xFF) - 8 + ((amax & 0x7FFFFF) > 0x600000).to(gl.int32)
        special = amax >= 0x7F800000
        inv = ((254 - sf_exp) << 23).to(gl.float32, bitcast=True)
        inv = gl.where(special, gl.where(amax > 0x7F800000, float("nan"), 0.0), inv)
        y = ob * gl.expand_dims(inv, 1)
        q = gl.where(y != y, 0x7F, y.to(gl.float8e4nv).to(gl.uint8, bitcast=True).to(gl.int32))
        gl.store(d_ptrs, q.to(gl.uint8).to(gl.float8e4nv, bitcast=True), mask=mask)
        gl.store(sf_ptrs, gl.where(special, 255, sf_exp).to(gl.uint8), mask=r_ok)

    @gluon.jit
    def _store_tile(acc, out_layout: gl.constexpr, d_ptr, c_ptr, masked_m_ptr, m_indices_ptr, g, g64, off_m, off_n,
                    M, N, s_dg, s_dm, s_cg, s_cm, MODE: gl.constexpr, HAS_C: gl.constexpr, col_ok=True,
                    dsf_ptr=None, s_fg=0, s_fm=0, D_FP8: gl.constexpr = False):
        """Store (C +) ``acc`` at rows ``off_m..`` and columns ``off_n..`` of group ``g`` of D, through
        ``out_layout``: only the group's valid rows (masked: below ``masked_m[g]``; contiguous: rows whose
        ``m_indices`` entry is ``g``) and columns below N; nothing with ``col_ok`` False.  ``D_FP8`` (128-wide
        tiles): the FP8 combine payload instead (:func:`_store_fp8_payload`; scale bytes at ``dsf_ptr``)."""
        BM: gl.constexpr = acc.type.shape[0]
        BN: gl.constexpr = acc.type.shape[1]
        out = gl.convert_layout(acc, out_layout)
        o_rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, out_layout))
        o_cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, out_layout))
        if MODE == 1:
            row_limit = gl.minimum(gl.load(masked_m_ptr + g), M)
            r_ok = o_rows < row_limit
        elif MODE == 2:
            ids = gl.load(m_indices_ptr + o_rows, mask=o_rows < M, other=-1)
            r_ok = ids == g   # -1 padding (and any other expert's rows) stay untouched
        else:
            r_ok = o_rows < M
        mask = gl.expand_dims(r_ok, 1) & gl.expand_dims((o_cols < N) & col_ok, 0)
        o_rows64 = o_rows.to(gl.int64)
        if HAS_C:
            c_ptrs = (c_ptr + g64 * s_cg + gl.expand_dims(o_rows64 * s_cm, 1)
                      + gl.expand_dims(o_cols, 0))
            out = out + gl.load(c_ptrs, mask=mask, other=0.0)
        d_ptrs = d_ptr + g64 * s_dg + gl.expand_dims(o_rows64 * s_dm, 1) + gl.expand_dims(o_cols, 0)
        if D_FP8:
            _store_fp8_payload(out, d_ptrs, dsf_ptr + g64 * s_fg + o_rows64 * s_fm + off_n // 128, mask, r_ok)
        else:
            gl.store(d_ptrs, out.to(d_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def _issue_tail(a_bufs, b_bufs, b2_bufs, full_bars, it, buf, buf2, STAGES: gl.constexpr):
        """:func:`_issue` for the BN_TAIL kernel: the full block's MMA and the tail slice's, two groups."""
        s = it % STAGES
        mbarrier.wait(full_bars.index(s), (it // STAGES) & 1)
        tok = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), buf, use_acc=False, is_async=True)
        tok2 = warpgroup_mma(a_bufs.index(s), b2_bufs.index(s).permute((1, 0)), buf2, use_acc=False, is_async=True)
        return tok, tok2

    @gluon.jit
    def _retire_tail(tok, tok2, empty_bars, it, acc, acc2, sa, sb, sb2, STAGES: gl.constexpr,
                     OUTSTANDING: gl.constexpr):
        """:func:`_retire` for the BN_TAIL kernel (``OUTSTANDING`` counts MMA groups: two a slice).  Both
        column ranges have one B scale block: the full block is 128-aligned and the remainder lies in the
        last block."""
        done, done2 = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(tok, tok2))
        mbarrier.arrive(empty_bars.index(it % STAGES), count=1)
        acc = _promote(acc, done, sa, sb, sb, None, True)
        acc2 = _promote(acc2, done2, gl.convert_layout(sa, gl.SliceLayout(1, acc2.type.layout)), sb2, sb2, None, True)
        return acc, acc2, _pin(done, acc), _pin(done2, acc2)

    @gluon.jit
    def _consumer_tail(a_bufs, b_bufs, b2_bufs, empty_bars, full_bars,
                       d_ptr, c_ptr, sfa_ptr, sfb_ptr, masked_m_ptr, m_indices_ptr,
                       M, N, K, G,
                       s_dg, s_dm, s_cg, s_cm, s_ag, s_am, s_ak, s_bg, s_bn, s_bk,
                       MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                       STAGES: gl.constexpr, HAS_C: gl.constexpr, K_ROTATE: gl.constexpr, BN_TAIL: gl.constexpr):
        """The consumer of the BN_TAIL kernel (``BLOCK_N`` 128): each tile is a full 128-column block plus a
        BN_TAIL-wide slice of the N remainder (:func:`_tail_col`), two MMAs a K-slice on the same A stage, so
        that N = 128 * q + r runs as q tile columns instead of q + 1 (e.g. N 576: 4 instead of 5, one wave of
        m = 4096 tiles on 132 SMs instead of two).  Same pipeline as :func:`_consumer` (two scratch pairs by
        K-slice parity, scales two slices ahead, the pins); stores without TMA."""
        BK: gl.constexpr = a_bufs.type.shape[2]
        num_warps: gl.constexpr = gl.num_warps()
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 32])
        tail_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN_TAIL, 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        VEC: gl.constexpr = 8 if d_ptr.dtype.element_ty == gl.bfloat16 else 4
        TPW_N: gl.constexpr = min(32, BLOCK_N // VEC)
        out_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPW_N, TPW_N], [num_warps, 1], [1, 0])
        TVEC: gl.constexpr = min(VEC, BN_TAIL)
        TPW_T: gl.constexpr = min(32, BN_TAIL // TVEC)
        tail_out_layout: gl.constexpr = gl.BlockedLayout([1, TVEC], [32 // TPW_T, TPW_T], [num_warps, 1], [1, 0])
        idx_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])

        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        NT = N // BLOCK_N * BLOCK_N
        total, cur_g, cur_base, cur_cnt = _walk_start(M, NT, G, masked_m_ptr, MODE, BLOCK_M, BLOCK_N)
        num_k = K // BK
        it = gl.to_tensor(0)
        X = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        Y = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        X2 = gl.zeros([BLOCK_M, BN_TAIL], gl.float32, tail_layout)
        Y2 = gl.zeros([BLOCK_M, BN_TAIL], gl.float32, tail_layout)
        for t in range(pid, total, nprog):
            g, m_blk, n_blk, row_a, valid, cur_g, cur_base, cur_cnt = _locate(
                t, cur_g, cur_base, cur_cnt, M, NT, G, masked_m_ptr, m_indices_ptr,
                MODE, BLOCK_M, BLOCK_N, GROUP_M, idx_layout)
            if valid:
                g64 = g.to(gl.int64)
                off_m = m_blk * BLOCK_M
                off_n = n_blk * BLOCK_N
                off_t = _tail_col(n_blk, N, BLOCK_N, BN_TAIL)
                offs_m = off_m + gl.arange(0, BLOCK_M, layout=row_layout)
                m_ok = offs_m < M
                nb0 = off_n // 128
                nbt = off_t // 128
                rot = _k_rotation(t, num_k, K_ROTATE)
                acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
                acc2 = gl.zeros([BLOCK_M, BN_TAIL], gl.float32, tail_layout)
                base = it
                last = num_k - 1
                # the two B scales of _load_scales: the full block's (nb0) and the tail slice's (nbt)
                saX, sbX, sbX2 = _load_scales(sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nbt, 0, rot, num_k,
                                              s_ag, s_am, s_ak, s_bg, s_bn, s_bk, False)
                saY, sbY, sbY2 = _load_scales(sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nbt, gl.minimum(1, last),
                                              rot, num_k, s_ag, s_am, s_ak, s_bg, s_bn, s_bk, False)
                X, X2 = _issue_tail(a_bufs, b_bufs, b2_bufs, full_bars, base, X, X2, STAGES)
                for j in range(0, last // 2):
                    k1 = 2 * j + 1
                    naX, nbX, nbX2 = _load_scales(sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nbt, k1 + 1, rot, num_k,
                                                  s_ag, s_am, s_ak, s_bg, s_bn, s_bk, False)
                    naY, nbY, nbY2 = _load_scales(sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nbt,
                                                  gl.minimum(k1 + 2, last), rot, num_k,
                                                  s_ag, s_am, s_ak, s_bg, s_bn, s_bk, False)
                    Y, Y2 = _issue_tail(a_bufs, b_bufs, b2_bufs, full_bars, base + k1, Y, Y2, STAGES)
                    acc, acc2, X, X2 = _retire_tail(X, X2, empty_bars, base + k1 - 1, acc, acc2, saX, sbX, sbX2,
                                                    STAGES, 2)
                    X, X2 = _issue_tail(a_bufs, b_bufs, b2_bufs, full_bars, base + k1 + 1, X, X2, STAGES)
                    acc, acc2, Y, Y2 = _retire_tail(Y, Y2, empty_bars, base + k1, acc, acc2, saY, sbY, sbY2,
                                                    STAGES, 2)
                    saX, sbX, sbX2 = naX, nbX, nbX2
                    saY, sbY, sbY2 = naY, nbY, nbY2
                if num_k % 2 == 0:
                    Y, Y2 = _issue_tail(a_bufs, b_bufs, b2_bufs, full_bars, base + last, Y, Y2, STAGES)
                    acc, acc2, Xd, Xd2 = _retire_tail(X, X2, empty_bars, base + last - 1, acc, acc2, saX, sbX, sbX2,
                                                      STAGES, 2)
                    acc, acc2, Y, Y2 = _retire_tail(Y, Y2, empty_bars, base + last, acc, acc2, saY, sbY, sbY2,
                                                    STAGES, 0)
                else:
                    acc, acc2, Xd, Xd2 = _retire_tail(X, X2, empty_bars, base + last, acc, acc2, saX, sbX, sbX2,
                                                      STAGES, 0)
                X = Xd
                X2 = Xd2
                it = base + num_k
                _store_tile(acc, out_layout, d_ptr, c_ptr, masked_m_ptr, m_indices_ptr, g, g64, off_m, off_n,
                            M, N, s_dg, s_dm, s_cg, s_cm, MODE, HAS_C)
                _store_tile(acc2, tail_out_layout, d_ptr, c_ptr, masked_m_ptr, m_indices_ptr, g, g64, off_m, off_t,
                            M, N, s_dg, s_dm, s_cg, s_cm, MODE, HAS_C, _tail_owned(n_blk, N, BLOCK_N, BN_TAIL))

    @gluon.jit
    def _tile_coords(m_blk, n_blk, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, row_layout: gl.constexpr,
                     col_layout: gl.constexpr):
        """Tile (m_blk, n_blk)'s first row and column, its rows (and which lie below M), its B scale blocks
        (``nb1`` the next one, clamped) and which of its columns belong to ``nb0``."""
        off_m = m_blk * BLOCK_M          # row inside the group (dense/contiguous: absolute)
        off_n = n_blk * BLOCK_N
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=row_layout)
        m_ok = offs_m < M
        nb0 = off_n // 128
        nb1 = gl.minimum(nb0 + 1, (N - 1) // 128)
        cols = off_n + gl.arange(0, BLOCK_N, layout=col_layout)
        col_lo = cols < (nb0 + 1) * 128
        return off_m, off_n, offs_m, m_ok, nb0, nb1, col_lo

    @gluon.jit
    def _tile_start(X, a_bufs, b_bufs, full_bars, sa_bufs, sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nb1, rot,
                    base, num_k, s_ag, s_am, s_ak, s_bg, s_bn, s_bk,
                    STAGES: gl.constexpr, SB_SCALAR: gl.constexpr, SA_SMEM: gl.constexpr, NO_PROMO: gl.constexpr,
                    NO_LOADS: gl.constexpr, PROBE: gl.constexpr, pbase, pw, row_layout: gl.constexpr):
        """A tile's first steps: the scale loads of its K-slices 0 and 1 (with SA_SMEM only B's) and slice 0's
        MMA into ``X``.  Returns ``X`` (in flight) and the two slices' scales (with SA_SMEM slice 1's A scales
        are read later, from its stage; ``saY`` is then a placeholder)."""
        last = num_k - 1
        if SA_SMEM:
            sbX0, sbX1 = _load_sb(sfb_ptr, g64, nb0, nb1, 0, rot, num_k, s_bg, s_bn, s_bk, SB_SCALAR)
            sbY0, sbY1 = _load_sb(sfb_ptr, g64, nb0, nb1, gl.minimum(1, last), rot, num_k, s_bg, s_bn, s_bk,
                                  SB_SCALAR)
        else:
            saX, sbX0, sbX1 = _load_scales(sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nb1, 0, rot, num_k,
                                           s_ag, s_am, s_ak, s_bg, s_bn, s_bk, SB_SCALAR, NO_PROMO, NO_LOADS)
            saY, sbY0, sbY1 = _load_scales(sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nb1,
                                           gl.minimum(1, last), rot, num_k,
                                           s_ag, s_am, s_ak, s_bg, s_bn, s_bk, SB_SCALAR, NO_PROMO, NO_LOADS)
        X = _issue(a_bufs, b_bufs, full_bars, base, X, STAGES, PROBE, pbase, pw)
        if SA_SMEM:
            saX = _stage_sa(sa_bufs, base, STAGES, row_layout)
            saY = saX
        return X, saX, sbX0, sbX1, saY, sbY0, sbY1

    @gluon.jit
    def _tile_loop(X, Y, saX, sbX0, sbX1, saY, sbY0, sbY1, a_bufs, b_bufs, empty_bars, full_bars, sa_bufs,
                   sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nb1, col_lo, rot, base, num_k,
                   s_ag, s_am, s_ak, s_bg, s_bn, s_bk,
                   STAGES: gl.constexpr, SB_SCALAR: gl.constexpr, SA_SMEM: gl.constexpr, NO_PROMO: gl.constexpr,
                   NO_LOADS: gl.constexpr, PROBE: gl.constexpr, pbase, pw, mma_layout: gl.constexpr,
                   row_layout: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """A tile's K loop after :func:`_tile_start`: returns the promoted FP32 tile and the two scratch
        accumulators, both retired (free)."""
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        last = num_k - 1
        # Two scratch accumulators X/Y alternate by K-slice parity (the loop is unrolled by two so that
        # neither is ever copied while its MMA is in flight: ptxas would serialise the MMAs).  Loop
        # invariant: X holds slice 2j in flight, Y is free; the scales of slices 2j (sX) and 2j+1 (sY) are
        # in registers: each scale load is issued two slices before its use.  SA_SMEM: A's scales come
        # with each stage (the producer's cp.async, _copy_sa) and are read from shared memory right after
        # the slice's MMA is issued; only B's are loaded ahead.
        for j in range(0, last // 2):
            k1 = 2 * j + 1
            if SA_SMEM:
                nbX0, nbX1 = _load_sb(sfb_ptr, g64, nb0, nb1, k1 + 1, rot, num_k, s_bg, s_bn, s_bk, SB_SCALAR)
                nbY0, nbY1 = _load_sb(sfb_ptr, g64, nb0, nb1, gl.minimum(k1 + 2, last), rot, num_k,
                                      s_bg, s_bn, s_bk, SB_SCALAR)
            else:
                naX, nbX0, nbX1 = _load_scales(sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nb1,
                                               k1 + 1, rot, num_k,
                                               s_ag, s_am, s_ak, s_bg, s_bn, s_bk, SB_SCALAR, NO_PROMO, NO_LOADS)
                naY, nbY0, nbY1 = _load_scales(sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nb1,
                                               gl.minimum(k1 + 2, last), rot, num_k,
                                               s_ag, s_am, s_ak, s_bg, s_bn, s_bk, SB_SCALAR, NO_PROMO, NO_LOADS)
            Y = _issue(a_bufs, b_bufs, full_bars, base + k1, Y, STAGES, PROBE, pbase, pw)
            if SA_SMEM:
                saY = _stage_sa(sa_bufs, base + k1, STAGES, row_layout)
            acc, X = _retire(X, empty_bars, base + k1 - 1, acc, saX, sbX0, sbX1, col_lo,
                             SB_SCALAR, STAGES, 1, PROBE, pbase, pw, NO_PROMO)
            X = _issue(a_bufs, b_bufs, full_bars, base + k1 + 1, X, STAGES, PROBE, pbase, pw)
            if SA_SMEM:
                saX = _stage_sa(sa_bufs, base + k1 + 1, STAGES, row_layout)
            acc, Y = _retire(Y, empty_bars, base + k1, acc, saY, sbY0, sbY1, col_lo,
                             SB_SCALAR, STAGES, 1, PROBE, pbase, pw, NO_PROMO)
            if not SA_SMEM:
                saX, saY = naX, naY
            sbX0, sbX1 = nbX0, nbX1
            sbY0, sbY1 = nbY0, nbY1
        if num_k % 2 == 0:
            Y = _issue(a_bufs, b_bufs, full_bars, base + last, Y, STAGES, PROBE, pbase, pw)
            if SA_SMEM:
                saY = _stage_sa(sa_bufs, base + last, STAGES, row_layout)
            acc, Xd = _retire(X, empty_bars, base + last - 1, acc, saX, sbX0, sbX1, col_lo,
                              SB_SCALAR, STAGES, 1, PROBE, pbase, pw, NO_PROMO)
            acc, Y = _retire(Y, empty_bars, base + last, acc, saY, sbY0, sbY1, col_lo,
                             SB_SCALAR, STAGES, 0, PROBE, pbase, pw, NO_PROMO)
        else:
            acc, Xd = _retire(X, empty_bars, base + last, acc, saX, sbX0, sbX1, col_lo,
                              SB_SCALAR, STAGES, 0, PROBE, pbase, pw, NO_PROMO)
        X = Xd
        if NO_PROMO:
            # DIAG 3/4: every MMA of the tile is complete here; fold the last two results into ``acc``
            # once per tile so that the MMA chain stays live (the pin as in _retire keeps these adds
            # ahead of the next tile's first MMA, which reuses X's registers).
            acc = acc + X + Y
            X = _pin(X, acc)
        return acc, X, Y

    @gluon.jit
    def _bulk_stores_complete(x):
        """``x`` unchanged, after this thread's TMA stores have completed, their global writes included
        (``cp.async.bulk.wait_group 0``; ``tma.store_wait`` waits only until shared memory has been read), and a
        proxy fence orders those async-proxy writes before the thread's later generic accesses (the signal's
        release).  Threads that issued no store pass at once."""
        return gl.inline_asm_elementwise("cp.async.bulk.wait_group 0;\n\tfence.proxy.async.global;\n\tmov.b32 $0, $1;",
                                         "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _hand_off(tc, sig_full, sig_free):
        """Give the signal warp (:func:`_signaller`) the program's ``tc``-th tile, whose rows are all written: a
        ring of ``SIG_SLOTS`` barrier pairs, each slot taken once the signal warp has released its last use.  The
        arrive follows a partition barrier, so every thread's writes of the tile precede it."""
        slot = tc % _SIG_SLOTS
        mbarrier.wait(sig_free.index(slot), ((tc // _SIG_SLOTS) & 1) ^ 1)
        mbarrier.arrive(sig_full.index(slot), count=1)
        return tc + 1

    @gluon.jit
    def _signal_tile(tc, g, m_blk, num_m_blocks, signal_ptr, sig_full, sig_free, SIG_WARP: gl.constexpr):
        """Publish a tile whose rows are all written: after a partition barrier (every thread's writes of the
        tile precede it), hand it to the signal warp (``SIG_WARP``) or bump its counter ``g * num_m_blocks +
        m_blk`` here with a release atomic at GPU scope.  Returns the tiles handed off so far."""
        gl.thread_barrier()
        if SIG_WARP:
            tc = _hand_off(tc, sig_full, sig_free)
        else:
            gl.atomic_add(signal_ptr + g * num_m_blocks + m_blk, 1, sem="release", scope="gpu")
        return tc

    @gluon.jit
    def _publish_pending(pend, tc, signal_ptr, sig_full, sig_free, SIG_WARP: gl.constexpr):
        """Publish the TMA-stored tile of counter ``pend`` (-1: none) once the store's writes are complete (the
        issuing thread waits; :func:`_signal_tile`'s barrier orders every thread after it).  Returns ``(-1, tc)``
        (nothing pending, tiles handed off)."""
        done = _bulk_stores_complete(pend)
        if done >= 0:
            tc = _signal_tile(tc, done, 0, 1, signal_ptr, sig_full, sig_free, SIG_WARP)
        return done * 0 - 1, tc

    @gluon.jit
    def _signaller(sig_full, sig_free, signal_ptr, masked_m_ptr, m_indices_ptr, M, N, G,
                   MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        """The signal warp (``SIG_WARP``): walks the program's tiles as the consumer does and, as the consumer hands
        each one off (:func:`_hand_off`), bumps its SBO counter with a release atomic at GPU scope.  The release
        waits for the memory operations before it (MEMBAR.GPU); in the consumer that stalled its warpgroup's next
        MMA issue on every tile, here it stalls only this warp."""
        idx_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        total, cur_g, cur_base, cur_cnt = _walk_start(M, N, G, masked_m_ptr, MODE, BLOCK_M, BLOCK_N)
        num_m_blocks = gl.cdiv(M, BLOCK_M)
        tc = pid * 0
        for t in range(pid, total, nprog):
            g, m_blk, n_blk, row_a, valid, cur_g, cur_base, cur_cnt = _locate(
                t, cur_g, cur_base, cur_cnt, M, N, G, masked_m_ptr, m_indices_ptr,
                MODE, BLOCK_M, BLOCK_N, GROUP_M, idx_layout)
            if valid:
                slot = tc % _SIG_SLOTS
                mbarrier.wait(sig_full.index(slot), (tc // _SIG_SLOTS) & 1)
                gl.atomic_add(signal_ptr + g * num_m_blocks + m_blk, 1, sem="release", scope="gpu")
                mbarrier.arrive(sig_free.index(slot), count=1)
                tc += 1

    @gluon.jit
    def _tile_epilogue(acc, c_smem, d_desc, d_ptr, c_ptr, masked_m_ptr, m_indices_ptr, signal_ptr,
                       g, g64, m_blk, off_m, off_n, M, N, num_m_blocks, s_dg, s_dm, s_cg, s_cm,
                       MODE: gl.constexpr, TMA_STORE: gl.constexpr, HAS_C: gl.constexpr,
                       HAS_SIGNAL: gl.constexpr, out_layout: gl.constexpr, idx_layout: gl.constexpr,
                       dsf_ptr, s_fg, s_fm, D_FP8: gl.constexpr, DIAG: gl.constexpr = 0, pend=-1, tc=0,
                       sig_full=None, sig_free=None, SIG_WARP: gl.constexpr = False):
        """Store a finished tile (TMA, or masked register stores for partial grouped blocks, FP32/C outputs
        and the FP8 payload) and, with a signal, publish it.  DIAG 8 (dense TMA-store kernel): everything but the
        TMA store itself.  A signalled call storing by TMA (masked, full blocks) publishes a TMA-stored tile at the
        next tile's epilogue, once its writes are complete (``pend``: that tile's counter, or -1; returned for the
        next call, and :func:`_publish_pending` after the last tile): waiting for them right after the store would
        stall the warpgroups for the store's whole latency every tile.  ``SIG_WARP``: tiles are handed to the signal
        warp instead of signalled here (``tc``: tiles handed off so far).  Returns ``(pend, tc)``."""
        BLOCK_M: gl.constexpr = acc.type.shape[0]
        if TMA_STORE and MODE == 0:
            tma.store_wait(pendings=0)
            c_smem.store(acc.to(d_desc.dtype))
            fence_async_shared()
            if DIAG != 8:
                tma.async_copy_shared_to_global(d_desc, [off_m, off_n], c_smem)
        elif TMA_STORE:
            # Grouped modes: a block whose rows all belong to group g goes out as one TMA store (3-10%
            # faster than register stores, benchmarks/epilogue_ab.py); a partial one (rows past
            # masked_m[g], -1 padding) through the masked register stores, which leave those rows
            # untouched.  D is one [G * M, N] matrix for the masked layout (launch checks it).
            if MODE == 1:
                full = off_m + BLOCK_M <= gl.minimum(gl.load(masked_m_ptr + g), M)
                row_d = g * M + off_m
            else:
                rows_i = off_m + gl.arange(0, BLOCK_M, layout=idx_layout)
                ids_i = gl.load(m_indices_ptr + rows_i, mask=rows_i < M, other=-1)
                full = gl.min(ids_i, axis=0) == g
                row_d = off_m
            if HAS_SIGNAL:
                pend, tc = _publish_pending(pend, tc, signal_ptr, sig_full, sig_free, SIG_WARP)
            if full:
                tma.store_wait(pendings=0)
                c_smem.store(acc.to(d_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(d_desc, [row_d, off_n], c_smem)
                if HAS_SIGNAL:
                    pend = g * num_m_blocks + m_blk
            else:
                _store_tile(acc, out_layout, d_ptr, c_ptr, masked_m_ptr, m_indices_ptr, g, g64, off_m,
                            off_n, M, N, s_dg, s_dm, s_cg, s_cm, MODE, HAS_C)
                if HAS_SIGNAL:
                    tc = _signal_tile(tc, g, m_blk, num_m_blocks, signal_ptr, sig_full, sig_free, SIG_WARP)
        else:
            _store_tile(acc, out_layout, d_ptr, c_ptr, masked_m_ptr, m_indices_ptr, g, g64, off_m, off_n,
                        M, N, s_dg, s_dm, s_cg, s_cm, MODE, HAS_C, True, dsf_ptr, s_fg, s_fm, D_FP8)
            if HAS_SIGNAL:
                tc = _signal_tile(tc, g, m_blk, num_m_blocks, signal_ptr, sig_full, sig_free, SIG_WARP)
        return pend, tc

    @gluon.jit
    def _consumer(a_bufs, b_bufs, empty_bars, full_bars, d_desc,
                  d_ptr, c_ptr, sfa_ptr, sfb_ptr, masked_m_ptr, m_indices_ptr, signal_ptr,
                  M, N, K, G,
                  s_dg, s_dm, s_cg, s_cm, s_ag, s_am, s_ak, s_bg, s_bn, s_bk,
                  MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                  STAGES: gl.constexpr, TMA_STORE: gl.constexpr, HAS_C: gl.constexpr,
                  HAS_SIGNAL: gl.constexpr, SB_SCALAR: gl.constexpr, K_ROTATE: gl.constexpr,
                  PROBE: gl.constexpr = False, probe_ptr=None, PDL_WAIT: gl.constexpr = False,
                  DIAG: gl.constexpr = 0, sa_bufs=None, SA_SMEM: gl.constexpr = False,
                  dsf_ptr=None, s_fg=0, s_fm=0, D_FP8: gl.constexpr = False, sig_full=None, sig_free=None,
                  SIG_WARP: gl.constexpr = False):
        BK: gl.constexpr = a_bufs.type.shape[2]
        NO_PROMO: gl.constexpr = DIAG == 3 or DIAG == 4      # diagnostics: no scale loads, no promotion
        # diagnostics 5/6/7: promotion without (some) scale loads
        NO_LOADS: gl.constexpr = 1 if DIAG == 5 else (2 if DIAG == 6 else (3 if DIAG == 7 else 0))
        num_warps: gl.constexpr = gl.num_warps()
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        # Epilogue layout for vector stores: 16-byte chunks along N.
        VEC: gl.constexpr = 16 if D_FP8 else (8 if d_ptr.dtype.element_ty == gl.bfloat16 else 4)
        TPW_N: gl.constexpr = min(32, BLOCK_N // VEC)
        TPW_M: gl.constexpr = 32 // TPW_N
        out_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [TPW_M, TPW_N], [num_warps, 1], [1, 0])
        idx_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])

        if TMA_STORE:
            c_smem = gl.allocate_shared_memory(d_desc.dtype, d_desc.block_type.shape, d_desc.layout)
        else:
            c_smem = None

        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        total, cur_g, cur_base, cur_cnt = _walk_start(M, N, G, masked_m_ptr, MODE, BLOCK_M, BLOCK_N)
        num_k = K // BK
        num_m_blocks = gl.cdiv(M, BLOCK_M)
        it = gl.to_tensor(0)
        X = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        Y = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        if PROBE:
            pbase, pw, prow = _probe_row(probe_ptr, False)
            hdr = probe_ptr + pid * _PR_CTA + 3 * _PR_ROW
            hw = pw * (prow == 0).to(gl.int32)          # the header: warpgroup 0's writer only
            _stamp(hdr, hw, 0, _HDR_CLK0)
            _stamp(hdr, hw, 0, _HDR_NS0, 1)
            _stamp(hdr, hw, 0, _HDR_SMID, 2)
        else:
            pbase = probe_ptr
            pw = probe_ptr
        if PDL_WAIT:
            # The A scales are the previous kernel's output (A itself arrives through the producer's TMA,
            # issued after its own wait).
            _grid_dependency_wait()
        if HAS_SIGNAL:
            pend = pid * 0 - 1          # the counter of a TMA-stored tile not yet signalled (_tile_epilogue)
            tc = pid * 0                # tiles handed to the signal warp (SIG_WARP)
        for t in range(pid, total, nprog):
            g, m_blk, n_blk, row_a, valid, cur_g, cur_base, cur_cnt = _locate(
                t, cur_g, cur_base, cur_cnt, M, N, G, masked_m_ptr, m_indices_ptr,
                MODE, BLOCK_M, BLOCK_N, GROUP_M, idx_layout)
            if valid:
                g64 = g.to(gl.int64)
                off_m, off_n, offs_m, m_ok, nb0, nb1, col_lo = _tile_coords(m_blk, n_blk, M, N, BLOCK_M,
                                                                            BLOCK_N, row_layout, col_layout)
                rot = _k_rotation(t, num_k, K_ROTATE)
                X, saX, sbX0, sbX1, saY, sbY0, sbY1 = _tile_start(
                    X, a_bufs, b_bufs, full_bars, sa_bufs, sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nb1, rot,
                    it, num_k, s_ag, s_am, s_ak, s_bg, s_bn, s_bk, STAGES, SB_SCALAR, SA_SMEM, NO_PROMO,
                    NO_LOADS, PROBE, pbase, pw, row_layout)
                acc, X, Y = _tile_loop(X, Y, saX, sbX0, sbX1, saY, sbY0, sbY1, a_bufs, b_bufs, empty_bars,
                                       full_bars, sa_bufs, sfa_ptr, sfb_ptr, g64, offs_m, m_ok, nb0, nb1,
                                       col_lo, rot, it, num_k, s_ag, s_am, s_ak, s_bg, s_bn, s_bk, STAGES,
                                       SB_SCALAR, SA_SMEM, NO_PROMO, NO_LOADS, PROBE, pbase, pw, mma_layout,
                                       row_layout, BLOCK_M, BLOCK_N)
                it = it + num_k
                if HAS_SIGNAL:
                    pend, tc = _tile_epilogue(acc, c_smem, d_desc, d_ptr, c_ptr, masked_m_ptr, m_indices_ptr,
                                              signal_ptr, g, g64, m_blk, off_m, off_n, M, N, num_m_blocks, s_dg,
                                              s_dm, s_cg, s_cm, MODE, TMA_STORE, HAS_C, HAS_SIGNAL, out_layout,
                                              idx_layout, dsf_ptr, s_fg, s_fm, D_FP8, DIAG, pend, tc, sig_full,
                                              sig_free, SIG_WARP)
                else:
                    _tile_epilogue(acc, c_smem, d_desc, d_ptr, c_ptr, masked_m_ptr, m_indices_ptr, signal_ptr,
                                   g, g64, m_blk, off_m, off_n, M, N, num_m_blocks, s_dg, s_dm, s_cg, s_cm,
                                   MODE, TMA_STORE, HAS_C, HAS_SIGNAL, out_layout, idx_layout, dsf_ptr, s_fg,
                                   s_fm, D_FP8, DIAG)
        if TMA_STORE and HAS_SIGNAL:
            pend, tc = _publish_pending(pend, tc, signal_ptr, sig_full, sig_free, SIG_WARP)
        if TMA_STORE:
            tma.store_wait(pendings=0)
        if PROBE:
            _stamp(hdr, hw, 0, _HDR_CLK1)
            _stamp(hdr, hw, 0, _HDR_NS1, 1)

    @gluon.jit
    def _consumer_wide(a_bufs, b_bufs, empty_bars, full_bars, d_desc, sfa_ptr, sfb_ptr, M, N, K,
                       s_am, s_ak, s_bn, s_bk,
                       BLOCK_M: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr,
                       PDL_WAIT: gl.constexpr = False, NH: gl.constexpr = 2, PROBE: gl.constexpr = False,
                       probe_ptr=None, DIAG: gl.constexpr = 0, sa_bufs=None, SA_SMEM: gl.constexpr = False):
        """One consumer warpgroup of the opt-in 128x256 dense tile (``GluonConfig.wide_n``, ``NH`` = 2 halves)
        or of the opt-in split 128x128 tile (:func:`split_config`, ``NH`` = 1).

        The two warpgroups are separate 4-warp partitions (``WG`` 0/1: rows [64*WG, 64*WG+64) of the
        tile, A box ``2*stage+WG``), so neither waits for the other: no partition-wide ``bar.sync``
        couples them, and each stage's empty barrier takes one arrive from each.  Wide (``NH`` 2): a warpgroup
        owns 64 x 256 outputs: accumulators ``accL``/``accR`` (columns [0, 128) and [128, 256), one B scale
        block each) and ONE 64-register scratch ``S`` (64 + 64 + 64 registers a thread; a second scratch would
        need 256).  Per K-slice: MMA(left) -> S, wait, promote into accL, MMA(right) -> S, wait, free the stage,
        promote into accR.  While one warpgroup promotes, the tensor cores run the other's MMA (they
        execute in issue order, so the two drift half an MMA apart and stay there); each stage carries
        25% fewer operand bytes per FLOP than the 128x128 tile, which is what that main loop is short of
        (benchmarks/GLUON_NOTES.md, "What limits the big shapes").
        Split (``NH`` 1): a warpgroup owns 64 x 128 outputs (``accL``, one scratch ``S``, B box ``stage``);
        per K-slice DeepGEMM's order: wait full -> MMA -> wait(0) -> arrive empty -> promote.

        ``SA_SMEM``: the warpgroup reads its 64 rows of A's scales from the stage (the producer's copy, as in the
        default kernel) right after the full wait, instead of loading them from global memory a slice ahead.

        Diagnostics (``benchmarks/gluon_probe.py --variants``): ``PROBE`` stamps per K-slice (event meanings
        at :data:`EV_C_HALF`), ``DIAG`` 3: no scale loads and no promotion FFMAs (waits and releases as usual;
        the last MMA of each tile is folded into ``accL`` so the MMA chain stays live).
        """
        BK: gl.constexpr = a_bufs.type.shape[2]
        WG_M: gl.constexpr = a_bufs.type.shape[1]
        HALF: gl.constexpr = b_bufs.type.shape[1]
        BLOCK_N: gl.constexpr = NH * HALF
        NO_PROMO: gl.constexpr = DIAG == 3
        num_warps: gl.constexpr = gl.num_warps()
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HALF, 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        idx_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        c_smem = gl.allocate_shared_memory(d_desc.dtype, d_desc.block_type.shape, d_desc.layout)

        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        total = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
        num_k = K // BK
        last_nb = (N - 1) // 128
        zero = gl.to_tensor(0)
        it = gl.to_tensor(0)
        S = gl.zeros([WG_M, HALF], gl.float32, mma_layout)
        if PROBE:
            pbase, pw, prow = _probe_row(probe_ptr, False, WG)
            hdr = probe_ptr + pid * _PR_CTA + 3 * _PR_ROW
            hw = pw * (prow == 0).to(gl.int32)          # the header: warpgroup 0's writer only
            _stamp(hdr, hw, 0, _HDR_CLK0)
            _stamp(hdr, hw, 0, _HDR_NS0, 1)
            _stamp(hdr, hw, 0, _HDR_SMID, 2)
        if PDL_WAIT:
            _grid_dependency_wait()     # the A scales (see _consumer)
        for t in range(pid, total, nprog):
            g, m_blk, n_blk, row_a, valid, c0, c1, c2 = _locate(
                t, zero, zero, zero, M, N, 1, sfa_ptr, sfa_ptr, 0, BLOCK_M, BLOCK_N, GROUP_M, idx_layout)
            off_m = m_blk * BLOCK_M + WG * WG_M
            off_n = n_blk * BLOCK_N
            offs_m = off_m + gl.arange(0, WG_M, layout=row_layout)
            m_ok = offs_m < M
            sa_ptrs = sfa_ptr + offs_m * s_am
            sbL_ptr = sfb_ptr + (off_n // 128) * s_bn
            sbR_ptr = sfb_ptr + gl.minimum(off_n // 128 + 1, last_nb) * s_bn
            accL = gl.zeros([WG_M, HALF], gl.float32, mma_layout)
            accR = gl.zeros([WG_M, HALF], gl.float32, mma_layout)
            # the scales of slice kb are in registers when slice kb starts; slice kb+1's load meanwhile
            if NO_PROMO:
                sa = gl.to_tensor(0.0)      # DIAG 3: no scale loads (the values are never read)
                sbL = sa
                sbR = sa
            else:
                if not SA_SMEM:         # (with SA_SMEM each slice reads its own from the stage, in the loop)
                    sa = gl.load(sa_ptrs, mask=m_ok, other=0.0)
                sbL = gl.load(sbL_ptr)
                sbR = gl.load(sbR_ptr)
            for kb in range(num_k):
                if NO_PROMO:
                    na = sa
                    nbL = sbL
                    nbR = sbR
                else:
                    kn = gl.minimum(kb + 1, num_k - 1)
                    if not SA_SMEM:
                        na = gl.load(sa_ptrs + kn * s_ak, mask=m_ok, other=0.0)
                    nbL = gl.load(sbL_ptr + kn * s_bk)
                    nbR = gl.load(sbR_ptr + kn * s_bk)
                s = it % STAGES
                if PROBE:
                    # as in _issue: the partition bar.sync before the full wait made explicit between two stamps
                    _stamp(pbase, pw, it, _EV_C_PRE_BAR)
                    gl.thread_barrier()
                    _stamp(pbase, pw, it, _EV_C_PRE_WAIT)
                mbarrier.wait(full_bars.index(s), (it // STAGES) & 1)
                if PROBE:
                    _stamp(pbase, pw, it, _EV_C_FULL)
                if SA_SMEM:
                    # this warpgroup's rows of the stage's A scales; read before the stage is released below
                    sa = sa_bufs.index(s).slice(WG * WG_M, WG_M).load(row_layout)
                a_s = a_bufs.index(2 * s + WG)
                if NH == 2:
                    # No MMA is in flight while S is read (wait 0), so no identity pin is needed here
                    # (unlike _retire); ptxas reports neither C7514 nor C7515 (tests/cpu).
                    S = warpgroup_mma(a_s, b_bufs.index(2 * s).permute((1, 0)), S, use_acc=False, is_async=True)
                    S = warpgroup_mma_wait(num_outstanding=0, deps=(S, ))
                    if not NO_PROMO:
                        accL = accL + S * gl.expand_dims(sa * sbL, 1)
                    if PROBE:
                        _stamp(pbase, pw, it, _EV_C_HALF)
                    if NO_PROMO:
                        # DIAG 3: nothing reads the left MMA's result, and ptxas drops an MMA whose result is dead
                        # when the next one ignores S (use_acc=False); a use_acc that is false at run time (K < 0
                        # never holds) but unknown to the compilers keeps S an input of the right MMA instead.
                        S = warpgroup_mma(a_s, b_bufs.index(2 * s + 1).permute((1, 0)), S, use_acc=K < 0,
                                          is_async=True)
                    else:
                        S = warpgroup_mma(a_s, b_bufs.index(2 * s + 1).permute((1, 0)), S, use_acc=False,
                                          is_async=True)
                else:
                    S = warpgroup_mma(a_s, b_bufs.index(s).permute((1, 0)), S, use_acc=False, is_async=True)
                if PROBE:
                    _stamp(pbase, pw, it, _EV_C_ISSUED)
                S = warpgroup_mma_wait(num_outstanding=0, deps=(S, ))
                if PROBE:
                    _stamp(pbase, pw, it, _EV_C_MMA_DONE)
                mbarrier.arrive(empty_bars.index(s), count=1)
                if PROBE:
                    _stamp(pbase, pw, it, _EV_C_ARRIVED)
                if not NO_PROMO:
                    if NH == 2:
                        accR = accR + S * gl.expand_dims(sa * sbR, 1)
                    else:
                        accL = accL + S * gl.expand_dims(sa * sbL, 1)
                if PROBE:
                    _stamp(pbase, pw, it, _EV_C_PROMOTED)
                if not SA_SMEM:
                    sa = na
                sbL = nbL
                sbR = nbR
                it += 1
            if NO_PROMO:
                # DIAG 3: fold the tile's last MMA result into accL once per tile so that the MMA chain stays
                # live; the pin (as in _retire) keeps the adds ahead of the next tile's first MMA into S.
                accL = accL + S
                S = _pin(S, accL)

            # epilogue: the two halves go out one after the other through one [64, 128] buffer; halves
            # wholly past M or N are skipped (their operands were stand-in rows, see _producer)
            if off_m < M:
                tma.store_wait(pendings=0)
                c_smem.store(accL.to(d_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(d_desc, [off_m, off_n], c_smem)
                if NH == 2:
                    if off_n + HALF < N:
                        tma.store_wait(pendings=0)
                        c_smem.store(accR.to(d_desc.dtype))
                        fence_async_shared()
                        tma.async_copy_shared_to_global(d_desc, [off_m, off_n + HALF], c_smem)
        tma.store_wait(pendings=0)
        if PROBE:
            _stamp(hdr, hw, 0, _HDR_CLK1)
            _stamp(hdr, hw, 0, _HDR_NS1, 1)

    @gluon.jit
    def fp8_gemm_ws_kernel(a_desc, b_desc, d_desc,
                           d_ptr, c_ptr, sfa_ptr, sfb_ptr, masked_m_ptr, m_indices_ptr, signal_ptr,
                           M, N, K, G,
                           s_dg, s_dm, s_cg, s_cm, s_ag, s_am, s_ak, s_bg, s_bn, s_bk,
                           MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           GROUP_M: gl.constexpr, STAGES: gl.constexpr, TMA_STORE: gl.constexpr,
                           HAS_C: gl.constexpr, HAS_SIGNAL: gl.constexpr, SB_SCALAR: gl.constexpr,
                           K_ROTATE: gl.constexpr, PRODUCER_REGS: gl.constexpr, WIDE_N: gl.constexpr = False,
                           PROBE: gl.constexpr = False, probe_ptr=None, PDL_WAIT: gl.constexpr = False,
                           DIAG: gl.constexpr = 0, BN_TAIL: gl.constexpr = 0, b2_desc=None,
                           SA_SMEM: gl.constexpr = False, dsf_ptr=None, s_fg=0, s_fm=0,
                           D_FP8: gl.constexpr = False, SIG_WARP: gl.constexpr = False):
        """Persistent warp-specialised FP8 GEMM (see the module docstring).

        ``SA_SMEM`` (default kernel only, not with PROBE or DIAG): A's scales travel with each stage (the
        producer copies them into shared memory with cp.async, tracked by the full barrier) instead of being
        loaded from global memory by the consumer.

        ``a_desc``: TMA over A as 2-D [rows, K] (masked: [G*max_m, K]); ``b_desc``: B as [G*N, K];
        ``d_desc``: TMA over D as 2-D (BF16 without C, ``TMA_STORE``; the grouped modes store only their full
        blocks by it).  ``M`` is the row count of one group (dense: M, masked: max_m, contiguous: M_total).  ``WIDE_N`` (dense, BF16 TMA store, 128x256 tiles,
        ``num_warps=4``; also ``BLOCK_N`` 128 = one B box: the split tile): two consumer partitions of one
        warpgroup each, A and B in 64- and 128-row boxes, see :func:`_consumer_wide`.  ``PROBE`` (diagnostics,
        default and wide/split kernels, ``probe_ptr``: int64
        ``[programs * PROBE_CTA_STRIDE]``, zeroed): %clock64 stamps around the barrier waits, MMA issue/wait,
        empty arrive and promotion of the first ``PROBE_SLICES`` K-slices of each program (layout at
        ``PROBE_SLICES``; ``benchmarks/gluon_probe.py`` reads them).  With ``PROBE`` False (the default) no
        probe code is generated: the SASS is the same as without these arguments.  ``PDL_WAIT`` (launched with
        ``launch_pdl=True``, see :func:`launch`'s ``pdl``): the producer issues its B prefetch
        (:func:`_prefetch_b`) and every partition its ``griddepcontrol.wait`` before reading A or its scales;
        off (the default) the SASS is that of the kernel before the flag existed.  ``DIAG`` (diagnostics only,
        dense default kernel without PDL; ``DIAG_*`` at the top of the module, ``benchmarks/gluon_probe.py
        --diag``): 1 = every K-slice loaded from K coordinate 0 (L2-resident operands), 2 = each stage filled
        once then only full-barrier arrives (no TMA), 3 = no scale loads / promotion, 4 = 2 + 3; the output is
        garbage in modes 1-4; the wide/split kernels take mode 3 only.  ``DIAG`` 0 (the default) compiles to the
        production SASS.  ``D_FP8`` (default kernel, 128-wide tiles, register stores; D an FP8 tensor, ``dsf_ptr``
        uint8 with group / row strides ``s_fg`` / ``s_fm``): D gets the FP8 combine payload of the BF16 result
        (:func:`_store_fp8_payload`).  ``BN_TAIL`` (16; ``b2_desc``: B in [BN_TAIL, 128] boxes; 128-wide blocks, plain stores,
        no signal, PDL, probe or DIAG): each tile also computes a BN_TAIL-wide slice of the N remainder
        (:func:`_consumer_tail`); 0/None (the default) compiles to the production SASS.  ``SIG_WARP`` (masked calls
        with ``HAS_SIGNAL``; launch sets it while :data:`SIGNAL_WARP`): the counters are bumped by a separate
        one-warp partition that the consumer hands each finished tile to (:func:`_hand_off`), not by the consumer.
        """
        if WIDE_N:
            # B boxes a stage: 2 (128x256) or 1 (the split 128x128 tile)
            WIDE_NH: gl.constexpr = BLOCK_N // b_desc.block_type.shape[0]
            a_bufs = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES] + a_desc.block_type.shape, a_desc.layout)
            b_bufs = gl.allocate_shared_memory(b_desc.dtype, [WIDE_NH * STAGES] + b_desc.block_type.shape,
                                               b_desc.layout)
        else:
            a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
            b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        if BN_TAIL:
            b2_bufs = gl.allocate_shared_memory(b2_desc.dtype, [STAGES] + b2_desc.block_type.shape, b2_desc.layout)
        else:
            b2_bufs = b_bufs
        if SA_SMEM:
            sa_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        else:
            sa_bufs = a_bufs
        empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        full_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty_bars.index(i), count=2 if WIDE_N else 1)   # wide: one arrive per warpgroup
            # SA_SMEM: the producer warp's 32 cp.async arrivals besides its expect-arrive (_copy_sa)
            mbarrier.init(full_bars.index(i), count=33 if SA_SMEM else 1)
        if SIG_WARP:
            # the consumer -> signal warp ring (_hand_off / _signaller)
            sig_full = gl.allocate_shared_memory(gl.int64, [_SIG_SLOTS, 1], mbarrier.MBarrierLayout())
            sig_free = gl.allocate_shared_memory(gl.int64, [_SIG_SLOTS, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(_SIG_SLOTS):
                mbarrier.init(sig_full.index(i), count=1)
                mbarrier.init(sig_free.index(i), count=1)
        else:
            sig_full = empty_bars       # placeholders, never touched without SIG_WARP
            sig_free = empty_bars

        if WIDE_N:
            WNH: gl.constexpr = BLOCK_N // b_desc.block_type.shape[0]
            gl.static_assert(MODE == 0 and TMA_STORE and BLOCK_M == 2 * a_desc.block_type.shape[0]
                             and (WNH == 1 or WNH == 2) and BLOCK_N == WNH * b_desc.block_type.shape[0]
                             and gl.num_warps() == 4)
            # (an AOT compile that does not name DIAG passes None: same as 0)
            gl.static_assert(not DIAG or (DIAG == 3 and not PDL_WAIT),
                             "DIAG: wide/split kernels take mode 3 only, without PDL_WAIT")
            # 12 warps share the register file (the 1-warp producer occupies a warpgroup's share):
            # the second consumer warpgroup gets what the producer leaves, like the first.
            WG_REGS: gl.constexpr = (65536 // 32 - 4 * PRODUCER_REGS) // 8 // 8 * 8
            gl.static_assert(not SA_SMEM or (not DIAG and not PROBE), "SA_SMEM: not with PROBE or DIAG")
            gl.warp_specialize([
                (_consumer_wide, (a_bufs, b_bufs, empty_bars, full_bars, d_desc, sfa_ptr, sfb_ptr, M, N, K,
                                  s_am, s_ak, s_bn, s_bk, BLOCK_M, GROUP_M, STAGES, 0, PDL_WAIT, WNH, PROBE,
                                  probe_ptr, DIAG, sa_bufs, SA_SMEM)),
                (_consumer_wide, (a_bufs, b_bufs, empty_bars, full_bars, d_desc, sfa_ptr, sfb_ptr, M, N, K,
                                  s_am, s_ak, s_bn, s_bk, BLOCK_M, GROUP_M, STAGES, 1, PDL_WAIT, WNH, PROBE,
                                  probe_ptr, DIAG, sa_bufs, SA_SMEM)),
                (_producer, (a_desc, b_desc, a_bufs, b_bufs, empty_bars, full_bars, M, N, K, G,
                             masked_m_ptr, m_indices_ptr, MODE, BLOCK_M, BLOCK_N, GROUP_M, STAGES, False, True,
                             PROBE, probe_ptr, PDL_WAIT, 0, None, None, 0, sa_bufs, sfa_ptr, s_ag, s_am, s_ak,
                             SA_SMEM)),
            ], [4, 1], [WG_REGS, PRODUCER_REGS])
        elif BN_TAIL:
            gl.static_assert(BLOCK_N == 128 and not TMA_STORE and not HAS_SIGNAL and not PDL_WAIT and not PROBE
                             and not DIAG, "BN_TAIL: 128-wide blocks, plain stores, no signal, PDL, probe or DIAG")
            gl.warp_specialize([
                (_consumer_tail, (a_bufs, b_bufs, b2_bufs, empty_bars, full_bars,
                                  d_ptr, c_ptr, sfa_ptr, sfb_ptr, masked_m_ptr, m_indices_ptr,
                                  M, N, K, G,
                                  s_dg, s_dm, s_cg, s_cm, s_ag, s_am, s_ak, s_bg, s_bn, s_bk,
                                  MODE, BLOCK_M, BLOCK_N, GROUP_M, STAGES, HAS_C, K_ROTATE, BN_TAIL)),
                (_producer, (a_desc, b_desc, a_bufs, b_bufs, empty_bars, full_bars, M, N, K, G,
                             masked_m_ptr, m_indices_ptr, MODE, BLOCK_M, BLOCK_N, GROUP_M, STAGES, K_ROTATE,
                             False, False, None, False, 0, b2_desc, b2_bufs, BN_TAIL)),
            ], [1], [PRODUCER_REGS])
        else:
            # (an AOT compile that does not name DIAG passes None: same as 0)
            gl.static_assert(not DIAG or (MODE == 0 and not PDL_WAIT and DIAG <= 8 and (DIAG != 8 or TMA_STORE)),
                             "DIAG: dense mode without PDL_WAIT, modes 0-8 (8: TMA-store kernels)")
            gl.static_assert(not SA_SMEM or (not DIAG and not PROBE), "SA_SMEM: not with PROBE or DIAG")
            gl.static_assert(not D_FP8 or (BLOCK_N == 128 and not TMA_STORE and not HAS_C),
                             "D_FP8: 128-wide tiles stored through registers, no C")
            # The two calls differ by the signal warp only; their argument tuples are spelled out twice because a
            # tuple of jit values holding None (d_desc, probe_ptr, ...) cannot be bound to a name in a jit function.
            if SIG_WARP:
                gl.static_assert(HAS_SIGNAL and MODE == 1, "SIG_WARP: masked calls with an SBO signal")
                gl.warp_specialize([
                    (_consumer, (a_bufs, b_bufs, empty_bars, full_bars, d_desc,
                                 d_ptr, c_ptr, sfa_ptr, sfb_ptr, masked_m_ptr, m_indices_ptr, signal_ptr,
                                 M, N, K, G,
                                 s_dg, s_dm, s_cg, s_cm, s_ag, s_am, s_ak, s_bg, s_bn, s_bk,
                                 MODE, BLOCK_M, BLOCK_N, GROUP_M, STAGES, TMA_STORE, HAS_C, HAS_SIGNAL, SB_SCALAR,
                                 K_ROTATE, PROBE, probe_ptr, PDL_WAIT, DIAG, sa_bufs, SA_SMEM, dsf_ptr, s_fg, s_fm,
                                 D_FP8, sig_full, sig_free, SIG_WARP)),
                    (_producer, (a_desc, b_desc, a_bufs, b_bufs, empty_bars, full_bars, M, N, K, G,
                                 masked_m_ptr, m_indices_ptr, MODE, BLOCK_M, BLOCK_N, GROUP_M, STAGES, K_ROTATE,
                                 False, PROBE, probe_ptr, PDL_WAIT, DIAG, None, None, 0,
                                 sa_bufs, sfa_ptr, s_ag, s_am, s_ak, SA_SMEM)),
                    (_signaller, (sig_full, sig_free, signal_ptr, masked_m_ptr, m_indices_ptr, M, N, G,
                                  MODE, BLOCK_M, BLOCK_N, GROUP_M)),
                ], [1, 1], [PRODUCER_REGS, PRODUCER_REGS])
            else:
                gl.warp_specialize([
                    (_consumer, (a_bufs, b_bufs, empty_bars, full_bars, d_desc,
                                 d_ptr, c_ptr, sfa_ptr, sfb_ptr, masked_m_ptr, m_indices_ptr, signal_ptr,
                                 M, N, K, G,
                                 s_dg, s_dm, s_cg, s_cm, s_ag, s_am, s_ak, s_bg, s_bn, s_bk,
                                 MODE, BLOCK_M, BLOCK_N, GROUP_M, STAGES, TMA_STORE, HAS_C, HAS_SIGNAL, SB_SCALAR,
                                 K_ROTATE, PROBE, probe_ptr, PDL_WAIT, DIAG, sa_bufs, SA_SMEM, dsf_ptr, s_fg, s_fm,
                                 D_FP8, sig_full, sig_free, SIG_WARP)),
                    (_producer, (a_desc, b_desc, a_bufs, b_bufs, empty_bars, full_bars, M, N, K, G,
                                 masked_m_ptr, m_indices_ptr, MODE, BLOCK_M, BLOCK_N, GROUP_M, STAGES, K_ROTATE,
                                 False, PROBE, probe_ptr, PDL_WAIT, DIAG, None, None, 0,
                                 sa_bufs, sfa_ptr, s_ag, s_am, s_ak, SA_SMEM)),
                ], [1], [PRODUCER_REGS])


# =====================================================================================
# Host side
# =====================================================================================

@dataclasses.dataclass(frozen=True)
class GluonConfig:
    block_m: int
    block_n: int
    stages: int
    num_warps: int
    # Tile order: group_m m-blocks sweep the n-blocks together; 0 = every m-block of the call (whole-M order,
    # picked by :func:`whole_m_order` for dense calls with a small A and a short K).
    group_m: int = 8
    producer_regs: int = 40
    k_rotate: bool = False
    # Opt-in 128x256 dense tiles (block_n 256; two independent one-warpgroup consumer partitions, each
    # 64 x 256 as two 128-wide halves through one scratch accumulator, see ``_consumer_wide``; num_warps
    # is then the default partition's 4).  Only for dense BF16 output through TMA stores; ``launch``
    # falls back to the picked config for anything else.  With block_n 128 (:func:`split_config`, opt-in only,
    # never picked): the "split" 128x128 tile, the same two one-warpgroup partitions, each 64 x 128 with one
    # scratch (DeepGEMM's order: MMA, wait(0), release the stage, promote).
    wide_n: bool = False
    # 128-wide blocks that each also compute a bn_tail-wide slice of the N remainder (N = 128 q + r: q tile
    # columns instead of q + 1; see ``_consumer_tail``).  Only where :func:`tail_ok` holds; launch falls back
    # to the plain 128x128 kernel otherwise.
    bn_tail: int = 0
    # A's scales through shared memory with each stage (``SA_SMEM``; the plain kernel only: the wide, split
    # and tail kernels load them as before).  None: FP8GEMM_GLUON_SA_SMEM if set (runtime.gluon_sa_smem), else
    # by the call's scale layout and size (:func:`sa_smem_pays`), decided in ``launch``.
    sa_smem: bool | None = None

    @property
    def split(self) -> bool:
        """The split 128x128 tile of :func:`split_config` (the wide path with one 128-wide half)."""
        return self.wide_n and self.block_n == 128

    @property
    def maxnreg(self) -> int:
        # 12 (or 8) warps share 64K registers: the launch cap, setmaxnreg moves them to the consumer.
        # (wide_n: a 4-warp default partition + a 4-warp consumer worker + the producer -> 12 warps.)
        total_warps = self.num_warps + (8 if self.wide_n else 4)
        return min(255, (65536 // (total_warps * 32)) // 8 * 8)


_BLOCK_NS = (16, 32, 64, 128)
# Let pick_config choose the opt-in 128x256 tile (GluonConfig.wide_n) where the model prefers it.  Off until
# measured: benchmarks/gluon_dev.py --variant wide compares it with the default on the GPU.
WIDE_N_DEFAULT = False
# Per-SM rates for the tile-time model below (H100/H200 class, calibrated on measured tiles).
_SM_FLOPS = 8.5e12          # FP8 tensor FLOP/s one SM sustains in the 128x128 main loop
_SM_BYTES = 70e9            # operand bytes/s one SM streams while all SMs stream
_DRAM_BYTES = 3.5e12        # unique bytes/s from device memory
_TILE_OVERHEAD = 1.5e-6     # s per tile: prologue, epilogue, pipeline refill
_BN_EFF = {16: 0.45, 32: 0.65, 64: 0.85, 128: 1.0, 256: 1.25}   # 256: predicted, not yet measured


def estimate_seconds(rows: int, groups: int, n: int, k: int, bm: int, bn: int, num_sms: int,
                     b_groups: int = 1) -> float:
    """Rough time of one launch with (bm, bn) tiles: waves of tiles, each bound by MMA or operand
    streaming, and never under the device-memory floor.  Used to rank tile shapes, not to predict."""
    tiles = groups * math.ceil(rows / bm) * math.ceil(n / bn)
    waves = math.ceil(tiles / max(1, num_sms))
    eff = _BN_EFF[bn] * (1.0 if bm == 128 else 0.9)
    t_mma = 2.0 * bm * bn * k / (_SM_FLOPS * eff)
    t_mem = (bm + bn) * k / _SM_BYTES
    floor = (groups * rows * k + b_groups * n * k) / _DRAM_BYTES
    return max(waves * (max(t_mma, t_mem) + _TILE_OVERHEAD), floor)


def _stages(bm: int, bn: int, epi_bytes: int, sa_smem: bool = False) -> int:
    """Pipeline stages that fit beside the epilogue buffer: a stage holds the A and B boxes, and with
    ``sa_smem`` also A's scales (``BLOCK_M`` floats)."""
    stage = (bm + bn) * BLOCK_K + (4 * bm if sa_smem else 0)
    return max(2, min(16, (_SMEM_BUDGET - epi_bytes) // stage))


def _epi_bytes(bm: int, bn: int, tma_store: bool, out_bytes: int, has_c: bool, grouped: bool = False) -> int:
    """Shared memory of the epilogue: the TMA store's tile, or the layout conversion's scratch (FP32 with C);
    a grouped call with TMA stores has both (its partial blocks go out through registers)."""
    regs = bm * bn * (4 if (has_c or out_bytes == 4) else 2)
    if not tma_store:
        return regs
    return bm * bn * out_bytes + (regs if grouped else 0)


def _fit_stages(bm: int, bn: int, stages: int, epi_bytes: int, sa_smem: bool) -> int:
    """``stages`` lowered until the kernel's shared memory fits the block limit: the stages, two barriers a stage
    (16 bytes), the epilogue's buffers, and a small reserve (the compiler's other barriers: 92-220 bytes
    measured on the AOT builds).  The picks use the rounder _SMEM_BUDGET; this is the hard check (a grouped
    64x64 tile with A's scales in shared memory and both epilogue buffers went 476 bytes over at 13 stages)."""
    stage = (bm + bn) * BLOCK_K + (4 * bm if sa_smem else 0) + 16
    while stages > 2 and stages * stage + epi_bytes + 256 > _SMEM_LIMIT:
        stages -= 1
    return stages


def transpose_for_sa(mode: str, m: int, n: int, k: int, sfa, cfg: GluonConfig, *, signal: bool = False,
                     pdl: bool = False) -> bool:
    """Whether ``launch`` copies row-major A scales MN-major to run SA_SMEM (``TRANSPOSE_ROW_MAJOR_FOR_SA``): a
    dense or contiguous call that :func:`sa_smem_pays` leaves off only for its layout, whose kernel has
    SA_SMEM (not the wide or remainder-tail tiles) and at least 8 K-slices a tile for the copy to pay
    (4096x32768x512 measured level with MN-major scales); not under PDL (the copy would sit between the kernels
    it chains) nor with FP8GEMM_GLUON_SA_SMEM set."""
    if not TRANSPOSE_ROW_MAJOR_FOR_SA or mode == "masked" or pdl or runtime.gluon_sa_smem() is not None:
        return False
    if cfg.sa_smem is not None or cfg.wide_n or k // BLOCK_K < 8 or sfa.stride(-1) != 1 or sfa.shape[-1] < 2:
        return False
    if cfg.bn_tail and cfg.block_m == 128 and cfg.block_n == 128 and tail_ok(n, cfg.bn_tail, signal=signal, pdl=pdl):
        return False
    return not sa_smem_pays(mode, m, sfa)


def sa_smem_pays(mode: str, m: int, sfa) -> bool:
    """Whether A's scales should come through shared memory for this call (see SA_SMEM_ROW_MAJOR_MAX_M):
    MN-major scales (M contiguous) always, row-major ones for small dense calls; grouped calls only while
    SA_SMEM_GROUPED."""
    if mode != "dense" and not SA_SMEM_GROUPED:
        return False
    mn_major = sfa.stride(-2) == 1 and sfa.shape[-1] > 1
    return mn_major or (mode == "dense" and m <= SA_SMEM_ROW_MAJOR_MAX_M)


_WIDE_SMEM = 227 * 1024 - 2048      # barriers + warp_specialize captures fit in the last 2 KB


def wide_config(group_m: int = 8) -> GluonConfig:
    """The 128x256 dense config (``wide_n``): 48 KB stages and one [64, 128] BF16 epilogue buffer per
    consumer warpgroup, so 4 stages fit the 227 KB only with the 2 KB reserve above (the 220 KB budget
    would allow 3)."""
    stages = max(2, min(4, (_WIDE_SMEM - 2 * 64 * 128 * 2) // ((128 + 256) * BLOCK_K)))
    return GluonConfig(128, 256, stages, 4, group_m=group_m, wide_n=True)


# A 128x128 + 16 tail tile costs 1.3-1.45x a plain 128x128 tile (measured: benchmarks/tail_ab.py, RESULTS.md
# session 4; more than its 1.125x FLOPs: the small 64x16 MMAs, a second commit group a slice, plain stores), so
# it pays only where it saves a wave out of few: dense, K >= 4096, tail waves * 1.4 < plain waves.  On an H100
# that held for all six measured rows (4 stages: m4096 n576 k7168 1.38x faster, m8192 n576 1.17x; 5 stages, the
# default since, 4% and 1% more; n2112, m2048 n576, n1088 k2048 and m128 stay plain, where the tail was 1-48%
# slower).
TAIL_DEFAULT = True
_TAIL_COST = 1.4


def _tail_pays(m: int, n: int, k: int, num_sms: int) -> bool:
    if not tail_ok(n) or k < 4096:
        return False
    waves_tail = math.ceil(math.ceil(m / 128) * (n // 128) / num_sms)
    waves_plain = math.ceil(math.ceil(m / 128) * math.ceil(n / 128) / num_sms)
    return waves_tail * _TAIL_COST < waves_plain


def tail_ok(n: int, bn_tail: int = 16, *, signal: bool = False, pdl: bool = False) -> bool:
    """Whether N's remainder over 128 can be shared out in ``bn_tail``-wide slices, one per full block:
    N a multiple of ``bn_tail``, a non-zero remainder of at most ``bn_tail`` columns per full block.  Not with
    SBO signals (their counters count ceil(N / block_n) tiles) or PDL.  Only ``bn_tail`` 16 is built and
    tested."""
    q, r = divmod(n, 128)
    return bn_tail == 16 and not signal and not pdl and n % bn_tail == 0 and r > 0 and q > 0 and \
        r // bn_tail <= q


def tail_config(bn_tail: int = 16, group_m: int = 8, out_bytes: int = 2) -> GluonConfig:
    """128x128 tiles plus a ``bn_tail``-wide remainder slice each (``GluonConfig.bn_tail``), plain stores."""
    stage = (128 + 128 + bn_tail) * BLOCK_K
    # Shared memory: the stages and the epilogue's layout-conversion scratch (128 x 128 x out_bytes, AOT-checked):
    # BF16 out 5 stages of 34 KB (H100: 4% faster than 4 at m4096 n576, 3 stages 20% slower), FP32 out 4.
    # The TMA warp needs no more than 24 registers (no spills there; AOT test), and the consumer then gets 240:
    # with the producer's default 40 it would spill ~70 registers around the tile epilogue.
    return GluonConfig(128, 128, max(2, min(16, (_WIDE_SMEM - 128 * 128 * out_bytes) // stage)), 8, group_m=group_m,
                       producer_regs=24, bn_tail=bn_tail)


def wide_sa_stages(block_n: int) -> int:
    """Stages of the wide (``block_n`` 256) or split (128) kernel whose stages also carry A's 128 scales
    (SA_SMEM): as many as fit the block limit beside the two [64, 128] BF16 epilogue buffers, two barriers a stage
    and 512 bytes for the rest (72-100 in the AOT builds).  4 for wide and 5 for split, as without the scales."""
    stage = (128 + block_n) * BLOCK_K + 4 * 128 + 16
    return (_SMEM_LIMIT - 512 - 2 * 64 * 128 * 2) // stage


def split_config(group_m: int = 8, stages: int | None = None) -> GluonConfig:
    """The opt-in split 128x128 dense config (``wide_n`` with ``block_n`` 128, :attr:`GluonConfig.split`): two
    independent one-warpgroup consumer partitions, each 64 x 128 with one scratch accumulator, per K-slice
    wait full -> MMA -> wait(0) -> arrive empty -> promote (:func:`_consumer_wide` with one half).  Stages: by
    default those of the default 128x128 BF16 TMA-store kernel (5), so that the two differ only in the consumer;
    6 would fit (32 KB stages + two [64, 128] BF16 epilogue buffers).  Never chosen by :func:`pick_config`."""
    if stages is None:
        stages = _stages(128, 128, 128 * 128 * 2)
    assert 2 <= stages and stages * 2 * 128 * BLOCK_K + 2 * 64 * 128 * 2 <= _WIDE_SMEM, stages
    return GluonConfig(128, 128, stages, 4, group_m=group_m, wide_n=True)


def pick_config(mode: str, m: int, n: int, k: int, *, groups: int = 1, expected_m: int | None = None,
                max_block_n: int = 256, num_sms: int = 132, tma_store: bool = False, out_bytes: int = 2,
                has_c: bool = False, wide_n: bool | None = None) -> GluonConfig:
    """Tile shape by the model of :func:`estimate_seconds`: BLOCK_M 64 (one consumer warpgroup) or
    128 (two), BLOCK_N 16..128 (narrow tiles give small-M shapes enough programs to fill the SMs).
    ``wide_n`` (default :data:`WIDE_N_DEFAULT`): also consider the 128x256 tile of :func:`wide_config`
    for dense BF16 TMA-store calls."""
    if wide_n is None:
        wide_n = WIDE_N_DEFAULT
    return _pick_config(mode, m, n, k, groups, expected_m, max_block_n, num_sms, tma_store, out_bytes, has_c,
                        runtime.get_mk_alignment_for_contiguous_layout(), bool(wide_n))


@functools.lru_cache(maxsize=4096)
def _pick_config(mode, m, n, k, groups, expected_m, max_block_n, num_sms, tma_store, out_bytes, has_c,
                 alignment, wide_n=False) -> GluonConfig:
    if mode == "masked":
        rows, g = (expected_m if expected_m else m), groups
    elif mode == "contiguous":
        rows, g = m, 1
    else:
        rows, g = m, 1
    bms = (64, 128)
    if mode == "contiguous" and alignment % 128 != 0:
        bms = (64,)
    best = None
    for bm in bms:
        for bn in _BLOCK_NS:
            if bn > max(16, max_block_n):
                continue
            t = estimate_seconds(rows, g, n, k, bm, bn, num_sms, b_groups=groups if mode != "dense" else 1)
            waste = math.ceil(rows / bm) * bm - rows
            key = (t, waste, -bm * bn)   # ties: fewer padded rows, then the larger tile
            if best is None or key < best[0]:
                best = (key, bm, bn)
    if (wide_n and mode == "dense" and tma_store and out_bytes == 2 and not has_c and max_block_n >= 256
            and best[1:] == (128, 128)):
        t = estimate_seconds(rows, 1, n, k, 128, 256, num_sms)
        if t < best[0][0]:
            return wide_config()
    _, bm, bn = best
    k_rotate = False
    if mode == "masked" and bm == 64:
        # Weight-bound decode: a tile's cost is its B (weights) stream, A comes from L2, so what the model
        # above misjudges is the last wave.  Halve BLOCK_N when that fills the SMs' waves clearly better,
        # and stagger the tiles' K starts.  Measured on an H100 (benchmarks/masked_tiles.py, expected_m 20):
        # 64x64 with K rotation 4-7% faster on the 6-expert rows with 1.45-2.18 waves of 64x128 tiles,
        # equal within 2% where both widths fill their waves alike; rotation alone within -3%..+1%.
        if bn == 128 and _wave_fill(g * math.ceil(rows / 64) * math.ceil(n / 64), num_sms) > \
                _wave_fill(g * math.ceil(rows / 64) * math.ceil(n / 128), num_sms) + 0.1:
            bn = 64
        k_rotate = True
    if TAIL_DEFAULT and mode == "dense" and (bm, bn) == (128, 128) and _tail_pays(m, n, k, num_sms):
        return tail_config(out_bytes=out_bytes)
    return GluonConfig(bm, bn, _stages(bm, bn, _epi_bytes(bm, bn, tma_store, out_bytes, has_c)),
                       8 if bm == 128 else 4, group_m=0 if whole_m_order(mode, m, k, bm) else 8, k_rotate=k_rotate)


# Whole-M tile order for dense calls whose A is small against the 50 MB L2 and whose K is short.  With groups of 8
# m-blocks B is read from DRAM once per group, the output written in between evicting it from L2; sweeping every
# m-block per n-block keeps A resident and reads B once.  H100 (benchmarks/raster_ab.py, RESULTS.md session 12):
# m4096 n32768 k512 1.06x, n24576 k1536 1.03x, n7168 k2048 level; at k7168 (A 29 MB) 0.94x on n4096, so not there.
WHOLE_M_MAX_A_BYTES = 12 << 20
WHOLE_M_MAX_K = 2048


def whole_m_order(mode: str, m: int, k: int, block_m: int) -> bool:
    """True when a dense call should walk its tiles in whole-M order (``GluonConfig.group_m`` 0): more than 8
    128-row m-blocks (fewer are one group anyway; 64-row tiles not measured), A (``m * k`` FP8 bytes) at most
    :data:`WHOLE_M_MAX_A_BYTES`, K at most :data:`WHOLE_M_MAX_K`."""
    return (mode == "dense" and block_m == 128 and math.ceil(m / block_m) > 8 and m * k <= WHOLE_M_MAX_A_BYTES
            and k <= WHOLE_M_MAX_K)


def _wave_fill(tiles: int, num_sms: int) -> float:
    """Fraction of the SM-slots of ``ceil(tiles / num_sms)`` waves that ``tiles`` equal tiles occupy."""
    return tiles / (max(1, math.ceil(tiles / max(1, num_sms))) * max(1, num_sms))


def _tma_ok(t: torch.Tensor) -> bool:
    if t.stride(-1) != 1 or t.data_ptr() % 16 != 0:
        return False
    es = t.element_size()
    return all((s * es) % 16 == 0 for s in t.stride()[:-1])


def _flat_rows_ok(t: torch.Tensor) -> bool:
    """A 3-D [G, R, K] tensor that is one [G*R, K] matrix (group stride = R * row stride)."""
    return t.dim() == 3 and (t.shape[0] <= 1 or t.stride(0) == t.shape[1] * t.stride(1))


def supports(mode: str, a, sfa, b, sfb, d, c=None) -> bool:
    """True when the Gluon kernel can run this (validated) call on this device."""
    if not HAS_GLUON or runtime.interpreting() or mode not in _MODES:
        return False
    try:
        if not (a.is_cuda and runtime.is_sm90(a.device)):
            return False
        fp8 = torch.float8_e4m3fn
        if a.dtype != fp8 or b.dtype != fp8 or sfa is None or sfb is None:
            return False
        if sfa.dtype != torch.float32 or sfb.dtype != torch.float32:
            return False
        k = a.shape[-1]
        n = b.shape[-2]
        if k == 0 or k % BLOCK_K != 0 or n == 0 or b.shape[-1] != k:
            return False
        # FP8 D: the masked mode's FP8 combine payload (launch's d_sf)
        if d.dtype not in (torch.bfloat16, torch.float32, fp8) or d.stride(-1) != 1:
            return False
        if d.dtype == fp8 and (mode != "masked" or c is not None or n % 128):
            return False
        if c is not None and (mode != "dense" or c.dtype != torch.float32 or d.dtype != torch.float32
                              or c.stride(-1) != 1 or tuple(c.shape) != tuple(d.shape)):
            return False
        if not (_tma_ok(a) and _tma_ok(b)):
            return False
        if mode == "dense":
            return a.dim() == 2 and b.dim() == 2 and d.dim() == 2
        if mode == "masked":
            return a.dim() == 3 and b.dim() == 3 and d.dim() == 3 and _flat_rows_ok(a) and _flat_rows_ok(b)
        # contiguous
        return (a.dim() == 2 and b.dim() == 3 and d.dim() == 2 and _flat_rows_ok(b)
                and runtime.get_mk_alignment_for_contiguous_layout() % 64 == 0)
    except Exception:  # noqa: BLE001 - any odd object means "not for us"
        return False


_GL_DTYPES = _GL_DTYPES_INIT


@functools.lru_cache(maxsize=None)
def _nvmma(block: tuple, dtype_name: str):
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPES[dtype_name])


def _rows2d(t: torch.Tensor) -> int:
    """Rows of ``t`` seen as one 2-D [rows, last] matrix (the leading dimensions flattened; grouped operands
    and the masked layout's D are one matrix of all groups' rows)."""
    return math.prod(t.shape[:-1])


def _desc2d(t: torch.Tensor, rows: int, block: tuple, dtype_name: str):
    """TMA descriptor over ``t`` seen as a 2-D [rows, last] matrix (no copy).

    Built without the dataclass' checks (``supports`` has checked alignment and strides): the
    host path of a launch must stay in the microseconds for decode-sized problems.
    """
    desc = object.__new__(TensorDescriptor)
    desc.base = t
    desc.shape = [rows, t.shape[-1]]
    desc.strides = [t.stride(-2), 1]
    desc.block_shape = list(block)
    desc.layout = _nvmma(block, dtype_name)
    desc.padding = "zero"
    return desc


def _s3(t: torch.Tensor | None) -> tuple[int, int, int]:
    if t is None:
        return (0, 0, 0)
    s = tuple(t.stride())
    return (0,) * (3 - len(s)) + s


def plan(mode: str, a, sfa, b, sfb, d, *, expected_m=None, max_block_n: int = 256, num_sms: int,
         c=None) -> tuple[int, int]:
    """The ``(block_m, block_n)`` that :func:`launch` will use for the same call (known before launch, so
    callers can size and check the SBO signal array)."""
    cfg = _config_for(mode, a, b, d, c, expected_m, max_block_n, num_sms)
    return cfg.block_m, cfg.block_n


def _problem(mode, a, b, d, c, signal=None, pdl: bool = False):
    """(m, n, k, groups, tma_store) of a validated call; m is the row count of one group.  ``tma_store``: D is
    stored by TMA (the grouped modes: their full blocks), the one place this is decided (the tail kernel, a
    config choice, stores through registers whatever it says)."""
    k = a.shape[-1]
    n = b.shape[-2]
    if mode == "dense":
        m, groups = a.shape[0], 1
    elif mode == "masked":
        groups, m = a.shape[0], a.shape[1]
    else:
        m, groups = a.shape[0], b.shape[0]
    # Grouped calls store their full blocks by TMA too (the kernel keeps register stores for partial ones); the
    # masked layout's D must then be one [G * max_m, N] matrix.  With an SBO signal (masked calls) while
    # SIGNAL_TMA_STORE: the kernel signals each TMA-stored block once its writes are complete (at the next tile's
    # epilogue).  Grouped calls under PDL (the FP4 convert route) only while GROUPED_TMA_STORE_UNDER_PDL.
    tma_store = (d.dtype == torch.bfloat16 and c is None and _tma_ok(d)
                 and (mode != "masked" or _flat_rows_ok(d))
                 and (signal is None or (mode == "masked" and SIGNAL_TMA_STORE))
                 and (mode == "dense" or not pdl or GROUPED_TMA_STORE_UNDER_PDL))
    return m, n, k, groups, tma_store


def _config_for(mode, a, b, d, c, expected_m, max_block_n, num_sms, wide_n=None) -> GluonConfig:
    m, n, k, groups, tma_store = _problem(mode, a, b, d, c)
    cfg = pick_config(mode, m, n, k, groups=groups, expected_m=expected_m, max_block_n=max_block_n,
                      num_sms=num_sms, tma_store=tma_store, out_bytes=d.element_size(), has_c=c is not None,
                      wide_n=wide_n)
    if d.dtype == torch.float8_e4m3fn:      # the FP8 payload: one 128-column scale group a tile
        cfg = dataclasses.replace(cfg, block_n=128, bn_tail=0, wide_n=False)
    return cfg


def split_n_columns(m: int, n: int, k: int, cfg: GluonConfig, num_sms: int) -> int:
    """Columns of the first of two launches for a dense call whose N leaves a ragged last 128-column block,
    or 0 for one launch.  The full blocks run as one launch and the remainder as a second one on a side stream,
    whose programs take the SMs the first launch's last wave leaves idle; it pays where dropping the remainder's
    tiles removes a wave.  H100 (benchmarks/split_n_ab.py, RESULTS.md session 4): m4096 n2112 k7168 1.08x
    faster, m8192 n2112 1.04x, m4096 n1088 k2048 1.06x; m4096 n7232 k2048 (no wave saved) 4% slower, so not
    taken there."""
    if cfg.bn_tail or cfg.wide_n or (cfg.block_m, cfg.block_n) != (128, 128) or n % 128 == 0 or n < 128:
        return 0
    mb = math.ceil(m / 128)
    plain = math.ceil(mb * math.ceil(n / 128) / num_sms)
    main = math.ceil(mb * (n // 128) / num_sms)
    return n // 128 * 128 if main < plain else 0


_SIDE_STREAMS: dict = {}


def _side_stream(device) -> torch.cuda.Stream:
    key = torch.device(device).index
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[key]


def launch(mode: str, a, sfa, b, sfb, d, *, c=None, m_indices=None, masked_m=None, expected_m=None,
           signal=None, num_sms: int, max_block_n: int = 256, config: GluonConfig | None = None,
           pdl: bool = False, d_sf=None) -> tuple[int, int]:
    """Run ``D = C + A @ B.T`` (1D2D scaling) with the Gluon kernel; returns ``(block_m, block_n)``.

    Arguments arrive validated (see :func:`supports`).  No host synchronisation, no allocation:
    safe under CUDA-graph capture.  ``signal`` (masked mode): counters ``[G * ceil(max_m / block_m)]``,
    zeroed by the caller, each ends at ``ceil(N / block_n)`` for m-blocks below ``masked_m[g]``.

    ``pdl``: programmatic dependent launch (``launch_pdl=True``, kernel built with ``PDL_WAIT``) for a call
    that follows the kernel writing ``a``/``sfa`` on the same stream (the FP4 convert, which triggers early):
    the programs start, and prefetch their first B stages, while that kernel runs; every partition executes
    ``griddepcontrol.wait`` before it reads A or its scales.  Correct after any kernel (one that does not
    trigger early triggers when it ends: the programs start then and the wait returns at once) and under
    CUDA-graph capture (CUDA 12.3+ records the launch attribute as a programmatic graph edge).  ``b``,
    ``masked_m`` and ``m_indices`` must not be written by the kernel right before (they are read before the
    wait; what earlier kernels wrote is complete, since that kernel itself started only after them).

    ``d_sf`` (masked mode, ``d`` FP8 E4M3, N a multiple of 128): D gets the FP8 combine payload of the BF16
    result, E4M3 codes in ``d`` and uint8 UE8M0 bytes ``[G, max_m, N / 128]`` in ``d_sf``, on 128-wide tiles.

    A dense call without ``config`` whose ragged last column block would cost a wave (:func:`split_n_columns`)
    runs as two launches, the remainder's on a side stream that forks from and joins back into the current
    one (capturable in a CUDA graph); the returned tile is the first launch's.
    """
    mode_id = _MODES[mode]
    if (d_sf is not None) != (d.dtype == torch.float8_e4m3fn):
        raise ValueError("an FP8 D needs d_sf (its scale bytes) and d_sf an FP8 D")
    m, n, k, groups, tma_store = _problem(mode, a, b, d, c, signal, pdl)
    sig_warp = signal is not None and SIGNAL_WARP        # the counters bumped by the signal warp (SIG_WARP)
    cfg = config if config is not None else _config_for(mode, a, b, d, c, expected_m, max_block_n, num_sms)
    if m > 0 and transpose_for_sa(mode, m, n, k, sfa, cfg, signal=signal is not None, pdl=pdl):
        from ..quant import mn_major_copy
        sfa = mn_major_copy(sfa)            # one copy kernel, no fill; sa_smem_pays then says yes
    if mode == "dense" and config is None and not pdl and m > 0:
        nm = split_n_columns(m, n, k, cfg, num_sms)
        if nm:
            # Column views of B, its scale blocks, D and C at a multiple of 128: same dtypes and strides, starts
            # 16-byte aligned (K and nm are multiples of 128), so each part passes what ``supports`` checked on
            # the whole call.  Fork: the remainder on the side stream, joined back before anything later on
            # this stream.
            cur = torch.cuda.current_stream(d.device)
            side = _side_stream(d.device)
            side.wait_stream(cur)
            out = launch("dense", a, sfa, b[:nm], sfb[:nm // 128], d[:, :nm], c=None if c is None else c[:, :nm],
                         num_sms=num_sms, max_block_n=max_block_n)
            with torch.cuda.stream(side):
                launch("dense", a, sfa, b[nm:], sfb[nm // 128:], d[:, nm:], c=None if c is None else c[:, nm:],
                       num_sms=num_sms, max_block_n=max_block_n)
            cur.wait_stream(side)
            return out
    if cfg.wide_n and not (mode == "dense" and tma_store and cfg.block_m == 128 and cfg.block_n in (128, 256)):
        cfg = _config_for(mode, a, b, d, c, expected_m, max_block_n, num_sms, wide_n=False)
    if cfg.bn_tail and not (cfg.block_m == 128 and cfg.block_n == 128 and not cfg.wide_n
                            and tail_ok(n, cfg.bn_tail, signal=signal is not None, pdl=pdl)):
        cfg = dataclasses.replace(cfg, bn_tail=0)
    if cfg.bn_tail:
        tma_store = False       # the tail kernel stores through registers
        fit = tail_config(cfg.bn_tail, out_bytes=d.element_size()).stages
        cfg = dataclasses.replace(cfg, stages=min(cfg.stages, fit))
    sa_smem = cfg.sa_smem
    if sa_smem is None:
        sa_smem = runtime.gluon_sa_smem()
        if sa_smem is None:
            sa_smem = sa_smem_pays(mode, m, sfa)
    sa_smem = sa_smem and not cfg.bn_tail
    if sa_smem and cfg.wide_n:
        cfg = dataclasses.replace(cfg, stages=min(cfg.stages, wide_sa_stages(cfg.block_n)))
    elif sa_smem:
        # A's scales take BLOCK_M floats of every stage: as many stages as still fit the picks' budget (the
        # counts session 9 measured); _fit_stages below is the hard limit every kernel is held to
        fit = _stages(cfg.block_m, cfg.block_n,
                      _epi_bytes(cfg.block_m, cfg.block_n, tma_store, d.element_size(), c is not None), sa_smem=True)
        cfg = dataclasses.replace(cfg, stages=min(cfg.stages, fit))
    if not cfg.wide_n and not cfg.bn_tail:
        epi = _epi_bytes(cfg.block_m, cfg.block_n, tma_store, d.element_size(), c is not None, mode != "dense")
        if sig_warp:
            epi += 2 * SIG_SLOTS * 8            # the signal warp's barrier ring
        cfg = dataclasses.replace(cfg, stages=_fit_stages(cfg.block_m, cfg.block_n, cfg.stages, epi, sa_smem))
    bm, bn = cfg.block_m, cfg.block_n
    if d_sf is not None and (bn != 128 or cfg.bn_tail or cfg.wide_n):
        raise ValueError(f"an FP8 D takes 128-wide tiles, the config has block_n={bn}")
    if m == 0 or n == 0 or groups == 0:
        return bm, bn
    a_rows, b_rows = _rows2d(a), _rows2d(b)
    # wide/split: A in 64-row boxes (one per consumer warpgroup), B and D in 128-wide halves
    box_m, box_n = (bm // 2, 128) if cfg.wide_n else (bm, bn)
    a_desc = _desc2d(a, a_rows, (box_m, BLOCK_K), "fp8")
    b_desc = _desc2d(b, b_rows, (box_n, BLOCK_K), "fp8")
    d_desc = _desc2d(d, _rows2d(d), (box_m, box_n), "bf16") if tma_store else None
    tail = {"BN_TAIL": cfg.bn_tail, "b2_desc": _desc2d(b, b_rows, (cfg.bn_tail, BLOCK_K), "fp8")} if cfg.bn_tail else {}

    num_n = n // bn if cfg.bn_tail else triton.cdiv(n, bn)
    max_tiles = groups * triton.cdiv(m, bm) * num_n if mode != "contiguous" else triton.cdiv(m, bm) * num_n
    grid = (max(1, min(num_sms, max_tiles)),)
    sd, sc, sa, sb = _s3(d), _s3(c), _s3(sfa), _s3(sfb)
    dummy_i32 = masked_m if masked_m is not None else (m_indices if m_indices is not None else signal)
    fp8_gemm_ws_kernel[grid](
        a_desc, b_desc, d_desc,
        d, c if c is not None else d, sfa, sfb,
        masked_m if masked_m is not None else dummy_i32 if dummy_i32 is not None else sfa,
        m_indices if m_indices is not None else dummy_i32 if dummy_i32 is not None else sfa,
        signal if signal is not None else dummy_i32 if dummy_i32 is not None else sfa,
        m, n, k, groups,
        sd[0], sd[1], sc[0], sc[1], sa[0], sa[1], sa[2], sb[0], sb[1], sb[2],
        MODE=mode_id, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=cfg.group_m, STAGES=cfg.stages,
        TMA_STORE=tma_store, HAS_C=c is not None, HAS_SIGNAL=signal is not None,
        SB_SCALAR=(128 % bn == 0), K_ROTATE=cfg.k_rotate and not cfg.wide_n, PRODUCER_REGS=cfg.producer_regs,
        WIDE_N=cfg.wide_n, SA_SMEM=sa_smem,
        **({"SIG_WARP": True} if sig_warp else {}),
        num_warps=cfg.num_warps, maxnreg=cfg.maxnreg, **tail,
        **({"dsf_ptr": d_sf, "s_fg": d_sf.stride(0), "s_fm": d_sf.stride(1), "D_FP8": True} if d_sf is not None
           else {}),
        **({"PDL_WAIT": True, "launch_pdl": True} if pdl else {}),
    )
    return bm, bn
