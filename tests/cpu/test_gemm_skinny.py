"""The split-K swap-A/B kernel of dense FP8 GEMMs with few rows (``fp8gemm.kernels.gemm_skinny``), in the
interpreter on CPU and compiled on a GPU: against the reference for every split (uneven ones included),
both tile widths, partial column blocks, BF16 and FP32 outputs, strided scales, repeated calls (the
split-K counters must come back to zero), and the dispatch that routes small dense calls to it."""
import math

import pytest
import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm.kernels import gemm_dispatch
from fp8gemm.kernels import gemm_skinny as KS
from fp8gemm.testing import calc_diff, poison_

FP8 = torch.float8_e4m3fn


def case(m, n, k, device, mn_major_sfa=False):
    a = torch.randn(m, k, device=device).to(FP8)
    b = torch.randn(n, k, device=device).to(FP8)
    sfa = torch.rand(m, k // 128, device=device) * 1.5 + 0.25
    if mn_major_sfa:
        sfa = sfa.t().contiguous().t()
    sfb = torch.rand(math.ceil(n / 128), k // 128, device=device) * 1.5 + 0.25
    return a, sfa, b, sfb


@pytest.mark.parametrize("m,n,k,block_n,split", [(1, 200, 1024, 64, 3), (5, 130, 512, 128, 4), (16, 64, 384, 64, 1),
                                                  (16, 192, 1024, 64, 8), (9, 70, 640, 128, 2), (40, 130, 512, 64, 3),
                                                  (128, 64, 256, 64, 2), (100, 130, 512, 64, 2), (70, 64, 256, 128, 1)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_skinny_kernel_matches_reference(m, n, k, block_n, split, out_dtype, device):
    a, sfa, b, sfb = case(m, n, k, device, mn_major_sfa=m % 2 == 1)
    want = R.fp8_gemm_nt(a.cpu(), sfa.cpu(), b.cpu(), sfb.cpu(), out_dtype=out_dtype)
    for _ in range(2):                       # the second call relies on the counters left at zero
        d = poison_(torch.empty(m, n, dtype=out_dtype, device=device))
        cfg = KS.SkinnyConfig(block_n=block_n, block_m=min(64, max(16, 1 << (m - 1).bit_length())), split=split)
        used = KS.launch(a, sfa, b, sfb, d, 132, cfg)
        assert not d.isnan().any(), "an output element was not written"
        assert calc_diff(d.cpu(), want) < 1e-3
    assert used.split == math.ceil(k // 128 / math.ceil(k // 128 / split))
    if used.split > 1:
        assert int(KS._counters(a.device, 1).count_nonzero()) == 0, "split-K counters not reset"


def test_dense_small_m_takes_the_skinny_kernel(device, monkeypatch):
    from fp8gemm import runtime
    monkeypatch.setattr(runtime, "get_num_sms", lambda: 132)     # the rule's SM count (the interpreter has few)
    monkeypatch.delenv("FP8GEMM_BACKEND", raising=False)
    a, sfa, b, sfb = case(3, 256, 1024, device)
    calls = []
    real = KS.launch
    monkeypatch.setattr(KS, "launch", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    d = poison_(torch.empty(3, 256, dtype=torch.bfloat16, device=device))
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    assert calls, "a dense call with 3 rows did not take the skinny kernel"
    assert calc_diff(d.cpu(), R.fp8_gemm_nt(a.cpu(), sfa.cpu(), b.cpu(), sfb.cpu())) < 1e-3
    calls.clear()
    monkeypatch.setattr(gemm_dispatch, "SKINNY_MAX_M", 0)
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    assert not calls, "SKINNY_MAX_M = 0 still took the skinny kernel"


def test_skinny_plan_fills_the_sms():
    cfg = KS.plan(1, 2112, 7168, 132)
    assert cfg.block_n == 64 and cfg.split == 7              # 33 column blocks x 7 ~ two programs an SM
    assert KS.plan(1, 7168, 2048, 132).split == 1            # short K: one program an SM at most
    assert KS.plan(1, 7168, 16384, 132).split == 2
    assert KS.plan(1, 32768, 512, 132).num_stages == 4
    assert KS.pays(1, 7168, 2048, 132) and KS.pays(16, 2112, 7168, 132) and not KS.pays(4, 7168, 2048, 132)
    assert KS.pays(32, 576, 7168, 132) and not KS.pays(64, 576, 7168, 132) and not KS.pays(128, 576, 7168, 132)
    assert KS.plan(64, 2112, 7168, 132).num_stages == 4
    assert KS.plan(1, 32768, 512, 132).split == 1            # 512 column blocks already
    assert KS.plan(1, 64, 512, 132).split == 1               # at least four slices a program
    with pytest.raises(ValueError, match="block_m 16, 32, 64 or 128"):
        KS.launch(*case(20, 64, 128, "cpu"), torch.empty(20, 64), 132, KS.SkinnyConfig(block_m=48))
    assert KS.plan(40, 2112, 7168, 132).block_m == 64 and KS.plan(128, 2112, 7168, 132).block_m == 64


@pytest.mark.parametrize("split", [1, 4])
def test_skinny_kernel_compiles_sm90(split):
    """sm_90a: the swap-A/B tile runs on the tensor cores (QGMMA), its loads are pipelined (cp.async, LDGSTS),
    no local memory; the split-K build has its counter atomic."""
    from fp8gemm.testing import compile_sm90_in_subprocess, sass_count
    ints = ["M", "N", "K", "stride_am", "stride_bn", "stride_dm", "stride_sam", "stride_sak", "stride_sbn",
            "stride_sbk", "slices_per_split"]
    sig = {"a_ptr": "*fp8e4nv", "sfa_ptr": "*fp32", "b_ptr": "*fp8e4nv", "sfb_ptr": "*fp32", "d_ptr": "*bf16",
           "ws_ptr": "*fp32", "cnt_ptr": "*i32", **{n: "i32" for n in ints}}
    res = compile_sm90_in_subprocess(
        "fp8gemm.kernels.gemm_skinny", "skinny_gemm_kernel", sig,
        dict(stride_ak=1, stride_bk=1, stride_dn=1, BLOCK_N=64, BLOCK_M=16, SPLIT=split), num_warps=4,
        num_stages=KS.SkinnyConfig().num_stages,
        divisible_by_16=["a_ptr", "b_ptr", "d_ptr", "ws_ptr", "K", "stride_am", "stride_bn", "stride_dm"])
    sass = res["sass"]
    assert res["local"] == 0 and res["stack"] == 0
    assert sass_count(sass, "QGMMA") > 0, "no FP8 tensor-core MMA"
    assert sass_count(sass, "LDGSTS") > 0, "loads not pipelined through cp.async"
    assert (sass_count(sass, "ATOMG") > 0) == (split > 1)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64, 128])
@pytest.mark.parametrize("n,k", [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168),
                                 (7168, 2048)])
def test_small_m_deepseek_shapes_on_gpu(m, n, k, monkeypatch):
    """The DeepSeek dense shapes at decode sizes through the public API: against the reference, on the kernel
    ``gemm_skinny.pays`` names (spied), twice (the split-K counters are reused)."""
    from fp8gemm import runtime
    a, sfa, b, sfb = case(m, n, k, "cuda", mn_major_sfa=True)
    monkeypatch.delenv("FP8GEMM_BACKEND", raising=False)
    calls = []
    real = KS.launch
    monkeypatch.setattr(KS, "launch", lambda *args, **kw: calls.append(args[-1]) or real(*args, **kw))
    want = R.fp8_gemm_nt(a, sfa, b, sfb)
    for _ in range(2):
        d = poison_(torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))
        fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
        assert not d.isnan().any()
        assert calc_diff(d, want) < 1e-3
    expect = KS.pays(m, n, k, runtime.get_num_sms())
    assert bool(calls) == expect, f"skinny kernel used: {bool(calls)}, expected {expect}"


@pytest.mark.gpu
def test_skinny_split_k_in_cuda_graph():
    """Captured in a CUDA graph (workspace and counters from the capture) and replayed on new inputs."""
    a, sfa, b, sfb = case(2, 2112, 7168, "cuda")
    d = torch.empty(2, 2112, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)                 # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    for _ in range(3):
        a.copy_(torch.randn_like(a, dtype=torch.float32).to(FP8))
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb)) < 1e-3


@pytest.mark.gpu
def test_two_graphs_replayed_at_once_on_two_streams():
    """Two captured split-K calls replayed concurrently on two streams (as a two-batch-overlap engine does) and
    an eager call on a third: each captured call has its own counters, so all three results are right."""
    shapes = [(1, 2112, 7168), (4, 576, 7168)]
    ops = [case(*s, "cuda") for s in shapes]
    outs = [torch.empty(s[0], s[1], dtype=torch.bfloat16, device="cuda") for s in shapes]
    graphs = []
    for (a, sfa, b, sfb), d in zip(ops, outs):
        fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)                 # compile outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
        graphs.append(g)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    a3, sfa3, b3, sfb3 = case(2, 2112, 7168, "cuda")
    d3 = torch.empty(2, 2112, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    for _ in range(5):
        for d in outs + [d3]:
            d.fill_(float("nan"))
        torch.cuda.synchronize()
        for g, s in zip(graphs, streams):
            with torch.cuda.stream(s):
                g.replay()
        fp8gemm.fp8_gemm_nt((a3, sfa3), (b3, sfb3), d3)
        torch.cuda.synchronize()
        for (a, sfa, b, sfb), d in zip(ops, outs):
            assert calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb)) < 1e-3
        assert calc_diff(d3, R.fp8_gemm_nt(a3, sfa3, b3, sfb3)) < 1e-3
