"""MQA logits (prefill and paged decode): reference semantics, the Triton kernels under the interpreter
on tiny shapes, argument validation, and the sm_90a ahead-of-time compile.

Shapes stay tiny: the interpreter runs every program one after another.
"""
from __future__ import annotations

import concurrent.futures
import math

import pytest
import torch

import fp8gemm
from fp8gemm import attention
from fp8gemm import reference as R
from fp8gemm.kernels import mqa as K
from fp8gemm.testing import calc_diff, compile_sm90_in_subprocess, sass_count

FP8 = torch.float8_e4m3fn
NEG_INF = float("-inf")


# -------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------

def _fp8(*shape):
    return torch.randn(*shape).to(FP8)


def _prefill_inputs(seq_len, seq_len_kv, h, d):
    q = _fp8(seq_len, h, d)
    kv, sf = R.quantize_kv_per_token(torch.randn(seq_len_kv, d))
    w = torch.randn(seq_len, h)
    return q, kv, sf, w


def _assert_logits(out, ref, valid=None, tol=1e-6):
    """Valid positions match the reference; where ``valid`` is None, the -inf pattern must match exactly."""
    if valid is None:
        valid = ref != NEG_INF
        assert torch.equal(out == NEG_INF, ~valid), "the -inf positions differ from the reference"
    assert not torch.isnan(out[valid]).any(), "a valid position was not written"
    assert valid.any(), "test case has no valid position"
    diff = calc_diff(out[valid], ref[valid])
    assert diff < tol, f"calc_diff {diff:.3g}"


@pytest.fixture
def nan_output(monkeypatch):
    """Make the entry points allocate NaN-filled outputs, so positions the kernel skips stay NaN."""
    real = attention._padded_output

    def padded(rows, width, device):
        out = real(rows, width, device)
        out.fill_(float("nan"))
        return out
    monkeypatch.setattr(attention, "_padded_output", padded)


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: argument errors must come before any launch."""
    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched")
    for name in ("mqa_logits_kernel", "paged_mqa_logits_kernel", "paged_mqa_metadata_kernel"):
        monkeypatch.setattr(K, name, Forbidden())


# -------------------------------------------------------------------------------------
# The reference itself, against the formula written out term by term
# -------------------------------------------------------------------------------------

def test_reference_prefill_formula():
    q, kv, sf, w = _prefill_inputs(3, 7, 16, 32)
    ks = torch.tensor([0, 2, 5], dtype=torch.int32)
    ke = torch.tensor([7, 4, 5], dtype=torch.int32)
    ref = R.fp8_mqa_logits(q, kv, sf, w, ks, ke)
    for i in range(3):
        for j in range(7):
            if ks[i] <= j < ke[i]:
                kj = kv[j].float() * sf[j]
                want = sum(torch.relu(q[i, h].float() @ kj) * w[i, h] for h in range(16))
                assert math.isclose(float(ref[i, j]), float(want), rel_tol=1e-5, abs_tol=1e-5)
            else:
                assert ref[i, j] == NEG_INF
    comp = R.fp8_mqa_logits(q, kv, sf, w, ks, ke, max_seqlen_k=7)
    assert torch.equal(comp[1, :2], ref[1, 2:4]) and (comp[1, 2:] == NEG_INF).all()
    assert (comp[2] == NEG_INF).all() and torch.equal(comp[0], ref[0])


def test_reference_paged_layout_and_causal_rule():
    vals, scales = R.quantize_kv_per_token(torch.randn(3, 16, 32))
    cache = R.pack_paged_kv_cache(vals, scales)
    assert cache.shape == (3, 16, 1, 36) and cache.dtype == torch.uint8
    # Per block: 16 * 32 value bytes, then 16 FP32 scales (DeepGEMM's packing).
    raw = cache.view(3, -1)
    assert torch.equal(raw[1, :512], vals[1].reshape(-1).view(torch.uint8))
    assert torch.equal(raw[1, 512:].view(torch.float32), scales[1])
    v2, s2 = R.unpack_paged_kv_cache(cache)
    assert torch.equal(v2.view(torch.uint8), vals.view(torch.uint8)) and torch.equal(s2, scales)
    # 1-D lengths with next_n 2: the first token sees one key fewer; 2-D lengths are per row.
    assert R.paged_mqa_logits_limits(torch.tensor([5, 0, 1]), 2).tolist() == [4, 5, 0, 0, 0, 1]
    assert R.paged_mqa_logits_limits(torch.tensor([[3, 5], [0, 2]]), 2).tolist() == [3, 5, 0, 2]


# -------------------------------------------------------------------------------------
# Prefill kernel (interpreter)
# -------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,d", [(16, 32), (32, 64), (64, 128)])
def test_prefill_ragged_ranges(h, d):
    """Ragged [ks, ke) including empty, clipped (ks < 0, ke > seq_len_kv) and multi-tile ranges."""
    seq_len, seq_len_kv = 11, 200
    q, kv, sf, w = _prefill_inputs(seq_len, seq_len_kv, h, d)
    ks = torch.tensor([0, 70, 130, 5, 199, 64, -3, 100, 150, 0, 20], dtype=torch.int32)
    ke = torch.tensor([200, 140, 130, 6, 250, 192, 10, 90, 200, 1, 150], dtype=torch.int32)
    out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke)
    assert out.shape == (seq_len, seq_len_kv) and out.dtype == torch.float32
    assert out.stride(0) % 256 == 0, "rows must start on 1024-byte boundaries, as DeepGEMM allocates them"
    _assert_logits(out, R.fp8_mqa_logits(q, kv, sf, w, ks, ke))


def test_prefill_causal_ranges_many_blocks():
    """DeepGEMM's non-CP test pattern (ks = 0, ke growing), several query blocks and key tiles."""
    seq_len, seq_len_kv, h, d = 24, 160, 32, 32
    q, kv, sf, w = _prefill_inputs(seq_len, seq_len_kv, h, d)
    ks = torch.zeros(seq_len, dtype=torch.int32)
    ke = torch.arange(seq_len, dtype=torch.int32) + (seq_len_kv - seq_len)
    _assert_logits(fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke), R.fp8_mqa_logits(q, kv, sf, w, ks, ke))


def test_prefill_all_empty_is_all_neg_inf():
    q, kv, sf, w = _prefill_inputs(5, 70, 16, 32)
    ks = torch.tensor([3, 0, 70, 9, 40], dtype=torch.int32)
    out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ks.clone())
    assert (out == NEG_INF).all()


def test_prefill_without_clean_skips_the_fill(nan_output):
    """clean_logits=False: every valid logit is written, and rows outside the block's key range are not."""
    seq_len, seq_len_kv, h, d = 8, 300, 16, 32          # one query block (BLOCK_Q = 8 at H = 16)
    q, kv, sf, w = _prefill_inputs(seq_len, seq_len_kv, h, d)
    ks = torch.full((seq_len,), 130, dtype=torch.int32)
    ke = torch.arange(seq_len, dtype=torch.int32) + 140
    ref = R.fp8_mqa_logits(q, kv, sf, w, ks, ke)
    out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=False)
    _assert_logits(out, ref, valid=ref != NEG_INF)
    assert torch.isnan(out[:, :64]).all() and torch.isnan(out[:, 256:]).all(), "clean_logits=False still filled"
    out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=True)
    _assert_logits(out, ref)


@pytest.mark.parametrize("clean", [False, True])
def test_prefill_compressed(clean, nan_output):
    """max_seqlen_k > 0: column c of row i is key ks[i] + c; a width below max(ke - ks) truncates."""
    seq_len, seq_len_kv, h, d = 9, 180, 32, 64
    q, kv, sf, w = _prefill_inputs(seq_len, seq_len_kv, h, d)
    ks = torch.tensor([0, 10, 100, 170, 50, 7, 60, 60, 175], dtype=torch.int32)
    ke = torch.tensor([90, 11, 180, 180, 50, 100, 129, 61, 180], dtype=torch.int32)
    for width in (int((ke - ks).max()), 40):
        ref = R.fp8_mqa_logits(q, kv, sf, w, ks, ke, max_seqlen_k=width)
        out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=clean, max_seqlen_k=width)
        assert out.shape == (seq_len, width)
        _assert_logits(out, ref, valid=None if clean else ref != NEG_INF)


@pytest.mark.parametrize("width", [0, 150])
def test_prefill_interior_tiles_equal_the_masked_path(width, nan_output):
    """Key tiles inside every query's range take the unmasked store (``PrefillConfig.interior``): the result
    equals the always-masked kernel's, bit for bit, for wide shared ranges (most tiles interior), a range
    that ends inside a tile, a query that sees nothing (no tile interior in its block) and the compressed
    form."""
    seq_len, seq_len_kv, h, d = 20, 330, 32, 64
    q, kv, sf, w = _prefill_inputs(seq_len, seq_len_kv, h, d)
    ks = torch.zeros(seq_len, dtype=torch.int32)
    ks[8:16] = 64                                       # a block whose range starts one tile later
    ke = torch.full((seq_len,), seq_len_kv, dtype=torch.int32)
    ke[3] = 300                                         # ends inside a tile
    ke[17] = 0                                          # sees nothing: its block has no interior tile
    ref = R.fp8_mqa_logits(q, kv, sf, w, ks, ke, max_seqlen_k=width)
    cfg = K.prefill_config(h, d)
    outs = [attention._run_prefill(q, kv, sf, w, ks, ke, True, width, K.PrefillConfig(
        cfg.block_q, cfg.block_k, cfg.num_warps, cfg.num_stages, interior)) for interior in (True, False)]
    _assert_logits(outs[0], ref)
    assert torch.equal(outs[0], outs[1])


def test_prefill_empty_shapes():
    q, kv, sf, w = _prefill_inputs(0, 16, 16, 32)
    e = torch.zeros(0, dtype=torch.int32)
    assert fp8gemm.fp8_mqa_logits(q, (kv, sf), w, e, e).shape == (0, 16)
    q, kv, sf, w = _prefill_inputs(3, 0, 16, 32)
    z = torch.zeros(3, dtype=torch.int32)
    assert fp8gemm.fp8_mqa_logits(q, (kv, sf), w, z, z).shape == (3, 0)


# -------------------------------------------------------------------------------------
# Paged kernel (interpreter)
# -------------------------------------------------------------------------------------

def _paged_inputs(context_lens_1d, next_n, h, d, block_kv, extra_blocks=3, block_stride_pad=0):
    """A paged cache whose blocks outside the sequences' needs hold NaN (so any stray read shows)."""
    batch = len(context_lens_1d)
    need = [math.ceil(c / block_kv) for c in context_lens_1d]
    max_blocks = max(need) + 1
    num_blocks = sum(need) + extra_blocks
    vals, scales = R.quantize_kv_per_token(torch.randn(num_blocks, block_kv, d))
    packed = R.pack_paged_kv_cache(vals, scales).view(num_blocks, -1)
    if block_stride_pad:
        buf = torch.zeros(num_blocks, packed.shape[1] + block_stride_pad, dtype=torch.uint8)
        buf[:, :packed.shape[1]] = packed
        packed = buf[:, :packed.shape[1]]
    cache = packed.as_strided((num_blocks, block_kv, 1, d + 4), (packed.stride(0), d + 4, d + 4, 1))
    perm = torch.randperm(num_blocks)
    used, spare = perm[:sum(need)], perm[sum(need):]
    poison = spare[0]
    nan_block = R.pack_paged_kv_cache(torch.full((1, block_kv, d), float("nan")).to(FP8),
                                      torch.full((1, block_kv), float("nan")))
    cache[poison] = nan_block[0]
    table = torch.full((batch, max_blocks), int(poison), dtype=torch.int32)   # unused entries -> the NaN block
    off = 0
    for b, n in enumerate(need):
        table[b, :n] = used[off:off + n].int()
        off += n
    q = _fp8(batch, next_n, h, d)
    w = torch.randn(batch * next_n, h)
    return q, cache, w, table


def _run_paged(q, cache, w, ctx, table, max_len, clean, num_sms=4):
    meta = fp8gemm.get_paged_mqa_logits_metadata(ctx, cache.shape[1], num_sms)
    return fp8gemm.fp8_paged_mqa_logits(q, cache, w, ctx, table, meta, max_len, clean)


@pytest.mark.parametrize("next_n,h,d,block_kv", [(1, 64, 128, 64), (2, 16, 32, 16), (2, 32, 64, 64)])
def test_paged_1d_context_causal(next_n, h, d, block_kv):
    """1-D context_lens (causal rule for next_n), partial last pages, an empty and a too-short sequence."""
    lens = [150, 0, 64, 1, 97]
    q, cache, w, table = _paged_inputs(lens, next_n, h, d, block_kv)
    ctx = torch.tensor(lens, dtype=torch.int32)
    max_len = 192
    out = _run_paged(q, cache, w, ctx, table, max_len, clean=True)
    assert out.shape == (len(lens) * next_n, max_len) and out.stride(0) % 256 == 0
    _assert_logits(out, R.fp8_paged_mqa_logits(q, cache, w, ctx, table, max_len))


@pytest.mark.parametrize("clean", [False, True])
def test_paged_2d_context(clean, nan_output):
    """2-D context_lens [batch, next_n]: each row its own length (DeepGEMM pairs these with clean=False)."""
    lens = [80, 33, 5]
    q, cache, w, table = _paged_inputs(lens, 2, 32, 64, 16)
    ctx = torch.tensor([[61, 80], [33, 12], [0, 5]], dtype=torch.int32)
    ref = R.fp8_paged_mqa_logits(q, cache, w, ctx, table, 100)
    out = _run_paged(q, cache, w, ctx, table, 100, clean=clean)
    valid = R.paged_mqa_logits_valid_mask(ctx, 2, 100)
    _assert_logits(out, ref, valid=None if clean else valid)
    if not clean:
        # Sequences 1 and 2 need one 64-key tile each; nothing past it is written without cleaning.
        assert torch.isnan(out[2:, 64:]).all(), "clean_logits=False still filled past the sequences' tiles"


def test_paged_schedule_independent_and_strided_cache():
    """Any worker count gives the same logits (workers start and end mid-sequence); a padded block stride
    (a view into a larger pool) is read in place; max_context_len below a context truncates."""
    lens = [300, 129, 64, 200]
    q, cache, w, table = _paged_inputs(lens, 1, 16, 32, 32, block_stride_pad=16)
    assert cache.stride(0) > cache.shape[1] * cache.shape[3]
    ctx = torch.tensor(lens, dtype=torch.int32)
    ref = R.fp8_paged_mqa_logits(q, cache, w, ctx, table, 256)
    first = None
    for sms in (1, 3, 7):
        out = _run_paged(q, cache, w, ctx, table, 256, clean=True, num_sms=sms)
        _assert_logits(out, ref)
        if first is None:
            first = out
        assert torch.equal(out, first), "logits depend on the schedule"


@pytest.mark.parametrize("ctx,block_kv,num_sms", [
    ([150, 0, 64, 1, 97], 16, 4),
    ([[3, 9], [0, 0], [513, 700], [64, 65]], 64, 3),
    ([0, 0, 0], 64, 5),
])
def test_metadata_matches_reference(ctx, block_kv, num_sms):
    ctx = torch.tensor(ctx, dtype=torch.int32)
    meta = fp8gemm.get_paged_mqa_logits_metadata(ctx, block_kv, num_sms)
    assert meta.dtype == torch.int32 and meta.shape == (num_sms + 1, 2) and meta.device == ctx.device
    assert torch.equal(meta, R.paged_mqa_logits_metadata(ctx, block_kv, num_sms))


def test_metadata_large_batch_and_many_sms():
    """More sequences than one chunk (256) and more workers than one chunk (128)."""
    ctx = torch.randint(0, 5000, (700,), dtype=torch.int32)
    ctx[::7] = 0
    for num_sms in (132, 300):
        meta = fp8gemm.get_paged_mqa_logits_metadata(ctx, 64, num_sms)
        assert torch.equal(meta, R.paged_mqa_logits_metadata(ctx, 64, num_sms))
        assert meta[-1].tolist() == [700, 0]


# -------------------------------------------------------------------------------------
# Argument validation: every bad argument raises, naming it, before any launch
# -------------------------------------------------------------------------------------

def _good_prefill():
    q, kv, sf, w = _prefill_inputs(4, 10, 32, 64)
    ks = torch.zeros(4, dtype=torch.int32)
    return dict(q=q, kv=(kv, sf), weights=w, cu_seq_len_k_start=ks, cu_seq_len_k_end=ks + 10)


PREFILL_BAD = [
    ("q", lambda a: a.update(q=a["q"].to(torch.bfloat16)), TypeError, "q"),
    ("q", lambda a: a.update(q=_fp8(4, 8, 64)), ValueError, "num_heads"),
    ("q", lambda a: a.update(q=_fp8(4, 32, 96)), ValueError, "head_dim"),
    ("q", lambda a: a.update(q=_fp8(4, 32)), ValueError, "q"),
    ("q", lambda a: a.update(q=_fp8(4, 64, 32).transpose(1, 2)), ValueError, "contiguous"),
    ("kv", lambda a: a.update(kv=a["kv"][0]), TypeError, "kv"),
    ("kv", lambda a: a.update(kv=(a["kv"][0].float(), a["kv"][1])), TypeError, "kv[0]"),
    ("kv", lambda a: a.update(kv=(_fp8(10, 32), a["kv"][1])), ValueError, "kv[0]"),
    ("kv", lambda a: a.update(kv=(a["kv"][0], a["kv"][1].double())), TypeError, "kv[1]"),
    ("kv", lambda a: a.update(kv=(a["kv"][0], a["kv"][1][:9])), ValueError, "kv[1]"),
    ("weights", lambda a: a.update(weights=a["weights"][:, :16]), ValueError, "weights"),
    ("weights", lambda a: a.update(weights=a["weights"].half()), TypeError, "weights"),
    ("ks", lambda a: a.update(cu_seq_len_k_start=a["cu_seq_len_k_start"].long()), TypeError, "cu_seq_len_k_start"),
    ("ke", lambda a: a.update(cu_seq_len_k_end=a["cu_seq_len_k_end"][:3]), ValueError, "cu_seq_len_k_end"),
    ("clean_logits", lambda a: a.update(clean_logits=1), TypeError, "clean_logits"),
    ("max_seqlen_k", lambda a: a.update(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
    ("max_seqlen_k", lambda a: a.update(max_seqlen_k=2.0), TypeError, "max_seqlen_k"),
    ("device", lambda a: a.update(weights=torch.empty(4, 32, device="meta")), ValueError, "device"),
]


@pytest.mark.parametrize("what,mutate,exc,word", PREFILL_BAD, ids=[f"{p[0]}-{i}" for i, p in enumerate(PREFILL_BAD)])
def test_prefill_rejects(what, mutate, exc, word, no_launch):
    args = _good_prefill()
    mutate(args)
    with pytest.raises(exc, match=word.replace("[", r"\[").replace("]", r"\]")):
        fp8gemm.fp8_mqa_logits(**args)


def _good_paged():
    lens = [40, 70]
    q, cache, w, table = _paged_inputs(lens, 2, 32, 64, 64)
    ctx = torch.tensor(lens, dtype=torch.int32)
    meta = R.paged_mqa_logits_metadata(ctx, 64, 4)
    return dict(q=q, kv_cache=cache, weights=w, context_lens=ctx, block_table=table, schedule_meta=meta,
                max_context_len=128, clean_logits=True)


PAGED_BAD = [
    ("q", lambda a: a.update(q=a["q"].float()), TypeError, "q"),
    ("q", lambda a: a.update(q=_fp8(2, 3, 32, 64)), ValueError, "next_n"),
    ("q", lambda a: a.update(q=_fp8(2, 2, 24, 64)), ValueError, "num_heads"),
    ("q", lambda a: a.update(q=_fp8(2, 2, 32, 48)), ValueError, "head_dim"),
    ("kv_cache", lambda a: a.update(kv_cache=a["kv_cache"].view(FP8)), TypeError, "kv_cache"),
    ("kv_cache", lambda a: a.update(kv_cache=torch.zeros(5, 64, 1, 64, dtype=torch.uint8)), ValueError, "kv_cache"),
    ("kv_cache", lambda a: a.update(kv_cache=torch.zeros(5, 48, 1, 68, dtype=torch.uint8)), ValueError, "block_kv"),
    ("kv_cache", lambda a: a.update(kv_cache=torch.zeros(5, 64, 68, dtype=torch.uint8)), ValueError, "kv_cache"),
    ("kv_cache", lambda a: a.update(kv_cache=torch.zeros(68, 64, 1, 5, dtype=torch.uint8).permute(3, 1, 2, 0)),
     ValueError, "kv_cache"),
    ("weights", lambda a: a.update(weights=a["weights"][:2]), ValueError, "weights"),
    ("context_lens", lambda a: a.update(context_lens=a["context_lens"].long()), TypeError, "context_lens"),
    ("context_lens", lambda a: a.update(context_lens=a["context_lens"][:1]), ValueError, "context_lens"),
    ("context_lens", lambda a: a.update(context_lens=torch.zeros(2, 3, dtype=torch.int32)), ValueError, "context_lens"),
    ("block_table", lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table"),
    ("block_table", lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "block_table"),
    ("schedule_meta", lambda a: a.update(schedule_meta=a["schedule_meta"][:, :1].contiguous()), ValueError,
     "schedule_meta"),
    ("schedule_meta", lambda a: a.update(schedule_meta=a["schedule_meta"].long()), TypeError, "schedule_meta"),
    ("max_context_len", lambda a: a.update(max_context_len=-5), ValueError, "max_context_len"),
    ("max_context_len", lambda a: a.update(max_context_len=torch.tensor(5)), TypeError, "max_context_len"),
    ("clean_logits", lambda a: a.update(clean_logits=None), TypeError, "clean_logits"),
    ("device", lambda a: a.update(block_table=torch.empty(2, 2, dtype=torch.int32, device="meta")), ValueError,
     "device"),
]


@pytest.mark.parametrize("what,mutate,exc,word", PAGED_BAD, ids=[f"{p[0]}-{i}" for i, p in enumerate(PAGED_BAD)])
def test_paged_rejects(what, mutate, exc, word, no_launch):
    args = _good_paged()
    mutate(args)
    with pytest.raises(exc, match=word):
        fp8gemm.fp8_paged_mqa_logits(**args)


@pytest.mark.parametrize("args,exc,word", [
    ((torch.zeros(3, dtype=torch.int64), 64, 4), TypeError, "context_lens"),
    ((torch.zeros(3, 2, 2, dtype=torch.int32), 64, 4), ValueError, "context_lens"),
    ((torch.zeros(3, dtype=torch.int32), 48, 4), ValueError, "block_kv"),
    ((torch.zeros(3, dtype=torch.int32), 64, 0), ValueError, "num_sms"),
    ((torch.zeros(3, dtype=torch.int32), 64, 4.0), TypeError, "num_sms"),
    ([1, 2, 3], TypeError, "context_lens"),
])
def test_metadata_rejects(args, exc, word, no_launch):
    if isinstance(args, list):
        args = (args, 64, 4)
    with pytest.raises(exc, match=word):
        fp8gemm.get_paged_mqa_logits_metadata(*args)


# -------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90a: FP8 wgmma, a software-pipelined KV stream, no spills
# -------------------------------------------------------------------------------------

_PREFILL_SIG = {"q_ptr": "*fp8e4nv", "kv_ptr": "*fp8e4nv", "kvs_ptr": "*fp32", "w_ptr": "*fp32", "ks_ptr": "*i32",
                "ke_ptr": "*i32", "out_ptr": "*fp32", "seq_len": "i32", "seq_len_kv": "i32", "max_seqlen_k": "i32",
                "stride_w": "i32", "stride_out": "i32"}
_PREFILL_DIV = ["q_ptr", "kv_ptr", "kvs_ptr", "w_ptr", "ks_ptr", "ke_ptr", "out_ptr", "stride_w", "stride_out"]
_PAGED_SIG = {"q_ptr": "*fp8e4nv", "kv_ptr": "*fp8e4nv", "kvs_ptr": "*fp32", "w_ptr": "*fp32", "ctx_ptr": "*i32",
              "bt_ptr": "*i32", "meta_ptr": "*i32", "out_ptr": "*fp32", "batch": "i32", "max_context_len": "i32",
              "max_blocks": "i32", "stride_block": "i32", "stride_bt": "i32", "stride_out": "i32"}
_PAGED_DIV = ["q_ptr", "kv_ptr", "kvs_ptr", "w_ptr", "ctx_ptr", "bt_ptr", "meta_ptr", "out_ptr", "stride_block",
              "stride_out"]


def _prefill_job(h, d, compressed):
    cfg = K.prefill_config(h, d)
    consts = dict(H=h, D=d, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, COMPRESSED=compressed, CLEAN=True,
                  CLEAN_BLOCK=K.CLEAN_BLOCK, INTERIOR=cfg.interior)
    return ("fp8gemm.kernels.mqa", "mqa_logits_kernel", _PREFILL_SIG, consts,
            dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible_by_16=_PREFILL_DIV))


def _paged_job(next_n, h, d, ctx_2d):
    cfg = K.paged_config(h, d, next_n, 64)
    consts = dict(NEXT_N=next_n, H=h, D=d, BLOCK_KV=64, CTX_2D=ctx_2d, CLEAN=not ctx_2d, TILE=cfg.tile, SUB=cfg.sub,
                  CLEAN_BLOCK=K.CLEAN_BLOCK)
    return ("fp8gemm.kernels.mqa", "paged_mqa_logits_kernel", _PAGED_SIG, consts,
            dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible_by_16=_PAGED_DIV))


AOT_CASES = {
    "metadata 2-D lens": ("fp8gemm.kernels.mqa", "paged_mqa_metadata_kernel",
                          {"ctx_ptr": "*i32", "meta_ptr": "*i32", "batch": "i32", "num_sms": "i32"},
                          dict(SPLIT=256, NEXT_N=2, CTX_2D=True, BLOCK_B=K.META_BLOCK_B, BLOCK_S=K.META_BLOCK_S),
                          dict(num_warps=K.META_WARPS, num_stages=1, divisible_by_16=["ctx_ptr", "meta_ptr"])),
    "prefill H64 D128": _prefill_job(64, 128, False),
    "prefill H16 D32 compressed": _prefill_job(16, 32, True),
    "paged next_n 1 H64 D128": _paged_job(1, 64, 128, False),
    "paged next_n 2 H64 D128 2-D lens": _paged_job(2, 64, 128, True),
}


@pytest.fixture(scope="module")
def aot_results():
    """Compile every case at once (each compile is its own subprocess)."""
    with concurrent.futures.ThreadPoolExecutor(len(AOT_CASES)) as pool:
        futures = {name: pool.submit(compile_sm90_in_subprocess, mod, kern, sig, consts, **opts)
                   for name, (mod, kern, sig, consts, opts) in AOT_CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_aot_sm90(name, aot_results):
    res = aot_results[name]
    if name.startswith("metadata"):
        assert res["local"] == 0 and res["stack"] == 0, f"{name}: spills ({res['stack']} B of stack)"
        return
    assert sass_count(res["sass"], "QGMMA") > 0, f"{name}: no FP8 wgmma in the SASS"
    assert sass_count(res["sass"], "LDGSTS") > 0, f"{name}: the KV stream is not software-pipelined (no cp.async)"
    assert res["local"] == 0 and res["stack"] == 0, f"{name}: local memory used ({res['local']} B)"
    # Registers leave room for two programs per SM (the design relies on it to overlap MMA and epilogue).
    warps = AOT_CASES[name][4]["num_warps"]
    assert 0 < res["regs"] * warps * 32 <= 32768, f"{name}: {res['regs']} registers x {warps} warps"
