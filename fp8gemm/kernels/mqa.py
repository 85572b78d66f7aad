"""Triton kernels and tile heuristics for the MQA logits of DeepSeek-V3.2's lightning indexer.

Semantics: :func:`fp8gemm.reference.fp8_mqa_logits` (prefill) and
:func:`fp8gemm.reference.fp8_paged_mqa_logits` (decode); public entry points in :mod:`fp8gemm.attention`.

Both kernels compute ``logit[i, j] = sum_h relu(q[i, h] . kv[j]) * w[i, h] * kv_scale[j]`` with one FP8
tensor-core product per tile: the keys are the MMA's M side (``[BLOCK_K, D]``, 64 rows per warpgroup, as
wgmma wants) and all heads of a few queries the N side (``[D, queries * H]``).  Keeping the heads on N
makes the head reduction a reduction along the accumulator's columns, which the wgmma layout keeps
inside a thread and its quad (no shared-memory round trip), and lets one KV tile serve every head of
every query in the tile.  The KV scale is applied after the head sum: ``relu(x * s) == relu(x) * s``
for ``s >= 0`` (absmax scales are positive), which saves one multiply per (key, head) element, the
resource that bounds the prefill kernel.
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

NUM_HEADS = (16, 32, 64)
HEAD_DIMS = (32, 64, 128)
NEXT_NS = (1, 2)
BLOCK_KVS = (16, 32, 64, 128)
# A split (the unit of get_paged_mqa_logits_metadata's schedule) is this many pages, as in DeepGEMM.
SPLIT_PAGES = 4
# Rows of output stored by one -inf fill step; 1024-byte runs keep the fill at full write bandwidth.
CLEAN_BLOCK = 256
# The metadata kernel compares BLOCK_S workers with BLOCK_B sequences at a time; 256 x 32 on 8 warps
# stays in registers (256 x 128 on 4 warps spills to the stack).
META_BLOCK_B, META_BLOCK_S, META_WARPS = 256, 32, 8


# -------------------------------------------------------------------------------------
# Heuristics
# -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    block_q: int      # queries per program; block_q * num_heads is the MMA's N
    block_k: int      # keys per loop step (the MMA's M)
    num_warps: int
    num_stages: int
    interior: bool = True   # unmasked stores on key tiles every query of the block sees in full
    maxnreg: int | None = None  # register cap a thread (None: the compiler's choice); sets programs per SM


@dataclasses.dataclass(frozen=True)
class PagedConfig:
    tile: int         # keys per loop step (the MMA's M); divides a split
    sub: int          # programs per schedule worker (they take the worker's tiles round-robin)
    num_warps: int
    num_stages: int


def prefill_config(num_heads: int, head_dim: int) -> PrefillConfig:
    """Tile sizes of the prefill kernel.

    N = block_q * H = 256 (every head of 256 / H queries) against 64-key tiles through a 3-stage cp.async
    pipeline: one KV tile then feeds twice the MMA work of N = 128, which halves the KV traffic and the
    per-tile loop overhead.  One warpgroup holds all of N (128 accumulator registers, ~250 a thread: two
    programs an SM, whose MMA and epilogue interleave).  Measured on an H100 (benchmarks/RESULTS.md, SQ = SK =
    8192): N = 256 is 2-6% faster than N = 128; with the interior-tile stores (``interior``) one warpgroup is
    0-5% faster than two at head_dim 128 (before them two were 6% faster).  H16 keeps N = 128 (16 queries a
    program would put the compressed form's per-query bookkeeping on the stack; not measured faster).
    """
    n = 256 if num_heads >= 32 else 128
    return PrefillConfig(block_q=n // num_heads, block_k=64, num_warps=4, num_stages=3)


def paged_config(num_heads: int, head_dim: int, next_n: int, block_kv: int) -> PagedConfig:
    """Tile sizes of the paged (decode) kernel, which is bound by reading the KV cache once.

    One warpgroup per program on 64-key tiles (8.4 KB of KV at D = 128) with 5 tiles in flight (6 stages),
    and three programs per schedule worker, so each SM holds three CTAs and ~125 KB of loads in flight:
    Little's law at ~25 GB/s per SM and a loaded DRAM latency of 1.5-2 us asks for ~50 KB, and the
    margin covers the bubbles at split and sequence boundaries.  Measured on an H100 (RESULTS.md): two
    programs with 4 stages reached 75-81% of copy bandwidth, three with 6 stages 85-86%; four programs
    are better at next_n 1 but worse at next_n 2 (the q tile of 128 rows doubles each CTA's registers).
    """
    return PagedConfig(tile=64, sub=3, num_warps=4, num_stages=6)


# -------------------------------------------------------------------------------------
# Prefill: fp8_mqa_logits
# -------------------------------------------------------------------------------------

@triton.jit
def mqa_logits_kernel(q_ptr, kv_ptr, kvs_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr,
                      seq_len, seq_len_kv, max_seqlen_k, stride_w, stride_out,
                      H: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                      COMPRESSED: tl.constexpr, CLEAN: tl.constexpr, CLEAN_BLOCK: tl.constexpr,
                      INTERIOR: tl.constexpr = True):
    """One program per ``BLOCK_Q`` queries; loops over the keys any of them sees.

    Plain form: writes ``out[i, j]`` for every j of the key blocks in ``[min ks, max ke)`` of the block
    (the logit, or -inf where row i does not see key j); with ``CLEAN`` also -inf on the rest of the row.
    Compressed form (``COMPRESSED``): writes only the valid ``out[i, j - ks[i]]``; with ``CLEAN`` -inf on
    every other column of ``[0, max_seqlen_k)``.  ``INTERIOR``: a key tile inside every query's range (most
    tiles of a causal or full prefill) is stored without the per-element range test and mask.
    """
    QH: tl.constexpr = BLOCK_Q * H
    # Last query block first: in causal prefill later queries see more keys, and starting the longest
    # programs first shortens the tail of the launch.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    q0 = pid * BLOCK_Q
    rq = q0 + tl.arange(0, BLOCK_Q)
    q_ok = rq < seq_len
    ks = tl.load(ks_ptr + rq, mask=q_ok, other=0)
    ke = tl.load(ke_ptr + rq, mask=q_ok, other=0)
    # The keys row i sees: [start, end), clipped to the KV sequence (and, compressed, to the width).
    start = tl.maximum(ks, 0)
    end = tl.minimum(ke, seq_len_kv)
    if COMPRESSED:
        end = tl.minimum(end, ks + max_seqlen_k)
    busy = q_ok & (end > start)
    lo = tl.min(tl.where(busy, start, seq_len_kv), axis=0)
    hi = tl.max(tl.where(busy, end, 0), axis=0)
    # Start on a BLOCK_K boundary so the KV loads and output stores stay aligned.
    lo = (lo // BLOCK_K) * BLOCK_K
    lo = tl.minimum(lo, hi)

    # The q tile [BLOCK_Q * H, D] is contiguous in memory (q is [seq_len, H, D]); it is the MMA's B operand,
    # transposed so that D (the reduction dim) stays the contiguous one, as FP8 wgmma requires.
    rqh = q0 * H + tl.arange(0, QH)
    rd = tl.arange(0, D)
    q_tile = tl.load(q_ptr + rqh.to(tl.int64)[:, None] * D + rd[None, :], mask=(rqh < seq_len * H)[:, None], other=0.0)
    q_t = tl.trans(q_tile)
    # Column c of the accumulator is head c % H of query q0 + c // H.
    cq = q0 + tl.arange(0, QH) // H
    w = tl.load(w_ptr + cq.to(tl.int64) * stride_w + tl.arange(0, QH) % H, mask=cq < seq_len, other=0.0)

    row_off = rq.to(tl.int64) * stride_out
    # Key tiles in [in_lo, in_hi) lie inside every query's [start, end) (none if a query of the block is past
    # seq_len or sees nothing); in_hi <= seq_len_kv, so such a tile is also inside the KV sequence.
    in_lo = tl.max(tl.where(q_ok, start, seq_len_kv), axis=0)
    in_hi = tl.min(tl.where(busy, end, -1), axis=0)
    if not INTERIOR:
        in_hi = -1
    for k0 in range(lo, hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < seq_len_kv
        kv = tl.load(kv_ptr + rk.to(tl.int64)[:, None] * D + rd[None, :], mask=k_ok[:, None], other=0.0)
        sc = tl.load(kvs_ptr + rk, mask=k_ok, other=0.0)
        acc = tl.dot(kv, q_t)                                       # [BLOCK_K, BLOCK_Q * H]
        acc = tl.maximum(acc, 0.0) * w[None, :]
        logit = tl.sum(tl.reshape(acc, (BLOCK_K, BLOCK_Q, H)), axis=2) * sc[:, None]   # [BLOCK_K, BLOCK_Q]
        if COMPRESSED:
            col = rk[:, None] - ks[None, :]
        else:
            col = rk[:, None]
        if (k0 >= in_lo) & (k0 + BLOCK_K <= in_hi):
            tl.store(out_ptr + row_off[None, :] + col, logit)
        else:
            valid = (rk[:, None] >= start[None, :]) & (rk[:, None] < end[None, :])
            if COMPRESSED:
                tl.store(out_ptr + row_off[None, :] + col, logit, mask=valid & q_ok[None, :])
            else:
                logit = tl.where(valid, logit, float("-inf"))
                tl.store(out_ptr + row_off[None, :] + col, logit, mask=k_ok[:, None] & q_ok[None, :])

    if CLEAN:
        _prefill_fill(out_ptr, row_off, q_ok, busy, start, end, ks, lo, hi, seq_len_kv, max_seqlen_k,
                      BLOCK_Q, BLOCK_K, CLEAN_BLOCK, COMPRESSED)


@triton.jit
def _prefill_fill(out_ptr, row_off, q_ok, busy, start, end, ks, lo, hi, seq_len_kv, max_seqlen_k,
                  BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, CLEAN_BLOCK: tl.constexpr, COMPRESSED: tl.constexpr):
    """-inf on every output position of the block's rows that the main loop does not write (``clean_logits``)."""
    rc = tl.arange(0, CLEAN_BLOCK)
    neg = tl.full((BLOCK_Q, CLEAN_BLOCK), float("-inf"), tl.float32)
    if COMPRESSED:
        # Column c of row i is key ks[i] + c: invalid left of start - ks and from end - ks on.
        first = tl.where(busy, start - ks, max_seqlen_k)
        past = tl.where(busy, end - ks, 0)
        lead = tl.max(first, axis=0)
        tail = tl.maximum(tl.min(tl.where(q_ok, past, max_seqlen_k), axis=0), 0)
        tail = (tail // CLEAN_BLOCK) * CLEAN_BLOCK
        for c0 in range(0, tl.minimum(lead, max_seqlen_k), CLEAN_BLOCK):
            c = c0 + rc
            m = q_ok[:, None] & (c[None, :] < first[:, None]) & (c[None, :] < max_seqlen_k)
            tl.store(out_ptr + row_off[:, None] + c[None, :], neg, mask=m)
        for c0 in range(tail, max_seqlen_k, CLEAN_BLOCK):
            c = c0 + rc
            m = q_ok[:, None] & (c[None, :] >= past[:, None]) & (c[None, :] < max_seqlen_k)
            tl.store(out_ptr + row_off[:, None] + c[None, :], neg, mask=m)
    else:
        # The main loop wrote [lo, written); everything else of the row is -inf.
        written = tl.minimum(lo + tl.cdiv(hi - lo, BLOCK_K) * BLOCK_K, seq_len_kv)
        for c0 in range(0, lo, CLEAN_BLOCK):
            c = c0 + rc
            tl.store(out_ptr + row_off[:, None] + c[None, :], neg, mask=q_ok[:, None] & (c[None, :] < lo))
        for c0 in range(written, seq_len_kv, CLEAN_BLOCK):
            c = c0 + rc
            tl.store(out_ptr + row_off[:, None] + c[None, :], neg,
                     mask=q_ok[:, None] & (c[None, :] < seq_len_kv))


# -------------------------------------------------------------------------------------
# Paged decode: get_paged_mqa_logits_metadata and fp8_paged_mqa_logits
# -------------------------------------------------------------------------------------

@triton.jit
def _sequence_lengths(ctx_ptr, b, batch, NEXT_N: tl.constexpr, CTX_2D: tl.constexpr):
    """Keys each sequence of the vector ``b`` spans: ``context_lens[b]`` (1-D) or ``max_t context_lens[b, t]``
    (2-D); 0 past the batch and for negative lengths."""
    if CTX_2D:
        t = tl.arange(0, NEXT_N)
        n = tl.max(tl.load(ctx_ptr + b[:, None] * NEXT_N + t[None, :], mask=(b < batch)[:, None], other=0), axis=1)
    else:
        n = tl.load(ctx_ptr + b, mask=b < batch, other=0)
    return tl.maximum(n, 0)


@triton.jit
def paged_mqa_metadata_kernel(ctx_ptr, meta_ptr, batch, num_sms, SPLIT: tl.constexpr, NEXT_N: tl.constexpr,
                              CTX_2D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program: deal the sequences' splits out to ``num_sms`` workers (see the reference's docstring).

    Worker s starts at global split ``s * (total // num_sms) + min(s, total % num_sms)``; its sequence is the
    number of sequences whose cumulative split count is <= that start, and its split within the sequence is
    the start minus that cumulative count.  Both come from one pass over the sequences in chunks.
    """
    rb = tl.arange(0, BLOCK_B)
    total = tl.full([], 0, tl.int32)
    for b0 in range(0, batch, BLOCK_B):
        n = _sequence_lengths(ctx_ptr, b0 + rb, batch, NEXT_N, CTX_2D)
        total += tl.sum(tl.cdiv(n, SPLIT), axis=0)
    base = total // num_sms
    extra = total % num_sms
    for s0 in range(0, num_sms + 1, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        first = s * base + tl.minimum(s, extra)
        seq = tl.zeros((BLOCK_S,), tl.int32)
        before = tl.zeros((BLOCK_S,), tl.int32)
        running = tl.full([], 0, tl.int32)
        for b0 in range(0, batch, BLOCK_B):
            segs = tl.cdiv(_sequence_lengths(ctx_ptr, b0 + rb, batch, NEXT_N, CTX_2D), SPLIT)
            prefix = running + tl.cumsum(segs, axis=0)                       # inclusive
            done = (prefix[None, :] <= first[:, None]) & ((b0 + rb) < batch)[None, :]
            seq += tl.sum(done.to(tl.int32), axis=1)
            before = tl.maximum(before, tl.max(tl.where(done, prefix[None, :], 0), axis=1))
            running += tl.sum(segs, axis=0)
        ok = s <= num_sms
        tl.store(meta_ptr + s * 2, seq, mask=ok)
        tl.store(meta_ptr + s * 2 + 1, first - before, mask=ok)


@triton.jit
def _page_ids(bt_row, ti, t_hi, n, rt, TILE: tl.constexpr, BLOCK_KV: tl.constexpr):
    """Block-table entries of tile ``ti``'s keys (0 where the tile is past ``t_hi`` or a key past ``n``).

    A scalar when the tile lies inside one page (``TILE <= BLOCK_KV``; tiles never straddle pages then,
    as both are powers of two), else one entry per key.
    """
    if TILE <= BLOCK_KV:
        return tl.load(bt_row + (ti * TILE) // BLOCK_KV, mask=(ti * TILE < n) & (ti < t_hi), other=0).to(tl.int64)
    else:
        j = ti * TILE + rt
        return tl.load(bt_row + j // BLOCK_KV, mask=(j < n) & (ti < t_hi), other=0).to(tl.int64)


@triton.jit
def _tile_values(kv_ptr, page, ti, t_hi, n, stride_block, rt, rd,
                 TILE: tl.constexpr, BLOCK_KV: tl.constexpr, D: tl.constexpr):
    """FP8 values [TILE, D] of tile ``ti``'s keys (zeros where not needed)."""
    j = ti * TILE + rt
    ok = (j < n) & (ti < t_hi)
    slot = j % BLOCK_KV
    return tl.load(kv_ptr + (page * stride_block + slot * D)[:, None] + rd[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _tile_scales(kvs_ptr, page, ti, t_hi, n, stride_block, rt,
                 TILE: tl.constexpr, BLOCK_KV: tl.constexpr, D: tl.constexpr):
    """FP32 scales [TILE] of tile ``ti``'s keys; they sit after the block's ``BLOCK_KV * D`` value bytes."""
    j = ti * TILE + rt
    ok = (j < n) & (ti < t_hi)
    slot = j % BLOCK_KV
    return tl.load(kvs_ptr + page * (stride_block // 4) + (BLOCK_KV * D // 4) + slot, mask=ok, other=0.0)


@triton.jit
def paged_mqa_logits_kernel(q_ptr, kv_ptr, kvs_ptr, w_ptr, ctx_ptr, bt_ptr, meta_ptr, out_ptr,
                            batch, max_context_len, max_blocks, stride_block, stride_bt, stride_out,
                            NEXT_N: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BLOCK_KV: tl.constexpr,
                            CTX_2D: tl.constexpr, CLEAN: tl.constexpr, TILE: tl.constexpr, SUB: tl.constexpr,
                            CLEAN_BLOCK: tl.constexpr):
    """Persistent: ``SUB`` programs per schedule worker walk the worker's (sequence, split) range.

    ``kv_ptr`` is the fused cache as bytes (FP8 values), ``kvs_ptr`` the same memory as FP32 (scales);
    block p starts at byte ``p * stride_block``: ``BLOCK_KV * D`` value bytes, then ``BLOCK_KV`` scales.
    Each program loads one sequence's q tile (all ``NEXT_N * H`` rows) once and streams the KV tiles of
    its share through a software pipeline; each KV byte is read by exactly one program.  Within the tiles
    it computes, positions a row may not see are written as -inf; with ``CLEAN`` the programs then fill
    every row from its first invalid position to ``max_context_len`` with -inf.
    """
    NQH: tl.constexpr = NEXT_N * H
    SPLIT_TILES: tl.constexpr = 4 * BLOCK_KV // TILE
    pid = tl.program_id(0)
    worker = pid // SUB
    sub = pid % SUB
    b_first = tl.load(meta_ptr + worker * 2)
    s_first = tl.load(meta_ptr + worker * 2 + 1)
    b_last = tl.load(meta_ptr + worker * 2 + 2)
    s_last = tl.load(meta_ptr + worker * 2 + 3)

    rt = tl.arange(0, TILE)
    rd = tl.arange(0, D)
    rn = tl.arange(0, NEXT_N)
    rc = tl.arange(0, NQH)
    for b in range(b_first, tl.minimum(b_last + 1, batch)):
        # How many keys each of the NEXT_N rows sees (the causal rule for 1-D context lengths), and
        # how many the sequence needs: never past the output width or the block table's row.
        if CTX_2D:
            lim = tl.load(ctx_ptr + b * NEXT_N + rn)
        else:
            lim = tl.load(ctx_ptr + b) - NEXT_N + 1 + rn
        n = tl.maximum(tl.max(lim, axis=0), 0)
        n = tl.minimum(tl.minimum(n, max_context_len), max_blocks * BLOCK_KV)
        t_lo = tl.where(b == b_first, s_first * SPLIT_TILES, 0)
        t_hi = tl.where(b == b_last, s_last * SPLIT_TILES, tl.cdiv(n, TILE))
        t_hi = tl.minimum(t_hi, tl.cdiv(n, TILE))
        if t_lo + sub < t_hi:
            lim = tl.minimum(lim, n)
            q_rows = tl.cast(b, tl.int64) * NQH + rc
            q_t = tl.trans(tl.load(q_ptr + q_rows[:, None] * D + rd[None, :]))      # [D, NEXT_N * H]
            w = tl.load(w_ptr + q_rows)                                               # weights row-major [B*NEXT_N, H]
            out_rows = (tl.cast(b, tl.int64) * NEXT_N + rn) * stride_out
            bt_row = bt_ptr + tl.cast(b, tl.int64) * stride_bt
            # Pipelining: Triton's pipeliner streams the KV tiles through shared memory (cp.async,
            # num_stages deep).  It can do so because each tile's page id comes from the previous
            # iteration (a distance-1 indirect load); the scales, which do not feed the MMA and so are
            # not pipelined by Triton, are prefetched one tile ahead in registers.  (Keeping the FP8 tile
            # itself in registers across iterations would cost ~190 byte-shuffle instructions per tile.)
            ti = t_lo + sub
            page = _page_ids(bt_row, ti, t_hi, n, rt, TILE, BLOCK_KV)
            sc = _tile_scales(kvs_ptr, page, ti, t_hi, n, stride_block, rt, TILE, BLOCK_KV, D)
            for ti in range(t_lo + sub, t_hi, SUB):
                kv = _tile_values(kv_ptr, page, ti, t_hi, n, stride_block, rt, rd, TILE, BLOCK_KV, D)
                page = _page_ids(bt_row, ti + SUB, t_hi, n, rt, TILE, BLOCK_KV)
                sc_next = _tile_scales(kvs_ptr, page, ti + SUB, t_hi, n, stride_block, rt, TILE, BLOCK_KV, D)
                acc = tl.dot(kv, q_t)                                                 # [TILE, NEXT_N * H]
                acc = tl.maximum(acc, 0.0) * w[None, :]
                logit = tl.sum(tl.reshape(acc, (TILE, NEXT_N, H)), axis=2) * sc[:, None]
                j = ti * TILE + rt                                                    # key positions
                logit = tl.where(j[:, None] < lim[None, :], logit, float("-inf"))
                tl.store(out_ptr + out_rows[None, :] + j[:, None], logit, mask=(j < max_context_len)[:, None])
                sc = sc_next

    if CLEAN:
        neg = tl.full((CLEAN_BLOCK,), float("-inf"), tl.float32)
        rcl = tl.arange(0, CLEAN_BLOCK)
        for r in range(pid, batch * NEXT_N, tl.num_programs(0)):
            b = r // NEXT_N
            t = r % NEXT_N
            if CTX_2D:
                first = tl.load(ctx_ptr + r)
            else:
                first = tl.load(ctx_ptr + b) - NEXT_N + 1 + t
            first = tl.minimum(tl.maximum(first, 0), max_context_len)
            for c0 in range(first, max_context_len, CLEAN_BLOCK):
                c = c0 + rcl
                tl.store(out_ptr + tl.cast(r, tl.int64) * stride_out + c, neg, mask=c < max_context_len)
