"""Triton kernels of the expert-parallel dispatch and combine over peer-mapped (symmetric) memory.

Every rank owns one symmetric byte region (``fp8gemm.moe.ep.SymmLayout`` gives the byte offsets of its
sections); a kernel reaches rank ``r``'s region through ``tab[r]``, an int64 table of the regions' base
addresses (peer addresses come from ``torch.distributed._symmetric_memory``; in the CPU tests the
"peers" are plain tensors of one process).  Protocol (DESIGN.md §4):

- **dispatch send** (persistent grid): the (token, k) pairs, flattened to rows ``j = t * TOPK + k``,
  go in blocks of ``BLOCK_R`` rows, blocks interleaved over the programs.  Per block: the first
  ``[BLOCK_R, BLOCK_H]`` tile of the rows' tokens and their scales are loaded, then one *vector* of
  relaxed ``sys``-scope atomics claims a slot of each row's expert counter on its owner (all the
  block's peer round trips in flight at once), then the block's FP8 rows, scales and routing words
  (``src_rank * TMAX * TOPK + j``) are stored as 16-byte-wide tiles with the loads of tile i+1 issued
  before the stores of tile i.  Rows of one token share the loaded lines (one HBM read per token; each
  (expert, slot) still gets its own row on the owner, as the masked layout needs).  Every program then
  bumps a local done-counter (``acq_rel``, ``sys``); the last one resets it and adds 1 to
  ``DFLAG[rank]`` on every rank with a ``release``/``sys`` atomic.
- **dispatch recv** (one program): spin (``acquire``/``sys``) until every ``DFLAG[p] >= 1``, consume
  it by subtracting 1 (never a plain reset, which could erase an early arrival), then swap the slot
  counters to 0 (they become ``masked_m``) and add them to the cumulative receive statistics.
- **combine send** (persistent grid = the SMs left to communication): units (m-block i, local expert
  g) in block-major order ``u = i * L + g`` (the rows sit in the first blocks of every expert: this
  spreads them over all programs), up to the last m-block any expert reaches.  Per non-empty unit:
  one bounded scalar spin until the masked GEMM's SBO counter reaches the threshold (then zero it for
  the next call), then the whole program stores the block's BF16 rows (or their FP8 payload, see *combine
  reduce*), ``ROWS x BLOCK_H`` tiles in the same two-stage pipeline, into their source rank's receive buffer
  at slot (token, k); then the same
  done-counter / ``CFLAG`` arrival as the dispatch.
- **combine recv** (one program): spin on ``CFLAG``, consume it.
- **barrier** (:meth:`fp8gemm.moe.ep.EPCommunicator.barrier`): one program adds 1 to ``BFLAG[rank]`` on every
  rank (release), then one program spins on this rank's ``BFLAG`` and consumes one arrival of each peer.
- **contiguous form** (prefill, :meth:`fp8gemm.moe.ep.EPCommunicator.dispatch_contiguous`), three
  steps because a sender must know where each expert's segment starts on its owner before it stores:
  *counts* (grid of any size): each (token, k) takes a slot among this rank's rows for its expert
  from a local counter (kept in ``slot_of``; one vector of atomics per block of rows); the last program stores the count row ``CCNT[rank, :]``
  (int32 ``[W, E]``) on every rank and adds 1 to ``AFLAG[rank]`` there (release).
  *layout* (one program): spin on every ``AFLAG[p]``, consume it; from the full count matrix compute
  every expert's segment start on its owner (exclusive prefix sum of the counts padded to ``ALIGN``,
  per owner) plus the rows of lower source ranks: ``send_base[e]``; for this rank's own experts
  publish the counts (``masked_m``), the statistics and the segment starts.
  *index* (grid over the ALIGN-row blocks): ``m_indices`` (local expert or -1) and ``block_valid``
  (the valid-row prefix of each block, the "masked_m" of the block view ``[R / ALIGN, ALIGN]`` that
  the SwiGLU kernel and :func:`combine_send_kernel` use).
  *send* (the row blocks of the masked sender, no atomics): each (token, k) stores its row at
  ``send_base[e] + slot_of[t, k]`` of the owner's contiguous buffer (rows past the capacity are dropped; the owner's layout step records the overflow), then the
  same ``DFLAG`` arrival as the masked dispatch; :func:`wait_arrivals_kernel` waits for it.
- **combine reduce** (local): ``y[t] = sum_k w[t, k] * recv[t, k]`` in FP32, over the k whose expert
  id is valid, cast to BF16.  With the FP8 combine payload (``EPCommunicator(combine_payload="fp8")``) each
  row travels as E4M3 codes + one UE8M0 byte per 128 columns (half the bytes on the link and in the reduce):
  copied as they are where the L2 GEMM wrote them (``PRECAST``), else cast by the sender as it stores each
  BF16 row; the reduce is then :func:`fp8gemm.kernels.moe_act.combine_reduce_kernel`.

Every spin is bounded: by ``timeout_ns`` of ``%globaltimer`` on the GPU, by ``max_iters`` iterations in
the interpreter.  A spin that runs out records the first error in ``err`` (int32 [4]: code, a, b, c;
codes in :data:`ERROR_CODES`) and the kernel goes on, so no call ever hangs; the host reads ``err``
after the call.  Slot overflow (more rows than ``MAX_M`` for one expert) is recorded the same way.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .quant import e4m3_bytes, group_amax, scale_from_amax, ue8m0_byte

ERROR_CODES = {
    1: "dispatch: timed out waiting for the arrival signal of rank {a}",
    2: "combine: timed out waiting for the GEMM signal of local expert {a} (global expert {g}), m-block {b}",
    3: "combine: timed out waiting for the arrival signal of rank {a}",
    4: "dispatch: local expert {a} (global expert {g}) received {b} rows, more than its capacity max_m={c}",
    5: "dispatch (contiguous): the segment of local expert {a} (global expert {g}) ends at row {b}, beyond "
       "the contiguous capacity of {c} rows",
    6: "dispatch (contiguous): timed out waiting for the token counts of rank {a}",
    7: "barrier: timed out waiting for rank {a}",
}


@triton.jit
def _now(USE_TIMER: tl.constexpr):
    if USE_TIMER:
        return tl.extra.cuda.globaltimer()
    else:
        return tl.zeros((), tl.int64)


@triton.jit
def _set_error(err_ptr, code, a, b, c):
    old = tl.atomic_cas(err_ptr, 0, code)
    if old == 0:
        tl.store(err_ptr + 1, a)
        tl.store(err_ptr + 2, b)
        tl.store(err_ptr + 3, c)


@triton.jit
def _spin(ptr, target, max_iters, timeout_ns, USE_TIMER: tl.constexpr, SCOPE: tl.constexpr):
    """Spin until ``*ptr >= target`` with acquire loads at ``SCOPE`` ("sys": a peer GPU writes it;
    "gpu": a kernel on this GPU does); False if the bound (time or iterations) ran out first."""
    start = _now(USE_TIMER)
    it = 0
    v = tl.atomic_add(ptr, 0, sem="acquire", scope=SCOPE)
    budget = True
    while (v < target) & budget:
        v = tl.atomic_add(ptr, 0, sem="acquire", scope=SCOPE)
        it += 1
        if USE_TIMER:
            budget = (_now(USE_TIMER) - start) < timeout_ns
        else:
            budget = it < max_iters
    return v >= target


@triton.jit
def _await_arrivals(flags, err_ptr, code, max_iters, timeout_ns, W: tl.constexpr, USE_TIMER: tl.constexpr):
    """Spin until every peer's ``flags[p] >= 1`` (sys-scope acquire) and consume one arrival of each;
    error ``code`` (a = p) for a peer whose flag did not come within the bound."""
    for p in range(W):
        ok = _spin(flags + p, 1, max_iters, timeout_ns, USE_TIMER, "sys")
        if ok:
            tl.atomic_add(flags + p, -1, sem="relaxed", scope="sys")
        else:
            _set_error(err_ptr, code, p, 0, 0)


@triton.jit
def _signal_all(tab_ptr, rank, OFF_FLAG, W: tl.constexpr):
    """Add 1 to ``FLAG[rank]`` on every rank (release, ``sys``)."""
    for o in range(W):
        base = tl.load(tab_ptr + o)
        flag = (base + OFF_FLAG).to(tl.pointer_type(tl.int32)) + rank
        tl.atomic_add(flag, 1, sem="release", scope="sys")


@triton.jit
def _arrive_all(tab_ptr, done_ptr, rank, OFF_FLAG, W: tl.constexpr, total=-1):
    """Grid completion: the last program to finish adds 1 to ``FLAG[rank]`` on every rank.  ``total``: the
    programs that count on ``done_ptr`` (default: this grid's; more when two launches send one combine)."""
    tl.debug_barrier()
    prev = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="sys")
    if total < 0:
        total = tl.num_programs(0)
    if prev == total - 1:
        tl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")
        _signal_all(tab_ptr, rank, OFF_FLAG, W)


@triton.jit
def _load_tile(src, rmask, j: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr, CACHE: tl.constexpr):
    """Tile ``j`` (columns ``[j * BLOCK_H, (j + 1) * BLOCK_H)``) of the rows ``src[r]`` where ``rmask[r]``."""
    cols = tl.arange(0, BLOCK_H)
    m = rmask[:, None] & (cols[None, :] < H - j * BLOCK_H)
    return tl.load(src[:, None] + (j * BLOCK_H + cols)[None, :], mask=m, cache_modifier=CACHE)


@triton.jit
def _copy_rows(v, src, dst, lmask, smask, H: tl.constexpr, BLOCK_H: tl.constexpr, CACHE: tl.constexpr):
    """Copy a block of rows of ``H`` elements, ``src[r]`` to ``dst[r]`` (1-D pointer vectors, the caller
    declares them 16-byte aligned); loads where ``lmask``, stores where ``smask``; ``v`` is tile 0,
    already loaded by the caller (so that it can be issued before an atomic).

    The block moves as ``[BLOCK_R, BLOCK_H]`` tiles (unrolled over H) in a two-stage pipeline: the loads
    of tile j+1 are issued before the stores of tile j, so a program keeps about two tiles in flight
    (a few communication SMs reach the link's bandwidth only with many bytes in flight each).  Stores
    are 16-byte wide (contiguous columns, row masks constant along them)."""
    NT: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    cols = tl.arange(0, BLOCK_H)
    for j in tl.static_range(1, NT):
        nv = _load_tile(src, lmask, j, H, BLOCK_H, CACHE)
        tl.store(dst[:, None] + ((j - 1) * BLOCK_H + cols)[None, :], v,
                 mask=smask[:, None] & (cols[None, :] < H - (j - 1) * BLOCK_H))
        v = nv
    tl.store(dst[:, None] + ((NT - 1) * BLOCK_H + cols)[None, :], v,
             mask=smask[:, None] & (cols[None, :] < H - (NT - 1) * BLOCK_H))


@triton.jit
def _load_groups(src, rmask, j: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr):
    """Tile ``j`` of the BF16 rows ``src[r]`` (where ``rmask[r]``) as ``[rows, BLOCK_H / 128, 128]``: the FP8
    combine payload's scale groups on their own axis; zeros past ``H``."""
    cols = j * BLOCK_H + tl.arange(0, BLOCK_H // 128)[:, None] * 128 + tl.arange(0, 128)[None, :]
    m = rmask[:, None, None] & (cols[None, :, :] < H)
    return tl.load(src[:, None, None] + cols[None, :, :], mask=m, other=0.0, cache_modifier=".cg")


@triton.jit
def _put_fp8_groups(v, dst, sdst, smask, j: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr,
                    SOFT: tl.constexpr):
    """The FP8 combine payload of a loaded tile ``v`` (:func:`_load_groups`): E4M3 codes at ``dst[r]`` and one
    UE8M0 byte per 128 columns at ``sdst[r]`` (``fp8gemm.reference.quantize_combine_payload``; the helpers of
    the public casts, so the same bytes)."""
    G: tl.constexpr = BLOCK_H // 128
    g = j * G + tl.arange(0, G)
    cols = g[:, None] * 128 + tl.arange(0, 128)[None, :]
    sf, inv = scale_from_amax(group_amax(v, 2), 448.0, True, not SOFT)
    q = e4m3_bytes(v.to(tl.float32) * inv[:, :, None], SOFT)
    tl.store(dst[:, None, None] + cols[None, :, :], q, mask=smask[:, None, None] & (cols[None, :, :] < H))
    tl.store(sdst[:, None] + g[None, :], ue8m0_byte(sf), mask=smask[:, None] & (g[None, :] < H // 128))


@triton.jit
def _quant_copy_rows(v, src, dst, sdst, mask, H: tl.constexpr, BLOCK_H: tl.constexpr, SOFT: tl.constexpr):
    """:func:`_copy_rows` for the FP8 combine payload: BF16 rows ``src[r]`` -> codes at ``dst[r]`` and scale
    bytes at ``sdst[r]``, the loads of tile j+1 issued before the cast and stores of tile j; ``v`` is tile 0
    (:func:`_load_groups`)."""
    NT: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    for j in tl.static_range(1, NT):
        nv = _load_groups(src, mask, j, H, BLOCK_H)
        _put_fp8_groups(v, dst, sdst, mask, j - 1, H, BLOCK_H, SOFT)
        v = nv
    _put_fp8_groups(v, dst, sdst, mask, NT - 1, H, BLOCK_H, SOFT)


@triton.jit
def _put_rows(v0, sf, base, row, ok, t, j, xq_ptr, stride_xq, rank, TMAX, OFF_X, OFF_SF, OFF_META,
              H: tl.constexpr, SFH: tl.constexpr, TOPK: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_SF: tl.constexpr):
    """Rows ``j = t * TOPK + k`` of a block: token ``t``'s FP8 row (tile 0 in ``v0``), scales ``sf`` and
    routing word into slot ``row`` of the region at ``base`` (vectors over the block's rows, ``ok``
    masks them)."""
    # H % 16 == 0 and the regions are 256-byte aligned: the peer stores vectorise to 128 bits
    dst = tl.multiple_of((base + OFF_X + row * H).to(tl.pointer_type(tl.uint8)), 16)
    _copy_rows(v0, xq_ptr + t * stride_xq, dst, ok, ok, H, BLOCK_H, "")
    soffs = tl.arange(0, BLOCK_SF)
    sdst = (base + OFF_SF + row * (SFH * 4)).to(tl.pointer_type(tl.float32))
    tl.store(sdst[:, None] + soffs[None, :], sf, mask=ok[:, None] & (soffs[None, :] < SFH))
    tl.store((base + OFF_META).to(tl.pointer_type(tl.int32)) + row, rank * TMAX * TOPK + j, mask=ok)


@triton.jit
def _token_rows(idx_ptr, xq_ptr, xsf_ptr, j0, n, num_experts, stride_xq, stride_xsf, stride_it, stride_ik,
                TOPK: tl.constexpr, BLOCK_R: tl.constexpr, H: tl.constexpr, SFH: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_SF: tl.constexpr):
    """The rows ``j = j0 .. j0 + BLOCK_R - 1`` of the flattened (token, k) list: token, expert, validity,
    and tile 0 and the scales of each row's token (rows of one token hit the same lines: one HBM read)."""
    j = j0 + tl.arange(0, BLOCK_R)
    inb = j < n
    t = (j // TOPK).to(tl.int64)
    k = j - (j // TOPK) * TOPK
    e = tl.load(idx_ptr + t * stride_it + k * stride_ik, mask=inb, other=-1).to(tl.int32)
    valid = inb & (e >= 0) & (e < num_experts)
    v0 = _load_tile(xq_ptr + t * stride_xq, valid, 0, H, BLOCK_H, "")
    soffs = tl.arange(0, BLOCK_SF)
    sf = tl.load(xsf_ptr + t[:, None] * stride_xsf + soffs[None, :], mask=valid[:, None] & (soffs[None, :] < SFH))
    return j, t, tl.where(valid, e, 0), valid, v0, sf


@triton.jit
def dispatch_send_kernel(xq_ptr, xsf_ptr, idx_ptr, tab_ptr, done_ptr, T, rank, num_experts,
                         stride_xq, stride_xsf, stride_it, stride_ik,
                         OFF_X, OFF_SF, OFF_META, OFF_CNT, OFF_DFLAG, MAX_M, TMAX,
                         H: tl.constexpr, SFH: tl.constexpr, TOPK: tl.constexpr, L: tl.constexpr,
                         W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_SF: tl.constexpr):
    """Persistent: program p moves the row blocks ``j in [b * BLOCK_R, (b + 1) * BLOCK_R)`` of the
    flattened (token, k) list for ``b = p, p + P, ...``: one vector of slot atomics per block (all
    ``BLOCK_R`` peer round trips in flight at once, the block's first tile already loading), then the
    block's rows as wide tiles."""
    pid = tl.program_id(0)
    n = T * TOPK
    for j0 in range(pid * BLOCK_R, n, tl.num_programs(0) * BLOCK_R):
        j, t, e, valid, v0, sf = _token_rows(idx_ptr, xq_ptr, xsf_ptr, j0, n, num_experts, stride_xq, stride_xsf,
                                             stride_it, stride_ik, TOPK, BLOCK_R, H, SFH, BLOCK_H, BLOCK_SF)
        o = e // L
        le = e - o * L
        base = tl.load(tab_ptr + o, mask=valid, other=0)
        cnt_ptr = (base + OFF_CNT).to(tl.pointer_type(tl.int32)) + le
        slot = tl.atomic_add(cnt_ptr, tl.full((BLOCK_R,), 1, tl.int32), mask=valid, sem="relaxed", scope="sys")
        ok = valid & (slot < MAX_M)
        row = le.to(tl.int64) * MAX_M + tl.where(ok, slot, 0)
        _put_rows(v0, sf, base, row, ok, t, j, xq_ptr, stride_xq, rank, TMAX, OFF_X, OFF_SF, OFF_META,
                  H, SFH, TOPK, BLOCK_H, BLOCK_SF)
    _arrive_all(tab_ptr, done_ptr, rank, OFF_DFLAG, W)


@triton.jit
def dispatch_recv_kernel(buf_ptr, err_ptr, masked_m_ptr, stats_ptr, OFF_CNT, OFF_DFLAG, MAX_M,
                         max_iters, timeout_ns, W: tl.constexpr, L: tl.constexpr, BLOCK_L: tl.constexpr,
                         USE_TIMER: tl.constexpr):
    flags = (buf_ptr + OFF_DFLAG).to(tl.pointer_type(tl.int32))
    _await_arrivals(flags, err_ptr, 1, max_iters, timeout_ns, W, USE_TIMER)
    tl.debug_barrier()
    le = tl.arange(0, BLOCK_L)
    lmask = le < L
    cnts = (buf_ptr + OFF_CNT).to(tl.pointer_type(tl.int32))
    cnt = tl.atomic_xchg(cnts + le, tl.zeros((BLOCK_L,), tl.int32), mask=lmask, sem="acq_rel", scope="sys")
    cnt = tl.where(lmask, cnt, 0)
    over = tl.max(tl.where(cnt > MAX_M, le, -1), 0)
    if over >= 0:
        _set_error(err_ptr, 4, over, tl.sum(tl.where(le == over, cnt, 0), 0), MAX_M)
    m = tl.minimum(cnt, MAX_M)
    tl.store(masked_m_ptr + le, m, mask=lmask)
    tl.store(stats_ptr + le, tl.load(stats_ptr + le, mask=lmask) + m, mask=lmask)


@triton.jit
def combine_send_kernel(d_ptr, buf_ptr, tab_ptr, masked_m_ptr, signal_ptr, err_ptr, done_ptr, rank,
                        stride_dg, stride_dm, OFF_META, OFF_RECV, OFF_CFLAG, MAX_M, TMAX,
                        block_m, threshold, nb, parts, g_lo, g_hi, arrive_total, max_iters, timeout_ns,
                        H: tl.constexpr, TOPK: tl.constexpr, L: tl.constexpr, W: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
                        WAIT_SIGNAL: tl.constexpr, USE_TIMER: tl.constexpr,
                        trace_ptr=None, trace_base=0, TRACE: tl.constexpr = False,
                        OFF_RSF=0, FP8: tl.constexpr = False, SOFT: tl.constexpr = False,
                        dsf_ptr=None, stride_sg=0, stride_sm=0, PRECAST: tl.constexpr = False,
                        BLOCK_SG: tl.constexpr = 1):
    """Persistent, over the local experts ``[g_lo, g_hi)``: units ``u = i * LG + (g - g_lo)`` (m-block i of
    local expert g, LG = g_hi - g_lo; block-major, so the first blocks of all experts -- where the rows are --
    spread over every program), each cut into ``parts`` row ranges; work item ``v = u * parts + s`` goes to
    program ``v % P``.  Per item of a non-empty unit: one bounded spin on the unit's SBO counter (a scalar
    acquire poll), then all the program's warps store the part's rows, ``ROWS`` at a time, as wide tiles
    into their source ranks' receive buffers.  Each part adds 1 to the counter after its spin; the part
    that brings it to ``threshold + parts`` zeroes it, so the array is ready for the next GEMM.  The last of
    ``arrive_total`` programs (this launch's and any other launch's sending the same combine; -1: this
    launch's) signals the arrival to every rank.  ``FP8``: each row goes as the FP8 combine payload instead
    (E4M3 codes in the first ``H`` bytes of its receive slot, its UE8M0 scale bytes in the ``OFF_RSF`` section;
    ``SOFT``: the interpreter's rounding); with ``PRECAST`` the payload exists already (the L2 GEMM wrote it:
    codes at ``d_ptr`` as bytes, scale bytes at ``dsf_ptr``) and is copied as it is.  ``TRACE`` (GPU only,
    benchmarks): for work item ``v`` of a non-empty unit, ``trace_ptr[trace_base + v]`` gets the global timer (ns) after its spin and after its
    stores, as two int64."""
    pid = tl.program_id(0)
    meta_base = (buf_ptr + OFF_META).to(tl.pointer_type(tl.int32))
    rr = tl.arange(0, ROWS)
    ll = tl.arange(0, BLOCK_L)
    m_all = tl.minimum(tl.load(masked_m_ptr + ll, mask=ll < L, other=0), MAX_M)
    nb_used = tl.minimum((tl.max(m_all, 0) + block_m - 1) // block_m, nb)
    LG = g_hi - g_lo
    for v in range(pid, LG * nb_used * parts, tl.num_programs(0)):
        u = v // parts
        s = v - u * parts
        i = u // LG
        g = g_lo + u - i * LG
        m = tl.minimum(tl.load(masked_m_ptr + g), MAX_M)
        r_start = i * block_m
        if r_start < m:
            if WAIT_SIGNAL:
                sig = signal_ptr + g * nb + i
                ok = _spin(sig, threshold, max_iters, timeout_ns, USE_TIMER, "gpu")
                if ok:
                    seen = tl.atomic_add(sig, 1, sem="relaxed", scope="gpu")
                    if seen == threshold + parts - 1:
                        tl.atomic_xchg(sig, 0, sem="relaxed", scope="gpu")
                else:
                    _set_error(err_ptr, 2, g, i, 0)
                tl.debug_barrier()
            if TRACE:
                tl.store(trace_ptr + 2 * (trace_base + v), tl.extra.cuda.globaltimer())
            r_end = tl.minimum(r_start + block_m, m)
            # this part's rows: an even share of the valid rows, rounded up to whole tiles
            share = ((r_end - r_start + parts - 1) // parts + ROWS - 1) // ROWS * ROWS
            p_start = r_start + s * share
            p_end = tl.minimum(p_start + share, r_end)
            g64 = g + tl.zeros((), tl.int64)
            for r0 in range(p_start, p_end, ROWS):
                rows = r0 + rr
                rm = rows < p_end
                srow = d_ptr + g64 * stride_dg + rows.to(tl.int64) * stride_dm
                if FP8 and not PRECAST:
                    v0 = _load_groups(srow, rm, 0, H, BLOCK_H)
                else:                           # BF16 rows, or the payload's codes as bytes
                    v0 = _load_tile(srow, rm, 0, H, BLOCK_H, ".cg")
                meta = tl.load(meta_base + g64 * MAX_M + rows, mask=rm, other=0)
                src = meta // (TMAX * TOPK)
                tk = (meta - src * (TMAX * TOPK)).to(tl.int64)
                bases = tl.load(tab_ptr + src, mask=rm, other=0)
                if PRECAST:
                    dst8 = tl.multiple_of((bases + OFF_RECV + tk * H).to(tl.pointer_type(tl.uint8)), 16)
                    _copy_rows(v0, srow, dst8, rm, rm, H, BLOCK_H, ".cg")
                    gg = tl.arange(0, BLOCK_SG)
                    gm = rm[:, None] & (gg[None, :] < H // 128)
                    sb = tl.load(dsf_ptr + g64 * stride_sg + rows.to(tl.int64)[:, None] * stride_sm + gg[None, :],
                                 mask=gm)
                    tl.store((bases + OFF_RSF + tk * (H // 128)).to(tl.pointer_type(tl.uint8))[:, None] + gg[None, :],
                             sb, mask=gm)
                elif FP8:
                    dst8 = tl.multiple_of((bases + OFF_RECV + tk * H).to(tl.pointer_type(tl.uint8)), 16)
                    sdst = (bases + OFF_RSF + tk * (H // 128)).to(tl.pointer_type(tl.uint8))
                    _quant_copy_rows(v0, srow, dst8, sdst, rm, H, BLOCK_H, SOFT)
                else:
                    dst = tl.multiple_of((bases + OFF_RECV + tk * (H * 2)).to(tl.pointer_type(tl.bfloat16)), 16)
                    _copy_rows(v0, srow, dst, rm, rm, H, BLOCK_H, ".cg")
            if TRACE:
                tl.debug_barrier()
                tl.store(trace_ptr + 2 * (trace_base + v) + 1, tl.extra.cuda.globaltimer())
    _arrive_all(tab_ptr, done_ptr, rank, OFF_CFLAG, W, arrive_total)


@triton.jit
def combine_recv_kernel(buf_ptr, err_ptr, OFF_CFLAG, max_iters, timeout_ns, W: tl.constexpr,
                        USE_TIMER: tl.constexpr, trace_ptr=None, TRACE: tl.constexpr = False):
    """Wait for every rank's combine arrival.  ``TRACE`` (GPU only, benchmarks): ``trace_ptr[0]`` gets the global
    timer (ns) when the kernel starts, ``trace_ptr[1]`` when the arrivals are all in."""
    if TRACE:
        tl.store(trace_ptr, tl.extra.cuda.globaltimer())
    flags = (buf_ptr + OFF_CFLAG).to(tl.pointer_type(tl.int32))
    _await_arrivals(flags, err_ptr, 3, max_iters, timeout_ns, W, USE_TIMER)
    if TRACE:
        tl.store(trace_ptr + 1, tl.extra.cuda.globaltimer())


@triton.jit
def combine_reduce_kernel(recv_ptr, idx_ptr, w_ptr, out_ptr, num_experts,
                          stride_rt, stride_rk, stride_it, stride_ik, stride_wt, stride_wk, stride_ot,
                          H: tl.constexpr, TOPK: tl.constexpr, BLOCK_H: tl.constexpr,
                          trace_ptr=None, TRACE: tl.constexpr = False):
    """``TRACE`` (GPU only, benchmarks): program (0, 0) stores the global timer (ns) at its start in
    ``trace_ptr[2]``; every program raises ``trace_ptr[3]`` to its end time (an atomic max)."""
    if TRACE:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(trace_ptr + 2, tl.extra.cuda.globaltimer())
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cm = c < H
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for k in range(TOPK):
        e = tl.load(idx_ptr + t * stride_it + k * stride_ik)
        w = tl.load(w_ptr + t * stride_wt + k * stride_wk).to(tl.float32)
        valid = (e >= 0) & (e < num_experts)
        v = tl.load(recv_ptr + t * stride_rt + k * stride_rk + c, mask=cm & valid, other=0.0).to(tl.float32)
        acc += tl.where(valid, w * v, 0.0)
    tl.store(out_ptr + t * stride_ot + c, acc.to(tl.bfloat16), mask=cm)
    if TRACE:
        tl.debug_barrier()
        tl.atomic_max(trace_ptr + 3, tl.extra.cuda.globaltimer(), sem="relaxed")


# ------------------------------------------------------------------------------------------------
# Contiguous layout (prefill): counts, layout, index, send
# ------------------------------------------------------------------------------------------------

@triton.jit
def dispatch_count_kernel(idx_ptr, cnt_ptr, slot_ptr, tab_ptr, done_ptr, T, rank, num_experts,
                          stride_it, stride_ik, OFF_CCNT, OFF_AFLAG,
                          TOPK: tl.constexpr, E: tl.constexpr, W: tl.constexpr, BLOCK_E: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    """Slot of every (token, k) among this rank's rows for its expert (one vector of local atomics per
    block of ``BLOCK_R`` flattened (token, k) rows); the last program publishes the count row."""
    pid = tl.program_id(0)
    rr = tl.arange(0, BLOCK_R)
    n = T * TOPK
    for j0 in range(pid * BLOCK_R, n, tl.num_programs(0) * BLOCK_R):
        j = j0 + rr
        inb = j < n
        t = (j // TOPK).to(tl.int64)
        k = j - (j // TOPK) * TOPK
        e = tl.load(idx_ptr + t * stride_it + k * stride_ik, mask=inb, other=-1).to(tl.int32)
        valid = inb & (e >= 0) & (e < num_experts)
        slot = tl.atomic_add(cnt_ptr + tl.where(valid, e, 0), tl.full((BLOCK_R,), 1, tl.int32), mask=valid,
                             sem="relaxed", scope="gpu")
        tl.store(slot_ptr + j, slot, mask=valid)
    tl.debug_barrier()
    prev = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="sys")
    if prev == tl.num_programs(0) - 1:
        tl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")
        ee = tl.arange(0, BLOCK_E)
        em = ee < E
        cnt = tl.atomic_xchg(cnt_ptr + ee, tl.zeros((BLOCK_E,), tl.int32), mask=em, sem="acq_rel", scope="gpu")
        for o in range(W):
            base = tl.load(tab_ptr + o)
            row = (base + OFF_CCNT).to(tl.pointer_type(tl.int32)) + rank * E
            tl.store(row + ee, cnt, mask=em)
        tl.debug_barrier()
        for o in range(W):
            base = tl.load(tab_ptr + o)
            flag = (base + OFF_AFLAG).to(tl.pointer_type(tl.int32)) + rank
            tl.atomic_add(flag, 1, sem="release", scope="sys")


@triton.jit
def contig_layout_kernel(buf_ptr, err_ptr, send_base_ptr, masked_m_ptr, stats_ptr, seg_ptr, rank, R, ALIGN,
                         max_iters, timeout_ns, OFF_CCNT, OFF_AFLAG,
                         E: tl.constexpr, L: tl.constexpr, W: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_W: tl.constexpr, USE_TIMER: tl.constexpr):
    flags = (buf_ptr + OFF_AFLAG).to(tl.pointer_type(tl.int32))
    _await_arrivals(flags, err_ptr, 6, max_iters, timeout_ns, W, USE_TIMER)
    tl.debug_barrier()
    ww = tl.arange(0, BLOCK_W)
    ee = tl.arange(0, BLOCK_E)
    em = ee < E
    cmask = (ww[:, None] < W) & em[None, :]
    ccnt = (buf_ptr + OFF_CCNT).to(tl.pointer_type(tl.int32))
    c = tl.load(ccnt + ww[:, None] * E + ee[None, :], mask=cmask, other=0, volatile=True)
    tot = tl.sum(c, 0)                                               # rows per expert, all sources
    before = tl.sum(tl.where(ww[:, None] < rank, c, 0), 0)           # rows of lower source ranks
    padded = (tot + ALIGN - 1) // ALIGN * ALIGN
    owner = ee // L
    seg = tl.zeros((BLOCK_E,), tl.int32)
    for o in range(W):
        mo = em & (owner == o)
        cs = tl.cumsum(tl.where(mo, padded, 0), 0)
        seg = tl.where(mo, cs - padded, seg)
    tl.store(send_base_ptr + ee, seg + before, mask=em)
    mine = em & (owner == rank)
    end = seg + tot
    over = tl.max(tl.where(mine & (end > R), ee, -1), 0)
    if over >= 0:
        _set_error(err_ptr, 5, over - rank * L, tl.sum(tl.where(ee == over, end, 0), 0), R)
    le = ee - rank * L
    got = tl.minimum(tot, tl.maximum(R - seg, 0))                    # rows that fit in the capacity
    tl.store(masked_m_ptr + le, got, mask=mine)
    tl.store(stats_ptr + le, tl.load(stats_ptr + le, mask=mine, other=0) + got, mask=mine)
    tl.store(seg_ptr + le, seg, mask=mine)


@triton.jit
def contig_index_kernel(seg_ptr, masked_m_ptr, m_idx_ptr, block_valid_ptr, ALIGN,
                        L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_A: tl.constexpr):
    """Program b: the expert of rows ``[b * ALIGN, (b + 1) * ALIGN)`` and how many of them are valid."""
    b = tl.program_id(0)
    r0 = b * ALIGN
    ll = tl.arange(0, BLOCK_L)
    lm = ll < L
    seg = tl.load(seg_ptr + ll, mask=lm, other=0)
    cnt = tl.load(masked_m_ptr + ll, mask=lm, other=0)
    hit = lm & (cnt > 0) & (seg <= r0) & (r0 < seg + cnt)
    expert = tl.max(tl.where(hit, ll, -1), 0)
    valid = tl.sum(tl.where(hit, tl.minimum(seg + cnt - r0, ALIGN), 0), 0)
    tl.store(block_valid_ptr + b, valid)
    aa = tl.arange(0, BLOCK_A)
    rows = r0.to(tl.int64) + aa
    tl.store(m_idx_ptr + rows, tl.where(aa < valid, expert, -1), mask=aa < ALIGN)


@triton.jit
def dispatch_send_contig_kernel(xq_ptr, xsf_ptr, idx_ptr, slot_ptr, send_base_ptr, tab_ptr, done_ptr, T, rank,
                                num_experts, stride_xq, stride_xsf, stride_it, stride_ik,
                                OFF_X, OFF_SF, OFF_META, OFF_DFLAG, R, TMAX,
                                H: tl.constexpr, SFH: tl.constexpr, TOPK: tl.constexpr, L: tl.constexpr,
                                W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                                BLOCK_SF: tl.constexpr):
    """The masked sender's persistent row-block loop; each row's place is known (``send_base[e] +
    slot_of[t, k]``), so no atomics."""
    pid = tl.program_id(0)
    n = T * TOPK
    for j0 in range(pid * BLOCK_R, n, tl.num_programs(0) * BLOCK_R):
        j, t, e, valid, v0, sf = _token_rows(idx_ptr, xq_ptr, xsf_ptr, j0, n, num_experts, stride_xq, stride_xsf,
                                             stride_it, stride_ik, TOPK, BLOCK_R, H, SFH, BLOCK_H, BLOCK_SF)
        base = tl.load(tab_ptr + e // L, mask=valid, other=0)
        row = tl.load(send_base_ptr + e, mask=valid, other=0).to(tl.int64) + \
            tl.load(slot_ptr + j, mask=valid, other=0)
        ok = valid & (row < R)
        row = tl.where(ok, row, 0)
        _put_rows(v0, sf, base, row, ok, t, j, xq_ptr, stride_xq, rank, TMAX, OFF_X, OFF_SF, OFF_META,
                  H, SFH, TOPK, BLOCK_H, BLOCK_SF)
    _arrive_all(tab_ptr, done_ptr, rank, OFF_DFLAG, W)


@triton.jit
def signal_all_kernel(tab_ptr, rank, OFF_FLAG, W: tl.constexpr):
    """The arrive half of a barrier (one program): :func:`_signal_all`; this rank's earlier kernels (stream
    order) are complete, so whatever they did is ordered before it."""
    _signal_all(tab_ptr, rank, OFF_FLAG, W)


@triton.jit
def wait_arrivals_kernel(buf_ptr, err_ptr, OFF_FLAG, code, max_iters, timeout_ns, W: tl.constexpr,
                         USE_TIMER: tl.constexpr):
    """Spin until every ``FLAG[p] >= 1`` and consume it; error ``code`` (with a = p) on a timeout."""
    flags = (buf_ptr + OFF_FLAG).to(tl.pointer_type(tl.int32))
    _await_arrivals(flags, err_ptr, code, max_iters, timeout_ns, W, USE_TIMER)
