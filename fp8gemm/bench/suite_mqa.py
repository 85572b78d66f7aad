"""MQA-logits benchmark cases (DeepSeek-V3.2 indexer): the ANCHORS.md shapes, fp8gemm vs DeepGEMM.

Prefill ``fp8_mqa_logits``: causal ranges (``ks = 0``, ``ke = i + SK - SQ``, DeepGEMM's non-CP test pattern,
about half the [SQ, SK] matrix), default ``clean_logits=True``; flops count the visible (query, key) pairs,
bytes the inputs plus the full FP32 output.  Paged ``fp8_paged_mqa_logits``: block_kv 64, context lengths
uniform in [0.7, 1.3] x the average, the causal rule written as 2-D ``context_lens`` (the form DeepGEMM's
current SM90 kernel accepts) and ``clean_logits=False``, the schedule computed once outside the timing
(as an engine does per step); bytes are q, weights, the KV bytes of every context token, the block-table
entries and the visible logits.  DeepGEMM appears when ``import deep_gemm`` works; outside ``--quick``
a few alternative tile configurations of ours appear as extra columns ("fp8gemm[...]") for tuning.

Prediction (H100/H200, before the first GPU run): prefill H64 D128 is MMA-bound and Triton serialises
each warpgroup's MMA and its ReLU/reduce epilogue (only the three programs per SM overlap), so ~0.55-0.7x
DeepGEMM (~750-900 us vs 502 us); H32 D64 is epilogue-bound, ~0.5x (~450 us vs 231 us).  Paged decode is
bandwidth-bound with a 3-deep cp.async pipeline and two programs per SM: 80-90 % of copy bandwidth
(H200 ~3.4-3.8 TB/s, ~0.85-0.95x DeepGEMM; H100 ~2.4-2.7 TB/s).
"""
from __future__ import annotations

import torch

import fp8gemm
from fp8gemm import attention
from fp8gemm import reference as R
from fp8gemm.bench.core import Case, deep_gemm_or_none
from fp8gemm.kernels import mqa as K
from fp8gemm.testing import calc_diff

FP8 = torch.float8_e4m3fn
NEG_INF = float("-inf")
TOL = 1e-5

PREFILL = [(8192, 8192, 64, 128), (8192, 8192, 32, 64)]          # (SQ, SK, H, D), ANCHORS.md
PREFILL_QUICK = [(2048, 8192, 64, 128), (2048, 8192, 32, 64)]
PAGED = [(256, 1, 64, 128, 65536), (4096, 2, 64, 128, 8192)]      # (batch, next_n, H, D, avg context)
PAGED_QUICK = [(256, 1, 64, 128, 16384), (1024, 2, 64, 128, 8192)]
BLOCK_KV = 64


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _diff_on_valid(out: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor, exact_neg_inf: bool) -> float:
    """calc_diff over the valid positions; 1.0 (a failure) if the -inf pattern is required and differs."""
    if exact_neg_inf and not torch.equal(out == NEG_INF, ~valid):
        return 1.0
    return calc_diff(out[valid], ref[valid])


def prefill_cases(quick: bool) -> list[Case]:
    dg = deep_gemm_or_none()
    cases = []
    for sq, sk, h, d in (PREFILL_QUICK if quick else PREFILL):
        gen = torch.Generator(device="cuda").manual_seed(sq * 7 + h)
        q = torch.randn(sq, h, d, device="cuda", generator=gen).to(FP8)
        kv, sf = R.quantize_kv_per_token(torch.randn(sk, d, device="cuda", generator=gen))
        w = torch.randn(sq, h, device="cuda", generator=gen)
        ks = torch.zeros(sq, dtype=torch.int32, device="cuda")
        ke = torch.arange(sq, dtype=torch.int32, device="cuda") + (sk - sq)
        pairs = int((ke.clamp(0, sk) - ks).clamp(min=0).sum())
        flops = 2.0 * pairs * h * d
        nbytes = _nbytes(q, kv, sf, w, ks, ke) + sq * sk * 4

        def ours(q=q, kv=kv, sf=sf, w=w, ks=ks, ke=ke):
            return fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke)

        def check(q=q, kv=kv, sf=sf, w=w, ks=ks, ke=ke, run=ours):
            ref = R.fp8_mqa_logits(q, kv, sf, w, ks, ke)
            return _diff_on_valid(run(), ref, ref != NEG_INF, exact_neg_inf=True)

        impls = {"fp8gemm": ours}
        if dg is not None:
            impls["DeepGEMM"] = lambda q=q, kv=kv, sf=sf, w=w, ks=ks, ke=ke: dg.fp8_mqa_logits(q, (kv, sf), w, ks, ke)
            # DeepGEMM fills the -inf outside [ks, ke) with a second kernel; without it, each side's logits
            # kernel alone.
            impls["DeepGEMM[noclean]"] = lambda q=q, kv=kv, sf=sf, w=w, ks=ks, ke=ke: \
                dg.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=False)
            impls["fp8gemm[noclean]"] = lambda q=q, kv=kv, sf=sf, w=w, ks=ks, ke=ke: \
                fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=False)
        if not quick:
            for tag, cfg in [("N128w4", K.PrefillConfig(128 // h, 64, 4, 3)), ("N256w4", K.PrefillConfig(256 // h, 64, 4, 3)),
                             ("N256w8", K.PrefillConfig(256 // h, 64, 8, 3))]:
                impls[f"fp8gemm[{tag}]"] = (lambda q=q, kv=kv, sf=sf, w=w, ks=ks, ke=ke, cfg=cfg:
                                            attention._run_prefill(q, kv, sf, w, ks, ke, True, 0, cfg))
        cases.append(Case("mqa", f"prefill SQ{sq} SK{sk} H{h} D{d} causal", flops, nbytes, impls, check, TOL))
    return cases


def _paged_setup(batch, next_n, h, d, avg, seed):
    """Random context lengths, a shuffled block pool and a fused FP8 cache, built without FP32 temporaries
    of the whole cache (it is several GB at the anchor shapes)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.randint(int(0.7 * avg), int(1.3 * avg), (batch,), dtype=torch.int32, device="cuda", generator=gen)
    need = (lens + BLOCK_KV - 1) // BLOCK_KV
    max_blocks = int(need.max())
    num_blocks = int(need.sum())
    pool = torch.randperm(num_blocks, device="cuda", dtype=torch.int32, generator=gen)
    start = torch.cumsum(need, 0) - need
    idx = start[:, None] + torch.arange(max_blocks, device="cuda")[None, :]
    table = torch.where(torch.arange(max_blocks, device="cuda")[None, :] < need[:, None],
                        pool[idx.clamp(max=num_blocks - 1)], 0).to(torch.int32).contiguous()
    cache = torch.empty(num_blocks, BLOCK_KV * (d + 4), dtype=torch.uint8, device="cuda")
    vals = cache[:, :BLOCK_KV * d]
    vals.copy_(torch.randint(0, 256, vals.shape, dtype=torch.uint8, device="cuda", generator=gen))
    vals[(vals & 0x7F) == 0x7F] = 0                      # E4M3 NaN codes -> 0
    cache[:, BLOCK_KV * d:].view(torch.float32).copy_(
        torch.rand(num_blocks, BLOCK_KV, device="cuda", generator=gen) * 0.01 + 0.001)
    cache = cache.view(num_blocks, BLOCK_KV, 1, d + 4)
    q = torch.randn(batch, next_n, h, d, device="cuda", generator=gen).to(FP8)
    w = torch.randn(batch * next_n, h, device="cuda", generator=gen)
    ctx2 = (lens[:, None] - next_n + 1 + torch.arange(next_n, device="cuda", dtype=torch.int32)[None, :]).contiguous()
    return q, cache, w, lens, ctx2, table, max_blocks * BLOCK_KV


def paged_cases(quick: bool) -> list[Case]:
    dg = deep_gemm_or_none()
    cases = []
    for batch, next_n, h, d, avg in (PAGED_QUICK if quick else PAGED):
        q, cache, w, lens, ctx2, table, max_len = _paged_setup(batch, next_n, h, d, avg, seed=batch + next_n)
        sum_lens = int(lens.sum())
        flops = 2.0 * sum_lens * next_n * h * d
        nbytes = _nbytes(q, w, ctx2) + sum_lens * (d + 4) + (sum_lens // BLOCK_KV) * 4 + sum_lens * next_n * 4
        meta = fp8gemm.get_paged_mqa_logits_metadata(ctx2, BLOCK_KV, fp8gemm.get_num_sms())

        def ours(q=q, cache=cache, w=w, ctx2=ctx2, table=table, meta=meta, max_len=max_len):
            return fp8gemm.fp8_paged_mqa_logits(q, cache, w, ctx2, table, meta, max_len, False)

        def check(q=q, cache=cache, w=w, ctx2=ctx2, table=table, max_len=max_len, batch=batch, next_n=next_n,
                  run=ours):
            out = run()
            # The reference loops over sequences in Python: check the first and last 32.
            sel = torch.cat([torch.arange(32), torch.arange(batch - 32, batch)]).cuda()
            rows = (sel[:, None] * next_n + torch.arange(next_n, device="cuda")[None, :]).reshape(-1)
            ref = R.fp8_paged_mqa_logits(q[sel], cache, w.view(batch, next_n, -1)[sel].reshape(-1, w.shape[1]),
                                         ctx2[sel], table[sel], max_len)
            valid = R.paged_mqa_logits_valid_mask(ctx2[sel], next_n, max_len)
            return _diff_on_valid(out[rows], ref, valid, exact_neg_inf=False)

        impls = {"fp8gemm": ours}
        if dg is not None:
            dg_meta = dg.get_paged_mqa_logits_metadata(ctx2, BLOCK_KV, dg.get_num_sms())
            impls["DeepGEMM"] = (lambda q=q, cache=cache, w=w, ctx2=ctx2, table=table, m=dg_meta, max_len=max_len:
                                 dg.fp8_paged_mqa_logits(q, cache, w, ctx2, table, m, max_len, False))
        if not quick:
            for tag, cfg in [("sub2s4", K.PagedConfig(64, 2, 4, 4)), ("sub4s5", K.PagedConfig(64, 4, 4, 5)),
                             ("sub3s4", K.PagedConfig(64, 3, 4, 4))]:
                impls[f"fp8gemm[{tag}]"] = (lambda q=q, cache=cache, w=w, ctx2=ctx2, table=table, meta=meta,
                                            max_len=max_len, cfg=cfg:
                                            attention._run_paged(q, cache, w, ctx2, table, meta, max_len, False, cfg))
        cases.append(Case("mqa", f"paged B{batch} N{next_n} H{h} D{d} L{avg}", flops, nbytes, impls, check, TOL))
    return cases


def cases(quick: bool) -> list[Case]:
    return prefill_cases(quick) + paged_cases(quick)
