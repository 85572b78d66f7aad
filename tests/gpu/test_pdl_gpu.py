"""Programmatic dependent launch between the FP4 convert and the Gluon GEMM (issue #6) on an SM90 GPU.

The GEMM's arithmetic does not depend on PDL, so every output here must equal, bit for bit, the same call with
``fp8gemm.set_pdl(False)``.  A GEMM that read A or its scales before the convert had written them would
read the previous call's operand (the converted buffers of a graph keep their addresses, and the caching
allocator hands eager calls the same blocks), so each check feeds new inputs to the same buffers.
"""
import pytest
import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm import runtime
from fp8gemm.kernels import gemm_dispatch
from fp8gemm.testing import bit_view, calc_diff, check_signal

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]

FP8 = torch.float8_e4m3fn


def _same_bits(got, want, what):
    bad = int((bit_view(got) != bit_view(want)).sum())
    assert bad == 0, f"{what}: {bad} of {got.numel()} elements differ"


def _pdl_on_equals_off(call, codes, sbytes, seeds, what):
    """For each seed: new FP4 inputs in the same buffers, ``call`` with PDL off then on, same bits; returns the
    last PDL-on output."""
    for seed in seeds:
        _new_fp4(codes, sbytes, seed)
        want = _with_pdl(False, call)
        got = _with_pdl(True, call)
        _same_bits(got, want, f"{what}, inputs {seed}")
    return got


def _new_fp4(codes, sbytes, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes.copy_(torch.randint(0, 256, codes.shape, dtype=torch.uint8, device="cuda", generator=gen))
    sbytes.copy_(torch.randint(122, 132, sbytes.shape, dtype=torch.uint8, device="cuda", generator=gen))


def _masked_problem(g, max_m, n, k, expected):
    codes = torch.empty(g, max_m, k // 2, dtype=torch.uint8, device="cuda")
    sbytes = torch.empty(g, max_m, k // 32, dtype=torch.uint8, device="cuda")
    _new_fp4(codes, sbytes, 0)
    b = torch.randn(g, n, k, device="cuda").to(FP8)
    sfb = torch.rand(g, (n + 127) // 128, k // 128, device="cuda") + 0.5
    gen = torch.Generator().manual_seed(g + n + k)
    masked_m = ((torch.rand(g, generator=gen) * 0.6 + 0.7) * expected).int().clamp(1, max_m)
    masked_m[0] = 0
    d = torch.full((g, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    return codes, sbytes, b, sfb, masked_m.cuda(), d


@pytest.fixture(params=["default", "register_stores", "sa_smem"])
def gluon_variant(request, monkeypatch):
    """The PDL route as shipped (TMA stores of the grouped GEMMs' full blocks, ``GROUPED_TMA_STORE_UNDER_PDL``,
    on since session 9), with register stores only (the route before), and with A's scales through shared memory
    forced on (``FP8GEMM_GLUON_SA_SMEM``; the grouped calls' default leaves it off)."""
    from fp8gemm import runtime
    from fp8gemm.kernels import gemm_gluon as gg
    if request.param == "register_stores":
        monkeypatch.setattr(gg, "GROUPED_TMA_STORE_UNDER_PDL", False)
    if request.param == "sa_smem":
        monkeypatch.setattr(runtime, "gluon_sa_smem", lambda: True)
    gg._pick_config.cache_clear()     # picks made under another variant are not reused
    yield request.param
    gg._pick_config.cache_clear()


def _with_pdl(flag: bool, fn):
    old = fp8gemm.get_pdl()
    fp8gemm.set_pdl(flag)
    try:
        return fn()
    finally:
        fp8gemm.set_pdl(old)


@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 2048), (7168, 3072)])
def test_masked_fp4_pdl_equals_no_pdl(n, k, monkeypatch, gluon_variant):
    monkeypatch.delenv("FP8GEMM_BACKEND", raising=False)
    g, max_m, expected = 6, 256, 20
    codes, sbytes, b, sfb, masked_m, d = _masked_problem(g, max_m, n, k, expected)
    kind, _ = gemm_dispatch._plan("masked", codes, sbytes, b, sfb, d, None, expected, 128, 256, None)
    assert kind == "fp4-gluon"

    def call():
        d.fill_(float("nan"))
        fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes), (b, sfb), d, masked_m, expected)
        return d.clone()
    got = _pdl_on_equals_off(call, codes, sbytes, range(1, 4), "PDL vs no PDL")
    ref = R.m_grouped_fp8_gemm_nt_masked(codes, sbytes, b, sfb, masked_m, torch.zeros_like(d))
    for i, c in enumerate(masked_m.tolist()):
        if c:
            assert calc_diff(got[i, :c], ref[i, :c]) < 1e-3
        assert got[i, c:].isnan().all()


def test_masked_fp4_pdl_in_cuda_graph_reads_each_replays_operand(monkeypatch):
    """Captured with PDL (a programmatic graph edge): each replay, on new inputs written into the same buffers,
    equals the eager call without PDL on those inputs, also with the SBO signal on."""
    monkeypatch.delenv("FP8GEMM_BACKEND", raising=False)
    g, max_m, n, k, expected = 6, 256, 4096, 2048, 20
    codes, sbytes, b, sfb, masked_m, d = _masked_problem(g, max_m, n, k, expected)
    signal = fp8gemm.alloc_signal(g, max_m, "cuda")

    def call():
        signal.zero_()
        return fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes), (b, sfb), d, masked_m, expected,
                                                    enable_overlap=True, signal=signal)
    monkeypatch.setattr(runtime, "_pdl", True)          # PDL on whatever an earlier test left
    block_m, threshold = call()                  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for seed in range(10, 16):
        _new_fp4(codes, sbytes, seed)
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        got = d.clone()
        check_signal(signal, masked_m, max_m, n, block_m, threshold)
        d.fill_(float("nan"))
        _with_pdl(False, call)
        _same_bits(got, d, f"graph replay with PDL vs eager without, inputs {seed}")


def test_contiguous_fp4_pdl_equals_no_pdl(monkeypatch, gluon_variant):
    monkeypatch.delenv("FP8GEMM_BACKEND", raising=False)
    n, k = 2048, 4096
    ids = []
    for e, r in enumerate([200, 0, 57, 300]):
        ids += [e] * r + [-1] * ((-r) % 128)
    m_indices = torch.tensor(ids, dtype=torch.int32, device="cuda")
    codes = torch.empty(len(ids), k // 2, dtype=torch.uint8, device="cuda")
    sbytes = torch.empty(len(ids), k // 32, dtype=torch.uint8, device="cuda")
    b = torch.randn(4, n, k, device="cuda").to(FP8)
    sfb = torch.rand(4, n // 128, k // 128, device="cuda") + 0.5
    d = torch.empty(len(ids), n, dtype=torch.bfloat16, device="cuda")

    def call():
        d.fill_(float("nan"))
        fp8gemm.m_grouped_fp8_gemm_nt_contiguous((codes, sbytes), (b, sfb), d, m_indices)
        return d.clone()
    got = _pdl_on_equals_off(call, codes, sbytes, range(20, 23), "contiguous")
    ok = m_indices >= 0
    ref = R.m_grouped_fp8_gemm_nt_contiguous(codes, sbytes, b, sfb, m_indices, torch.zeros_like(d))
    assert calc_diff(got[ok], ref[ok]) < 1e-3 and got[~ok].isnan().all()


@pytest.mark.parametrize("graph", [False, True])
def test_gemm_pdl_launch_without_a_triggering_kernel(graph):
    """``launch(..., pdl=True)`` after ordinary work (no early trigger): the same bits as a normal launch."""
    from fp8gemm.kernels import gemm_gluon as gg
    g, max_m, n, k = 4, 128, 1024, 1024
    a = torch.randn(g, max_m, k, device="cuda").to(FP8)
    sfa = torch.rand(g, max_m, k // 128, device="cuda") + 0.5
    b = torch.randn(g, n, k, device="cuda").to(FP8)
    sfb = torch.rand(g, n // 128, k // 128, device="cuda") + 0.5
    masked_m = torch.tensor([5, 0, 128, 77], dtype=torch.int32, device="cuda")
    d_ref = torch.full((g, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    d = torch.full_like(d_ref, float("nan"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert gg.supports("masked", a, sfa, b, sfb, d)
    gg.launch("masked", a, sfa, b, sfb, d_ref, masked_m=masked_m, expected_m=64, num_sms=sms)

    def call():
        sfa.mul_(1.0)          # an ordinary kernel right before, writing the A scales
        gg.launch("masked", a, sfa, b, sfb, d, masked_m=masked_m, expected_m=64, num_sms=sms, pdl=True)
    call()
    if graph:
        d.fill_(float("nan"))
        cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cg):
            call()
        cg.replay()
    torch.cuda.synchronize()
    _same_bits(d, d_ref, "pdl launch without a trigger")


@pytest.mark.gpu
@pytest.mark.sm90
def test_set_pdl_false_launches_without_pdl(monkeypatch):
    """``fp8gemm.set_pdl(False)`` (DeepGEMM's switch): the FP4 route's GEMM is launched without PDL, and the
    result is the same."""
    from fp8gemm.kernels import gemm_gluon as gg
    monkeypatch.delenv("FP8GEMM_BACKEND", raising=False)
    codes, sbytes, b, sfb, masked_m, d = _masked_problem(6, 256, 4096, 2048, 20)
    seen = []
    real = gg.launch
    monkeypatch.setattr(gg, "launch", lambda *args, **kw: seen.append(kw.get("pdl")) or real(*args, **kw))
    outs = []
    try:
        for flag in (True, False):
            fp8gemm.set_pdl(flag)
            d.fill_(float("nan"))
            fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes), (b, sfb), d, masked_m, 20)
            outs.append(d.clone())
    finally:
        fp8gemm.set_pdl(True)
    assert seen == [True, False]
    for i, c in enumerate(masked_m.tolist()):
        assert torch.equal(outs[0][i, :c], outs[1][i, :c])
