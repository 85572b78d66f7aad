"""MoE activation path on the GPU at DeepSeek shapes (4096 tokens, hidden 7168, top-8), byte-exact against
the reference (computed on the CPU), including the FMA-sensitive combine rounding and CUDA-graph capture."""
import pytest
import torch

from fp8gemm import reference as R
from fp8gemm.moe import combine_reduce, mega_moe_pre_dispatch, quantize_combine_payload
from fp8gemm.testing import bit_view

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
