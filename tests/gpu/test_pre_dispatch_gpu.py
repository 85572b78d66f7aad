"""MoE activation path on the GPU at DeepSeek shapes (4096 tokens, hidden 7168, top-8), byte-exact against
the reference (computed on the CPU), including the FMA-sensitive combine rounding and CUDA-graph capture;
FP4 activations into the masked/contiguous GEMMs at the ANCHORS.md decode shapes: the fused convert kernel byte
for byte, convert + Gluon against the reference and against the in-kernel Triton path."""
import pytest
import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm.kernels import fp4_convert as FC
from fp8gemm.kernels import gemm_dispatch
from fp8gemm.moe import combine_reduce, mega_moe_pre_dispatch, quantize_combine_payload
from fp8gemm.testing import bit_view, calc_diff

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
TOKENS, HIDDEN, TOPK, EXPERTS = 4096, 7168, 8, 256


def assert_same(got, want, what):
    got = got.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape}/{got.dtype} vs {want.shape}"
    bad = int((bit_view(got) != bit_view(want)).sum())
    assert bad == 0, f"{what}: {bad} of {got.numel()} elements differ"


def routing(n, idx_dtype=torch.int64):
    idx = torch.stack([torch.randperm(EXPERTS, device="cuda")[:TOPK] for _ in range(n)]).to(idx_dtype)
    idx[::17, -1] = -1
    return idx, torch.rand(n, TOPK, device="cuda")


def buffers(capacity, fp4, group_size, fp32_scales=False, idx_dtype=torch.int64):
    bx = torch.full((capacity, HIDDEN // 2 if fp4 else HIDDEN), 0xAB, dtype=torch.uint8, device="cuda")
    bx = bx if fp4 else bx.view(FP8)
    bsf = (torch.full((capacity, HIDDEN // 128), float("nan"), device="cuda") if fp32_scales else
           torch.full((capacity, HIDDEN // group_size), 0xAB, dtype=torch.uint8, device="cuda"))
    return (bx, bsf, torch.full((capacity, TOPK), 999, dtype=idx_dtype, device="cuda"),
            torch.full((capacity, TOPK), float("nan"), device="cuda"))


@pytest.mark.parametrize("fp4,group_size,fp32_scales", [(False, 128, False), (False, 32, False), (True, 32, False),
                                                        (False, 128, True)])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_pre_dispatch_deepseek_shape(fp4, group_size, fp32_scales, idx_dtype):
    capacity = 4608
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    x[5] = 0.0
    x[9, 1000] = float("nan")
    idx, w = routing(TOKENS)
    bufs = buffers(capacity, fp4, group_size, fp32_scales, idx_dtype)
    mega_moe_pre_dispatch(x, idx, w, *bufs, TOKENS, group_size, fp4, fp32_scales=fp32_scales, num_experts=EXPERTS)
    want = R.mega_moe_pre_dispatch(x.cpu(), idx.cpu(), w.cpu(), TOKENS, capacity, group_size, fp4,
                                   fp32_scales=fp32_scales, idx_dtype=idx_dtype)
    for name, got, ref in zip(("buf_x", "buf_x_sf", "buf_topk_idx", "buf_topk_weights"), bufs, want):
        assert_same(got, ref, name)


def test_pre_dispatch_in_cuda_graph():
    capacity, n = 1024, 700
    x = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16)
    idx, w = routing(n)
    bufs = buffers(capacity, False, 128)
    mega_moe_pre_dispatch(x, idx, w, *bufs, n, 128, False)        # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mega_moe_pre_dispatch(x, idx, w, *bufs, n, 128, False, num_experts=EXPERTS)   # range check skipped
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want = R.mega_moe_pre_dispatch(x.cpu(), idx.cpu(), w.cpu(), n, capacity, 128, False)
    for name, got, ref in zip(("buf_x", "buf_x_sf", "buf_topk_idx", "buf_topk_weights"), bufs, want):
        assert_same(got, ref, name)


def test_combine_payload_and_reduce_deepseek_shape():
    t = 1024
    y = torch.randn(t, TOPK, HIDDEN, device="cuda", dtype=torch.bfloat16)
    q, sf = quantize_combine_payload(y)
    rq, rsf = R.quantize_combine_payload(y.cpu())
    assert_same(q, rq, "payload codes")
    assert_same(sf, rsf, "payload scale bytes")
    idx, w = routing(t)
    out = combine_reduce(q, sf, w, idx)
    assert_same(out, R.combine_reduce(q.cpu(), sf.cpu(), w.cpu(), idx.cpu()), "combine")
    out2 = combine_reduce(q, sf, w.bfloat16())
    assert_same(out2, R.combine_reduce(q.cpu(), sf.cpu(), w.bfloat16().cpu()), "combine (bf16 weights, no ids)")


def test_combine_rounds_like_reference_without_fma():
    q = torch.full((1, 2, 128), 1.5, device="cuda").to(FP8)
    sf = torch.full((1, 2, 1), 127, dtype=torch.uint8, device="cuda")
    w = torch.tensor([[-1.0, 1.0 + 2.0 ** -23]], device="cuda")
    out = combine_reduce(q, sf, w)
    assert (out.float() == 2.0 ** -22).all(), "the product was fused into the add (FMA)"


# =====================================================================================
# FP4 activations into the grouped GEMMs: fused convert + Gluon vs the in-kernel Triton path
# =====================================================================================

GROUPED_NK = [(6144, 7168), (7168, 3072), (4096, 4096), (4096, 2048)]      # ANCHORS.md, masked rows
MASKED_DECODE = [(32, 20), (6, 20), (32, 192)]                             # (groups, expected_m)


def _fp4_acts(g, rows, k, wide=False):
    """Real per-32 casts of rows whose magnitudes span 2^-6..2^6 (``wide``: random scale bytes that are up to
    2^40 apart inside a 128-block, so the convert's subnormal rounding is exercised too)."""
    if wide:
        codes = torch.randint(0, 256, (g, rows, k // 2), dtype=torch.uint8, device="cuda")
        return codes, torch.randint(100, 141, (g, rows, k // 32), dtype=torch.uint8, device="cuda")
    x = torch.randn(g * rows, k, device="cuda") * torch.exp2(torch.randint(-6, 7, (g * rows, k // 32), device="cuda")
                                                             .float()).repeat_interleave(32, dim=1)
    codes, sb = fp8gemm.per_token_cast_to_fp4(x.bfloat16(), ue8m0_bytes=True)
    return codes.view(g, rows, k // 2), sb.view(g, rows, k // 32)


def _random_masked_m(g, expected, max_m, seed):
    gen = torch.Generator().manual_seed(seed)
    mm = ((torch.rand(g, generator=gen) * 0.6 + 0.7) * expected).int().clamp(1, max_m)
    mm[0] = 0                                  # an empty group
    mm[-1] = max_m if g > 2 else mm[-1]        # a full one
    return mm.to("cuda")


def _fp8_weights(g, n, k):
    b = torch.randn(g, n, k, device="cuda").to(FP8)
    return b, torch.rand(g, (n + 127) // 128, k // 128, device="cuda") + 0.5


@pytest.mark.parametrize("g,k", [(32, 7168), (6, 3072), (32, 2048), (6, 4096)])
def test_fp4_convert_bytes_at_masked_decode_shapes(g, k):
    max_m = 256
    codes, sb = _fp4_acts(g, max_m, k, wide=True)
    masked_m = _random_masked_m(g, 20, max_m, g + k)
    q, sf = FC.empty_fp8_operand(codes, k)
    q.view(torch.uint8).fill_(0xAB)
    sf.fill_(float("nan"))
    FC.launch_fp4_to_fp8(codes, sb, q, sf, masked_m=masked_m, rows_hint=20)
    want_q, want_sf = FC.fp4_to_fp8_reference(codes, sb)       # torch's E4M3 cast: nearest even, like the kernel
    for gi, mm in enumerate(masked_m.tolist()):
        assert_same(q[gi, :mm], want_q[gi, :mm].cpu(), f"group {gi} E4M3 bytes")
        assert_same(sf[gi, :mm], want_sf[gi, :mm].cpu(), f"group {gi} scales")
        assert (q[gi, mm:].view(torch.uint8) == 0xAB).all() and sf[gi, mm:].isnan().all(), f"group {gi} tail written"


@pytest.mark.sm90
@pytest.mark.parametrize("n,k", GROUPED_NK)
@pytest.mark.parametrize("g,expected", MASKED_DECODE)
def test_fp4_masked_gemm_convert_vs_reference_and_in_kernel(g, expected, n, k, monkeypatch):
    max_m = 256 if expected < 100 else 512
    codes, sb = _fp4_acts(g, max_m, k)
    b, sfb = _fp8_weights(g, n, k)
    masked_m = _random_masked_m(g, expected, max_m, g * expected + n + k)
    monkeypatch.delenv("FP8GEMM_BACKEND", raising=False)
    kind, _ = gemm_dispatch._plan("masked", codes, sb, b, sfb, torch.empty(g, max_m, n, dtype=torch.bfloat16,
                                                                             device="cuda"), None, expected, 128, 256, None)
    assert kind == "fp4-gluon", "SM90 + auto backend: FP4 goes through the convert kernel and Gluon"
    d_conv = torch.full((g, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sb), (b, sfb), d_conv, masked_m, expected)
    monkeypatch.setenv("FP8GEMM_BACKEND", "triton")
    d_tri = torch.full_like(d_conv, float("nan"))
    fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sb), (b, sfb), d_tri, masked_m, expected)
    ref = R.m_grouped_fp8_gemm_nt_masked(codes, sb, b, sfb, masked_m, torch.zeros_like(d_conv))
    counts = masked_m.tolist()
    rows = lambda t: torch.cat([t[i, :c] for i, c in enumerate(counts)])  # noqa: E731
    assert calc_diff(rows(d_conv), rows(ref)) < 1e-3
    # The same E4M3 values and scales: only the accumulation order (and so BF16 rounding) may differ.
    assert calc_diff(rows(d_conv), rows(d_tri)) < 1e-5
    for i, c in enumerate(counts):
        assert d_conv[i, c:].isnan().all(), f"group {i}: rows past masked_m written"


@pytest.mark.sm90
def test_fp4_masked_gemm_in_cuda_graph_with_overlap():
    g, max_m, n, k = 6, 256, 4096, 2048
    codes, sb = _fp4_acts(g, max_m, k)
    b, sfb = _fp8_weights(g, n, k)
    masked_m = _random_masked_m(g, 20, max_m, 7)
    d = torch.full((g, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    signal = fp8gemm.alloc_signal(g, max_m, "cuda")

    def call():
        signal.zero_()
        return fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sb), (b, sfb), d, masked_m, 20, enable_overlap=True,
                                                    signal=signal)
    block_m, threshold = call()                     # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    masked_m.copy_(_random_masked_m(g, 40, max_m, 8))   # new routing, read on the device at replay
    codes.copy_(torch.randint_like(codes, 0, 256))
    d.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    fp8gemm.testing.check_signal(signal, masked_m, max_m, n, block_m, threshold)
    ref = R.m_grouped_fp8_gemm_nt_masked(codes, sb, b, sfb, masked_m, torch.zeros_like(d))
    for i, c in enumerate(masked_m.tolist()):
        if c:
            assert calc_diff(d[i, :c], ref[i, :c]) < 1e-3
        assert d[i, c:].isnan().all()


@pytest.mark.sm90
def test_fp4_contiguous_gemm_convert_vs_reference_and_in_kernel(monkeypatch):
    n, k = 4096, 7168
    sizes = [300, 0, 77, 1000]
    ids = []
    for e, r in enumerate(sizes):
        ids += [e] * r + [-1] * ((-r) % 128)
    m_indices = torch.tensor(ids, dtype=torch.int32, device="cuda")
    codes, sb = _fp4_acts(1, len(ids), k)
    codes, sb = codes[0], sb[0]
    b, sfb = _fp8_weights(len(sizes), n, k)
    monkeypatch.delenv("FP8GEMM_BACKEND", raising=False)
    d_conv = torch.full((len(ids), n), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp8gemm.m_grouped_fp8_gemm_nt_contiguous((codes, sb), (b, sfb), d_conv, m_indices)
    monkeypatch.setenv("FP8GEMM_BACKEND", "triton")
    d_tri = torch.full_like(d_conv, float("nan"))
    fp8gemm.m_grouped_fp8_gemm_nt_contiguous((codes, sb), (b, sfb), d_tri, m_indices)
    ok = m_indices >= 0
    ref = R.m_grouped_fp8_gemm_nt_contiguous(codes, sb, b, sfb, m_indices, torch.zeros_like(d_conv))
    assert calc_diff(d_conv[ok], ref[ok]) < 1e-3
    assert calc_diff(d_conv[ok], d_tri[ok]) < 1e-5
    assert d_conv[~ok].isnan().all()
