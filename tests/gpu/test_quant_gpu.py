"""Quantisation kernels on the GPU: byte-exact against the reference at realistic shapes.

The GPU path uses the hardware E4M3 conversion (the interpreter uses a software one), so these tests are
what pins the hardware path to the reference.  The reference runs on the CPU, in row slices (multiples of
128 rows, so block and channel scales slice cleanly).
"""
import math

import pytest
import torch

import fp8gemm
from fp8gemm import reference as R

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.uint8)


def assert_same_bytes(got, want, what):
    got = got.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape}/{got.dtype} vs {want.shape}"
    bad = int((_bits(got) != _bits(want)).sum())
    assert bad == 0, f"{what}: {bad} of {got.numel()} elements differ"


def reference_sliced(ref, x, rows=1024, **kw):
    """The reference on the CPU, ``rows`` rows at a time, codes and scales concatenated."""
    qs, sfs = [], []
    for lo in range(0, x.shape[0], rows):
        q, sf = ref(x[lo:lo + rows].cpu(), **kw)
        qs.append(q)
        sfs.append(sf)
    return torch.cat(qs), torch.cat(sfs)


def realistic(m, k, dtype=torch.bfloat16, specials=True):
    x = torch.randn(m, k, device="cuda", dtype=torch.float32) * torch.logspace(-3, 3, m, device="cuda")[:, None]
    if specials:
        x[7] = 0.0
        x[11, 300] = float("nan")
        x[13, k - 1] = float("inf")
        x[17, 5] = float("-inf")
        x[19, :64] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("name", ["per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_channel_cast_to_fp8"])
def test_fp8_casts_8192x7168_bf16(name, use_ue8m0):
    x = realistic(8192, 7168)
    q, sf = getattr(fp8gemm, name)(x, use_ue8m0)
    rq, rsf = reference_sliced(getattr(R, name), x, use_ue8m0=use_ue8m0)
    assert_same_bytes(q, rq, f"{name} codes")
    assert_same_bytes(sf, rsf, f"{name} scales")


@pytest.mark.parametrize("name", ["per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_channel_cast_to_fp8"])
@pytest.mark.parametrize("dtype,m,k", [(torch.float32, 2048, 7168), (torch.bfloat16, 4097, 7000),
                                       (torch.bfloat16, 300, 1536)])
def test_fp8_casts_other_shapes(name, dtype, m, k):
    x = realistic(m, k, dtype)
    for use_ue8m0 in (False, True):
        q, sf = getattr(fp8gemm, name)(x, use_ue8m0)
        rq, rsf = reference_sliced(getattr(R, name), x, use_ue8m0=use_ue8m0)
        assert_same_bytes(q, rq, f"{name} codes")
        assert_same_bytes(sf, rsf, f"{name} scales")


@pytest.mark.parametrize("name", ["per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_channel_cast_to_fp8"])
def test_fp8_scales_over_the_whole_exponent_range(name):
    """Group amaxes from 2^-140 to 2^127 (FP32 input), so the scale arithmetic (the per-channel cast's
    division-free path included) meets every binade, the 1e-4 floor and subnormal inputs."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    m, k = 1024, 4096
    e = torch.randint(-140, 127, (1, k), device="cuda", generator=gen).float()
    x = torch.randn(m, k, device="cuda", generator=gen) * torch.exp2(e)
    x = x * torch.exp2(torch.randint(-3, 1, (m, 1), device="cuda", generator=gen).float())
    x[:, :8] = torch.rand(m, 8, device="cuda", generator=gen) * 1e-4 * 448.0     # near the floor
    x[3, 9] = float("inf")
    x[5, 10] = float("nan")
    for use_ue8m0 in (False, True):
        q, sf = getattr(fp8gemm, name)(x, use_ue8m0)
        rq, rsf = reference_sliced(getattr(R, name), x, use_ue8m0=use_ue8m0)
        assert_same_bytes(q, rq, f"{name} codes")
        assert_same_bytes(sf, rsf, f"{name} scales")


@pytest.mark.parametrize("m,k,gran_k", [(4096, 7168, 32), (1000, 2050, 128), (513, 7168, 16)])
def test_fp4_cast(m, k, gran_k):
    x = realistic(m, k)
    q, sf = fp8gemm.per_token_cast_to_fp4(x, gran_k=gran_k, ue8m0_bytes=True)
    rq, rsf = reference_sliced(R.per_token_cast_to_fp4, x, rows=256, gran_k=gran_k, ue8m0_bytes=True)
    assert_same_bytes(q, rq, "fp4 codes")
    assert_same_bytes(sf, rsf, "fp4 scale bytes")
    q2, sf2 = fp8gemm.per_token_cast_to_fp4(x[:256], use_ue8m0=False, gran_k=gran_k)
    rq2, rsf2 = R.per_token_cast_to_fp4(x[:256].cpu(), use_ue8m0=False, gran_k=gran_k)
    assert_same_bytes(q2, rq2, "fp4 codes (fp32 scales)")
    assert_same_bytes(sf2, rsf2, "fp4 fp32 scales")


def test_e4m3_rounding_every_value_and_tie():
    vals = torch.arange(0, 0x7F, dtype=torch.uint8).view(FP8).float()
    mids = (vals[1:] + vals[:-1]) / 2
    row = torch.cat([vals, mids, torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(0.0))])
    row = torch.cat([row, -row])
    groups = [torch.cat([c, torch.zeros(127 - c.numel()), torch.tensor([448.0])]) for c in row.split(127)]
    x = torch.cat(groups)[None, :].cuda()
    q, sf = fp8gemm.per_token_cast_to_fp8(x)
    assert (sf == 1.0).all()
    assert_same_bytes(q, x.cpu().to(FP8), "hardware E4M3 rounding vs torch's cast")


def test_casts_capture_in_cuda_graph():
    x = realistic(512, 7168, specials=False)
    fp8gemm.per_token_cast_to_fp8(x, True)    # compile (and load the module) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, sf = fp8gemm.per_token_cast_to_fp8(x, True)
    x.copy_(realistic(512, 7168, specials=False))
    graph.replay()
    torch.cuda.synchronize()
    rq, rsf = R.per_token_cast_to_fp8(x.cpu(), True)
    assert_same_bytes(q, rq, "codes after graph replay")
    assert_same_bytes(sf, rsf, "scales after graph replay")


def test_scale_layout_helpers_on_gpu():
    sf = torch.rand(37, 56, device="cuda")
    out = fp8gemm.transform_sf_into_required_layout(sf, 37, 7168, (1, 128, 128), is_sfa=True)
    assert out.stride() == (1, 40) and torch.equal(out, sf)
    assert fp8gemm.get_mn_major_tma_aligned_tensor(out) is out
    p = fp8gemm.pack_ue8m0_to_int(fp8gemm.ceil_to_ue8m0(sf))
    assert p.shape == (37, math.ceil(56 / 4))
    assert torch.equal(R.unpack_ue8m0_from_int(p.cpu(), 56), R.ceil_to_ue8m0(sf.cpu()))


@pytest.mark.parametrize("cfg", [(64, 8, 16, 1, 4), (64, 8, 4, 4, 4), (64, 8, 32, 1, 8), (128, 16, 16, 1, 4),
                                 (64, 4, 8, 1, 4)])
def test_per_channel_gluon_tiles_and_triton_twin(cfg, monkeypatch):
    """Each Gluon per-channel tile (warps along the columns, along the rows, mixed) and, with
    ``FP8GEMM_BACKEND=triton``, the Triton kernel on the GPU: both byte-exact, on a strided odd-shaped
    input (partial bands and column blocks) and the default path checked to be the Gluon kernel."""
    from fp8gemm.kernels import quant as KQ
    from fp8gemm.kernels import quant_gluon as KQG
    if not KQG.supports(torch.empty(1, device="cuda")):
        pytest.skip("the Gluon per-channel kernel needs an SM90 GPU")
    base = realistic(1100, 3001)
    x = base[:, 1:]                                   # row stride 3001: unaligned rows, columns 3000
    rq, rsf = reference_sliced(R.per_channel_cast_to_fp8, x, rows=1152, use_ue8m0=True)
    q = torch.empty(x.shape, dtype=FP8, device="cuda")
    sf = torch.empty(math.ceil(x.shape[0] / 128), x.shape[1], device="cuda")
    cfg = KQG.PerChannelConfig(*cfg)
    KQ.launch_per_channel(x, q, sf, 128, True, False, config=cfg)
    assert_same_bytes(q, rq, f"gluon {cfg} codes")
    assert_same_bytes(sf, rsf, f"gluon {cfg} scales")
    launched = []
    real = KQG.launch_per_channel
    monkeypatch.setattr(KQG, "launch_per_channel", lambda *a, **k: launched.append(1) or real(*a, **k))
    q2, sf2 = fp8gemm.per_channel_cast_to_fp8(x, True)
    assert launched, "the default per-channel cast did not take the Gluon kernel on SM90"
    assert_same_bytes(q2, rq, "default codes")
    monkeypatch.setenv("FP8GEMM_BACKEND", "triton")
    launched.clear()
    q3, sf3 = fp8gemm.per_channel_cast_to_fp8(x, True)
    assert not launched, "FP8GEMM_BACKEND=triton still took the Gluon kernel"
    assert_same_bytes(q3, rq, "triton codes")
    assert_same_bytes(sf3, rsf, "triton scales")
