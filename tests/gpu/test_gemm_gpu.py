"""GEMM family on the GPU: every ANCHORS.md shape against the reference, signals, CUDA graphs."""
import math

import pytest
import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm.testing import calc_diff, check_signal

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
DENSE_NK = [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def _fp8(*s):
    return torch.randn(*s, device="cuda").to(FP8)


def _sc(*s):
    return torch.rand(*s, device="cuda") + 0.5


@pytest.mark.parametrize("n,k", DENSE_NK)
@pytest.mark.parametrize("m", [1, 64, 128, 4096, 333])
def test_dense_anchor_shapes(m, n, k):
    a, b = _fp8(m, k), _fp8(n, k)
    sfa, sfb = _sc(m, k // 128), _sc(math.ceil(n / 128), k // 128)
    d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    assert calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb)) < 1e-3


@pytest.mark.parametrize("m,n,k", [(77, 1000, 7168 + 16), (4096, 4000, 640), (5, 129, 4096)])
def test_dense_odd_shapes(m, n, k):
    a, b = _fp8(m, k), _fp8(n, k)
    sfa, sfb = _sc(m, math.ceil(k / 128)), _sc(math.ceil(n / 128), math.ceil(k / 128))
    d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    assert calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb)) < 1e-3


@pytest.mark.parametrize("g,expected", [(32, 192), (6, 1024), (32, 20), (6, 20)])
@pytest.mark.parametrize("n,k", [(6144, 7168), (4096, 2048)])
@pytest.mark.parametrize("overlap", [False, True])
def test_masked_anchor_shapes(g, expected, n, k, overlap):
    max_m = 4096 if expected > 100 else 512
    masked_m = torch.randint(max(1, expected // 2), expected * 3 // 2 + 1, (g,), device="cuda", dtype=torch.int32)
    masked_m[0] = 0
    a, b = _fp8(g, max_m, k), _fp8(g, n, k)
    sfa, sfb = _sc(g, max_m, k // 128), _sc(g, n // 128, k // 128)
    d = torch.full((g, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    signal = fp8gemm.alloc_signal(g, max_m, "cuda") if overlap else None
    out = fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, expected,
                                               enable_overlap=overlap, signal=signal)
    counts = masked_m.tolist()
    for i, c in enumerate(counts):
        assert d[i, c:].isnan().all(), f"group {i}: rows past masked_m written"
    got = torch.cat([d[i, :c] for i, c in enumerate(counts)])
    want = torch.cat([R.fp8_gemm_nt(a[i, :c], sfa[i, :c], b[i], sfb[i]) for i, c in enumerate(counts)])
    assert calc_diff(got, want) < 1e-3
    if overlap:
        check_signal(signal, masked_m, max_m, n, out[0], out[1])


@pytest.mark.parametrize("g,per", [(4, 8192), (8, 4096)])
def test_contiguous_anchor_shapes(g, per):
    n, k = 4096, 7168
    ids = []
    for e in range(g):
        r = per - 37 * e
        ids += [e] * r + [-1] * ((-r) % 128)
    mi = torch.tensor(ids, dtype=torch.int32, device="cuda")
    m = len(ids)
    a, b = _fp8(m, k), _fp8(g, n, k)
    sfa, sfb = _sc(m, k // 128), _sc(g, n // 128, k // 128)
    d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, mi)
    ok = mi >= 0
    assert d[~ok].isnan().all()
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, mi, torch.zeros_like(d))
    assert calc_diff(d[ok], ref[ok]) < 1e-3


def test_masked_overlap_in_cuda_graph_and_reduced_sms():
    g, max_m, n, k = 8, 256, 4096, 2048
    a, b = _fp8(g, max_m, k), _fp8(g, n, k)
    sfa, sfb = _sc(g, max_m, k // 128), _sc(g, n // 128, k // 128)
    d = torch.empty(g, max_m, n, dtype=torch.bfloat16, device="cuda")
    masked_m = torch.zeros(g, dtype=torch.int32, device="cuda")
    signal = fp8gemm.alloc_signal(g, max_m, "cuda")
    old = fp8gemm.get_num_sms()
    fp8gemm.set_num_sms(100)
    try:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):  # warm up (compiles) outside the capture
            fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, 32, enable_overlap=True, signal=signal)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            signal.zero_()
            block_m, threshold = fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, 32,
                                                                      enable_overlap=True, signal=signal)
        for trial in range(3):
            counts = torch.randint(0, max_m + 1, (g,), dtype=torch.int32)
            masked_m.copy_(counts)
            d.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            check_signal(signal, masked_m, max_m, n, block_m, threshold)
            for i, c in enumerate(counts.tolist()):
                if c:
                    assert calc_diff(d[i, :c], R.fp8_gemm_nt(a[i, :c], sfa[i, :c], b[i], sfb[i])) < 1e-3
                assert d[i, c:].isnan().all()
    finally:
        fp8gemm.set_num_sms(old)


def test_dense_in_cuda_graph():
    m, n, k = 128, 4096, 7168
    a, b = _fp8(m, k), _fp8(n, k)
    sfa, sfb = _sc(m, k // 128), _sc(n // 128, k // 128)
    d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    a.copy_(_fp8(m, k))
    d.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb)) < 1e-3


def _draw(gen, lo, hi, step=1):
    """An int in [lo, hi], a multiple of ``step``, from ``gen``."""
    return lo + step * int(torch.randint(0, (hi - lo) // step + 1, (1,), generator=gen))


@pytest.mark.parametrize("seed", range(10))
def test_random_shapes(seed):
    """Shapes drawn at random (seeded: a failure names its seed) through the public API, each mode once a seed:
    ragged M and N (any N, so partial tiles and row pitches that are no TMA layout), K a multiple of 16 up to 4096
    (partial last scale block in the dense draw), row-major or MN-major A scales; masked with counts drawn from 0 to
    max_m (the first group full on every third seed) and signals on or off; contiguous with segment lengths drawn
    from 0 to 900 and -1 padding.  Outputs are NaN-poisoned: rows that must not be written stay NaN."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mn_major = bool(seed % 2)
    # dense
    m, n, k = _draw(gen, 1, 3000), _draw(gen, 1, 6000), _draw(gen, 16, 4096, 16)
    kb = math.ceil(k / 128)
    a, b = _fp8(m, k), _fp8(n, k)
    sfa, sfb = _sc(m, kb), _sc(math.ceil(n / 128), kb)
    if mn_major:
        sfa = fp8gemm.get_mn_major_tma_aligned_tensor(sfa)
    d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    diff = calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb))
    assert diff < 1e-3 and not d.isnan().any(), ("dense", m, n, k, mn_major, diff)
    # masked (the weights' N a multiple of 16, as MoE layers have them)
    g, max_m = _draw(gen, 1, 9), _draw(gen, 1, 700)
    n, k = _draw(gen, 16, 4096, 16), _draw(gen, 128, 4096, 128)
    counts = [_draw(gen, 0, max_m) for _ in range(g)]
    counts[0] = max_m if seed % 3 == 0 else counts[0]
    overlap = seed % 3 != 1
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    a, b = _fp8(g, max_m, k), _fp8(g, n, k)
    sfa, sfb = _sc(g, max_m, k // 128), _sc(g, math.ceil(n / 128), k // 128)
    if mn_major:
        sfa = fp8gemm.get_mn_major_tma_aligned_tensor(sfa)
    d = torch.full((g, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    signal = fp8gemm.alloc_signal(g, max_m, "cuda") if overlap else None
    expected = max(1, sum(counts) // g)
    out = fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, expected,
                                               enable_overlap=overlap, signal=signal)
    case = ("masked", g, max_m, n, k, counts, mn_major, overlap)
    for i, c in enumerate(counts):
        assert d[i, c:].isnan().all(), case
        if c:
            assert calc_diff(d[i, :c], R.fp8_gemm_nt(a[i, :c], sfa[i, :c], b[i], sfb[i])) < 1e-3, (case, i)
            assert not d[i, :c].isnan().any(), (case, i)
    if overlap:
        check_signal(signal, masked_m, max_m, n, out[0], out[1])
    # contiguous
    align = fp8gemm.get_mk_alignment_for_contiguous_layout()
    g = _draw(gen, 1, 6)
    n, k = _draw(gen, 16, 4096, 16), _draw(gen, 128, 4096, 128)
    ids = []
    for e in range(g):
        r = _draw(gen, 0, 900)
        ids += [e] * r + [-1] * ((-r) % align)
    if not ids:
        ids = [-1] * align
    mi = torch.tensor(ids, dtype=torch.int32, device="cuda")
    m = len(ids)
    a, b = _fp8(m, k), _fp8(g, n, k)
    sfa, sfb = _sc(m, k // 128), _sc(g, math.ceil(n / 128), k // 128)
    if mn_major:
        sfa = fp8gemm.get_mn_major_tma_aligned_tensor(sfa)
    d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, mi)
    ok = mi >= 0
    case = ("contiguous", g, m, n, k, mn_major)
    assert d[~ok].isnan().all(), case
    if ok.any():
        ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, mi, torch.zeros_like(d))
        assert calc_diff(d[ok], ref[ok]) < 1e-3 and not d[ok].isnan().any(), case
