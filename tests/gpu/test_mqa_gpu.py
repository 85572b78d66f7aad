"""MQA logits on the GPU: realistic prefill and decode shapes against the reference, determinism, and the
paged path captured in a CUDA graph and replayed with new context lengths and block tables.

Run: ``PYTHONPATH=. python3 -m pytest -q tests/gpu/test_mqa_gpu.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm.testing import calc_diff

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]

FP8 = torch.float8_e4m3fn
NEG_INF = float("-inf")
# Same inputs on both sides (the reference de-quantises the very FP8 values the kernel reads), so only the
# FP32 summation order differs.  DeepGEMM's own bound against its de-quantised reference is 5e-6.
TOL = 5e-6


@pytest.fixture(autouse=True)
def _no_tf32():
    """The reference must run in true FP32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _check(out, ref, valid=None):
    if valid is None:
        valid = ref != NEG_INF
        assert torch.equal(out == NEG_INF, ~valid), "the -inf positions differ from the reference"
    o, r = out[valid], ref[valid]
    assert not torch.isnan(o).any(), "a valid position holds NaN (not written?)"
    diff = calc_diff(o, r)
    assert diff < TOL, f"calc_diff {diff:.3g}"


def _prefill_inputs(seq_len, seq_len_kv, h, d):
    q = torch.randn(seq_len, h, d, device="cuda").to(FP8)
    kv, sf = R.quantize_kv_per_token(torch.randn(seq_len_kv, d, device="cuda"))
    w = torch.randn(seq_len, h, device="cuda")
    return q, kv, sf, w


def _ranges(seq_len, seq_len_kv, cp):
    """DeepGEMM's two test patterns: causal (ks = 0, ke growing) and a context-parallel rank's two chunks."""
    if not cp:
        ks = torch.zeros(seq_len, dtype=torch.int32, device="cuda")
        ke = torch.arange(seq_len, dtype=torch.int32, device="cuda") + (seq_len_kv - seq_len)
        return ks, ke
    chunk, cp_size = seq_len // 2, seq_len_kv // seq_len
    cp_id = cp_size // 3
    i = torch.arange(chunk, dtype=torch.int32, device="cuda")
    ks = torch.zeros(seq_len, dtype=torch.int32, device="cuda")
    ke = torch.cat([cp_id * chunk + i, (cp_size * 2 - 1 - cp_id) * chunk + i])
    return ks, ke


@pytest.mark.parametrize("cp", [False, True])
@pytest.mark.parametrize("seq_len,seq_len_kv,h,d", [(2048, 8192, 64, 128), (2048, 4096, 32, 64),
                                                     (1024, 2048, 16, 32), (777, 3000, 64, 64)])
def test_prefill(seq_len, seq_len_kv, h, d, cp):
    if cp and (seq_len_kv % seq_len or seq_len % 2):
        pytest.skip("the CP pattern needs seq_len | seq_len_kv")
    q, kv, sf, w = _prefill_inputs(seq_len, seq_len_kv, h, d)
    ks, ke = _ranges(seq_len, seq_len_kv, cp)
    ref = R.fp8_mqa_logits(q, kv, sf, w, ks, ke)
    out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke)
    _check(out, ref)
    again = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke)
    assert torch.equal(again, out), "not deterministic"


@pytest.mark.parametrize("clean", [False, True])
def test_prefill_compressed(clean):
    seq_len, seq_len_kv, h, d = 2048, 8192, 64, 128
    q, kv, sf, w = _prefill_inputs(seq_len, seq_len_kv, h, d)
    ks, ke = _ranges(seq_len, seq_len_kv, cp=True)
    width = int((ke - ks).max())
    ref = R.fp8_mqa_logits(q, kv, sf, w, ks, ke, max_seqlen_k=width)
    out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=clean, max_seqlen_k=width)
    assert out.shape == (seq_len, width)
    _check(out, ref, valid=None if clean else ref != NEG_INF)


def test_prefill_random_ranges_no_clean():
    seq_len, seq_len_kv, h, d = 1500, 5000, 32, 128
    q, kv, sf, w = _prefill_inputs(seq_len, seq_len_kv, h, d)
    ks = torch.randint(-100, seq_len_kv, (seq_len,), dtype=torch.int32, device="cuda")
    ke = ks + torch.randint(0, 3000, (seq_len,), dtype=torch.int32, device="cuda")
    ref = R.fp8_mqa_logits(q, kv, sf, w, ks, ke)
    _check(fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=False), ref, valid=ref != NEG_INF)
    _check(fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=True), ref)


# -------------------------------------------------------------------------------------
# Paged decode
# -------------------------------------------------------------------------------------

def _paged_inputs(batch, next_n, h, d, block_kv, avg_kv, pool_extra=64):
    lens = torch.randint(int(0.7 * avg_kv), int(1.3 * avg_kv), (batch,), dtype=torch.int32)
    need = (lens + block_kv - 1) // block_kv
    max_blocks = int(need.max())
    num_blocks = int(need.sum()) + pool_extra
    vals, scales = R.quantize_kv_per_token(torch.randn(num_blocks, block_kv, d, device="cuda"))
    cache = R.pack_paged_kv_cache(vals, scales)
    del vals, scales
    pool = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    table = torch.zeros(batch, max_blocks, dtype=torch.int32, device="cuda")
    off = 0
    for b, n in enumerate(need.tolist()):
        table[b, :n] = pool[off:off + n]
        off += n
    q = torch.randn(batch, next_n, h, d, device="cuda").to(FP8)
    w = torch.randn(batch * next_n, h, device="cuda")
    return q, cache, w, lens.cuda(), table, max_blocks * block_kv


def _call_paged(q, cache, w, ctx, table, max_len, clean):
    meta = fp8gemm.get_paged_mqa_logits_metadata(ctx, cache.shape[1], fp8gemm.get_num_sms())
    return fp8gemm.fp8_paged_mqa_logits(q, cache, w, ctx, table, meta, max_len, clean)


@pytest.mark.parametrize("batch,next_n,h,d,block_kv,avg_kv", [
    (64, 1, 64, 128, 64, 8192), (64, 2, 64, 128, 64, 8192), (128, 1, 32, 128, 64, 4096),
    (32, 2, 16, 64, 32, 3000), (48, 1, 64, 32, 16, 2000), (16, 1, 64, 128, 64, 32768),
])
def test_paged_1d_context(batch, next_n, h, d, block_kv, avg_kv):
    q, cache, w, ctx, table, max_len = _paged_inputs(batch, next_n, h, d, block_kv, avg_kv)
    ref = R.fp8_paged_mqa_logits(q, cache, w, ctx, table, max_len)
    out = _call_paged(q, cache, w, ctx, table, max_len, clean=True)
    _check(out, ref)
    assert torch.equal(_call_paged(q, cache, w, ctx, table, max_len, clean=True), out), "not deterministic"


@pytest.mark.parametrize("next_n", [1, 2])
def test_paged_2d_context(next_n):
    """DeepGEMM's 2-D form: per-row lengths, the last equal to the sequence length, clean_logits=False."""
    q, cache, w, ctx, table, max_len = _paged_inputs(96, next_n, 64, 128, 64, 8192)
    ctx2 = ((ctx[:, None] + 1) * torch.rand(96, next_n, device="cuda")).int()
    ctx2[:, -1] = ctx
    ref = R.fp8_paged_mqa_logits(q, cache, w, ctx2, table, max_len)
    out = _call_paged(q, cache, w, ctx2, table, max_len, clean=False)
    _check(out, ref, valid=R.paged_mqa_logits_valid_mask(ctx2, next_n, max_len))
    _check(_call_paged(q, cache, w, ctx2, table, max_len, clean=True), ref)


def test_metadata_matches_reference():
    for batch, avg, sms in [(4096, 8192, fp8gemm.get_num_sms()), (3, 100, 132), (300, 70000, 17)]:
        ctx = torch.randint(0, 2 * avg, (batch,), dtype=torch.int32, device="cuda")
        meta = fp8gemm.get_paged_mqa_logits_metadata(ctx, 64, sms)
        assert meta.device.type == "cuda" and meta.dtype == torch.int32
        assert torch.equal(meta.cpu(), R.paged_mqa_logits_metadata(ctx, 64, sms))


@pytest.mark.parametrize("next_n", [1, 2])
def test_paged_cuda_graph_replay(next_n):
    """Capture metadata + logits once; replay with new context lengths and block tables written in place."""
    batch, h, d, block_kv = 128, 64, 128, 64
    q, cache, w, ctx, table, max_len = _paged_inputs(batch, next_n, h, d, block_kv, 4096)
    num_sms = fp8gemm.get_num_sms()
    static = dict(q=q.clone(), w=w.clone(), ctx=ctx.clone(), table=table.clone())

    def step():
        meta = fp8gemm.get_paged_mqa_logits_metadata(static["ctx"], block_kv, num_sms)
        return fp8gemm.fp8_paged_mqa_logits(static["q"], cache, static["w"], static["ctx"], static["table"], meta,
                                            max_len, True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                                  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):               # fails on any host sync inside the call
        out = step()

    for trial in range(3):
        new_ctx = torch.randint(0, max_len + 1, (batch,), dtype=torch.int32, device="cuda")
        new_ctx[0] = 0
        new_ctx[1] = max_len
        need = (new_ctx + block_kv - 1) // block_kv
        new_table = torch.randint(0, cache.shape[0], table.shape, dtype=torch.int32, device="cuda")
        static["ctx"].copy_(new_ctx)
        static["table"].copy_(new_table)
        static["q"].copy_(torch.randn(batch, next_n, h, d, device="cuda").to(FP8))
        static["w"].normal_()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert int(need.max()) <= table.shape[1]
        ref = R.fp8_paged_mqa_logits(static["q"], cache, static["w"], static["ctx"], static["table"], max_len)
        _check(out, ref)


# -------------------------------------------------------------------------------------
# Prefill: the warp-specialised Gluon kernel (fp8gemm.kernels.mqa_gluon) against the reference and the
# Triton kernel.  ``check_gluon_prefill`` is also what benchmarks/mqa_gluon_dev.py runs before timing.
# -------------------------------------------------------------------------------------

def _gluon_ranges(seq_len, seq_len_kv, pattern, gen):
    dev = "cuda"
    if pattern == "causal":
        ks = torch.zeros(seq_len, dtype=torch.int32, device=dev)
        ke = torch.arange(seq_len, dtype=torch.int32, device=dev) + (seq_len_kv - seq_len) + 1
    elif pattern == "full":
        ks = torch.zeros(seq_len, dtype=torch.int32, device=dev)
        ke = torch.full((seq_len,), seq_len_kv, dtype=torch.int32, device=dev)
    elif pattern == "cp":
        return _ranges(seq_len, seq_len_kv, cp=True)
    elif pattern == "ragged":
        # arbitrary per-row ranges, some reaching past both ends, some empty (ke <= ks)
        ks = torch.randint(-100, seq_len_kv, (seq_len,), dtype=torch.int32, generator=gen).to(dev)
        ke = ks + torch.randint(-50, seq_len_kv // 2 + 2, (seq_len,), dtype=torch.int32, generator=gen).to(dev)
    elif pattern == "empty":
        ks = torch.full((seq_len,), 5, dtype=torch.int32, device=dev)
        ke = torch.full((seq_len,), 5, dtype=torch.int32, device=dev)
        ke[::7] = 5 + torch.arange(0, seq_len, 7, dtype=torch.int32, device=dev) % 97
    else:
        raise ValueError(pattern)
    return ks, ke


def check_gluon_prefill(seq_len, seq_len_kv, h, d, pattern="causal", clean=True, num_sms=None, seed=0):
    """Gluon kernel (launched directly into a NaN-poisoned output) vs the reference and vs the Triton kernel;
    also that ``fp8_mqa_logits`` routes to it (bit-equal to the direct launch).  Returns the calc_diff
    against the reference.  With ``clean`` the -inf pattern must match exactly and no NaN may remain."""
    from fp8gemm import attention
    from fp8gemm.kernels import mqa as K
    from fp8gemm.kernels import mqa_gluon as MG
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq_len, h, d, generator=gen).cuda().to(FP8)
    kv, sf = R.quantize_kv_per_token(torch.randn(seq_len_kv, d, generator=gen).cuda())
    w = torch.randn(seq_len, h, generator=gen).cuda()
    ks, ke = _gluon_ranges(seq_len, seq_len_kv, pattern, gen)
    assert MG.supports(q, kv, sf, w, ks, ke, clean, 0), "the Gluon kernel declines this call"
    out = attention._padded_output(seq_len, seq_len_kv, q.device).fill_(float("nan"))
    MG.launch(q, kv, sf, w, ks, ke, out, clean, num_sms or fp8gemm.get_num_sms())
    torch.cuda.synchronize()
    ref = R.fp8_mqa_logits(q, kv, sf, w, ks, ke)
    valid = ref != NEG_INF
    if clean:
        assert not torch.isnan(out).any(), "a position was left unwritten (NaN) with clean_logits"
        assert torch.equal(out == NEG_INF, ~valid), "the -inf positions differ from the reference"
    o = out[valid]
    assert not torch.isnan(o).any(), "a valid position holds NaN (not written)"
    diff = calc_diff(o, ref[valid]) if bool(valid.any()) else 0.0
    assert diff < TOL, f"calc_diff vs reference {diff:.3g}"
    # the Triton kernel on the same inputs
    tri = attention._run_prefill(q, kv, sf, w, ks, ke, clean, 0, K.prefill_config(h, d))
    if bool(valid.any()):
        d_tri = calc_diff(o, tri[valid])
        assert d_tri < TOL, f"calc_diff vs the Triton kernel {d_tri:.3g}"
    if clean:
        assert torch.equal(out == NEG_INF, tri == NEG_INF)
    # with FP8GEMM_BACKEND=gluon the public entry gives the direct launch's values (determinism on this
    # input).  This cannot show the routing: the Triton kernel's values are often bit-equal to the Gluon
    # kernel's.  The routing itself is tested with a spy on the CPU
    # (tests/cpu/test_mqa_gluon_aot.py::test_backend_routes_prefill_to_the_gluon_launch).
    if num_sms is None:
        old = os.environ.get("FP8GEMM_BACKEND")
        os.environ["FP8GEMM_BACKEND"] = "gluon"
        try:
            api = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=clean)
        finally:
            if old is None:
                os.environ.pop("FP8GEMM_BACKEND")
            else:
                os.environ["FP8GEMM_BACKEND"] = old
        assert torch.equal(api[valid], out[valid]), "fp8_mqa_logits (FP8GEMM_BACKEND=gluon) differs from the launch"
    return diff


GLUON_SHAPES = [(2048, 8192, 64, 128), (2048, 4096, 32, 64), (777, 3000, 64, 64), (1001, 2049, 32, 128),
                (5, 70, 64, 128), (3, 1, 32, 64), (4099, 4099, 64, 128)]


@pytest.mark.parametrize("clean", [True, False])
@pytest.mark.parametrize("pattern", ["causal", "ragged", "cp"])
@pytest.mark.parametrize("seq_len,seq_len_kv,h,d", GLUON_SHAPES)
def test_prefill_gluon(seq_len, seq_len_kv, h, d, pattern, clean):
    if pattern == "cp" and (seq_len_kv % seq_len or seq_len % 2):
        pytest.skip("the CP pattern needs seq_len | seq_len_kv")
    check_gluon_prefill(seq_len, seq_len_kv, h, d, pattern, clean)


@pytest.mark.parametrize("h,d", [(64, 128), (32, 64)])
@pytest.mark.parametrize("pattern", ["full", "empty"])
def test_prefill_gluon_full_and_empty(h, d, pattern):
    check_gluon_prefill(1500, 2500, h, d, pattern, clean=True)


@pytest.mark.parametrize("num_sms", [1, 7, 131])
def test_prefill_gluon_few_programs(num_sms):
    """Persistent programs walking many query blocks (q slots and the KV ring wrap many times)."""
    check_gluon_prefill(1300, 2000, 64, 128, "causal", True, num_sms=num_sms)
    check_gluon_prefill(1300, 2000, 32, 64, "ragged", False, num_sms=num_sms, seed=1)


def test_prefill_backend_env(monkeypatch):
    """FP8GEMM_BACKEND=triton and auto run the Triton kernel (bit-equal to it: the Gluon kernel measured
    slower on most anchor rows); gluon takes the Gluon kernel for the plain form and raises for the
    compressed form; auto serves the compressed form and H16 too."""
    from fp8gemm import attention
    from fp8gemm.kernels import mqa as K
    from fp8gemm.kernels import mqa_gluon as MG
    seq_len, seq_len_kv, h, d = 1000, 3000, 64, 128
    q, kv, sf, w = _prefill_inputs(seq_len, seq_len_kv, h, d)
    ks, ke = _ranges(seq_len, seq_len_kv, cp=False)
    tri = attention._run_prefill(q, kv, sf, w, ks, ke, True, 0, K.prefill_config(h, d))
    glu = attention._padded_output(seq_len, seq_len_kv, q.device)
    MG.launch(q, kv, sf, w, ks, ke, glu, True, fp8gemm.get_num_sms())
    monkeypatch.setenv("FP8GEMM_BACKEND", "triton")
    assert torch.equal(fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke), tri)
    monkeypatch.setenv("FP8GEMM_BACKEND", "auto")
    assert torch.equal(fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke), tri)
    monkeypatch.setenv("FP8GEMM_BACKEND", "gluon")
    assert torch.equal(fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke), glu)
    with pytest.raises(RuntimeError, match="FP8GEMM_BACKEND=gluon"):
        fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=False, max_seqlen_k=512)
    monkeypatch.setenv("FP8GEMM_BACKEND", "auto")
    width = int((ke - ks).max())
    ref = R.fp8_mqa_logits(q, kv, sf, w, ks, ke, max_seqlen_k=width)
    _check(fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=True, max_seqlen_k=width), ref)
    q16, kv16, sf16, w16 = _prefill_inputs(512, 1024, 16, 32)
    ks16, ke16 = _ranges(512, 1024, cp=False)
    _check(fp8gemm.fp8_mqa_logits(q16, (kv16, sf16), w16, ks16, ke16), R.fp8_mqa_logits(q16, kv16, sf16, w16, ks16, ke16))


def test_prefill_gluon_cuda_graph():
    """The Gluon path captured in a CUDA graph (no host sync) and replayed with new ranges written in place."""
    seq_len, seq_len_kv, h, d = 1024, 4096, 32, 64
    q, kv, sf, w = _prefill_inputs(seq_len, seq_len_kv, h, d)
    ks, ke = _ranges(seq_len, seq_len_kv, cp=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke)
    for trial in range(2):
        new_ks = torch.randint(0, seq_len_kv // 2, (seq_len,), dtype=torch.int32, device="cuda")
        ks.copy_(new_ks)
        ke.copy_(new_ks + torch.randint(0, seq_len_kv // 2, (seq_len,), dtype=torch.int32, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, R.fp8_mqa_logits(q, kv, sf, w, ks, ke))
