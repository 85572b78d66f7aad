"""Quantisation helpers: reference semantics (hand-checked), the Triton kernels against the reference
byte for byte (the interpreter on CPU), argument validation, scale layouts, and an sm_90a compile.

Reference: the "Scale factors and quantisation" section of fp8gemm.reference.
"""
import math
import os

import pytest
import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm.kernels import quant as KQ
from fp8gemm.testing import sass_wide_loads

FP8 = torch.float8_e4m3fn
NAN_BITS = 0x7FC00000

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def f32(*values):
    return torch.tensor(values, dtype=torch.float32)


def bits(t):
    """Tensor bytes as comparable integers (NaNs compare by their bits)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t.view(torch.uint8)


def assert_same_bytes(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    g, w = bits(got.contiguous()), bits(want.contiguous())
    bad = (g != w).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.shape[0]} of {g.numel()} elements differ, first at "
                              f"{bad[0].tolist()}: {g[tuple(bad[0])].item():#x} != {w[tuple(bad[0])].item():#x}")


# =====================================================================================
# Reference semantics, hand-checked
# =====================================================================================

def test_ceil_to_ue8m0_values():
    big = 2.0 ** 100 * (1 + 2.0 ** -23)      # log2 of this rounds to exactly 100 in FP32
    x = f32(1.0, 1.0000001, 0.75, 3.0, -5.0, 2.0 ** -20, big, 2.0 ** 127, 3.0e38, 0.0, 2.0 ** -130,
            float("inf"), float("-inf"))
    want = f32(1.0, 2.0, 1.0, 4.0, 8.0, 2.0 ** -20, 2.0 ** 101, 2.0 ** 127, float("inf"), 0.0, 2.0 ** -126,
               float("inf"), float("inf"))
    assert torch.equal(R.ceil_to_ue8m0(x), want)
    assert torch.equal(fp8gemm.ceil_to_ue8m0(x), want)
    nan = fp8gemm.ceil_to_ue8m0(f32(float("nan"), -float("nan")))
    assert bits(nan).tolist() == [NAN_BITS, NAN_BITS]
    # bf16 input is accepted and gives FP32
    assert torch.equal(fp8gemm.ceil_to_ue8m0(torch.tensor([3.0], dtype=torch.bfloat16)), f32(4.0))


def test_ceil_to_ue8m0_is_smallest_power_of_two_above():
    x = torch.rand(10000) * torch.pow(2.0, torch.randint(-60, 60, (10000,)).float())
    y = R.ceil_to_ue8m0(x)
    assert (y >= x).all() and (y / 2 < x).all()
    assert ((y.view(torch.int32) & 0x7FFFFF) == 0).all()


def test_per_token_reference_known_row():
    # The expected scales below divide on the CPU (IEEE division, the reference's definition); on
    # CUDA, PyTorch divides by a Python scalar through its reciprocal.
    with torch.device("cpu"):
        _per_token_reference_known_row()


def _per_token_reference_known_row():
    # amax 896 -> sf = 2 exactly, codes are x / 2; second group is partial (2 columns), amax 3.
    x = torch.zeros(2, 130)
    x[0, :4] = f32(896.0, -448.0, 1.0, -0.0)
    x[0, 128:] = f32(3.0, -1.5)
    q, sf = R.per_token_cast_to_fp8(x)
    assert sf.shape == (2, 2)
    assert sf[0, 0].item() == 2.0
    assert torch.equal(q[0, :4].float(), f32(448.0, -224.0, 0.5, -0.0))
    assert q[0, 3].view(torch.uint8).item() == 0x80, "negative zero keeps its sign"
    assert sf[0, 1] == torch.tensor(3.0) / 448
    assert q[0, 128].float().item() == 448.0 and q[0, 129].float().item() == -224.0
    # the all-zero row: scale from the 1e-4 clamp, zero codes
    assert sf[1, 0] == torch.tensor(1e-4) / 448
    assert (q[1].view(torch.uint8) == 0).all()


def test_per_token_reference_ue8m0_and_reciprocal():
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1] = 500.0, 0.3
    q, sf = R.per_token_cast_to_fp8(x, use_ue8m0=True)
    assert sf.item() == 2.0                           # 500 / 448 = 1.116 -> 2
    assert q[0, 0].float().item() == 256.0            # 250 rounds to 256 (3 mantissa bits)
    assert q[0, 1].float().item() == torch.tensor(0.15).to(FP8).float().item()
    # Without UE8M0 the codes are x * (1 / sf): 1 / sf is rounded once, then multiplied.
    x = torch.randn(3, 256)
    q, sf = R.per_token_cast_to_fp8(x)
    inv = (1.0 / sf).repeat_interleave(128, 1)
    assert_same_bytes(q, (x * inv).to(FP8), "x * (1/sf)")


def test_per_block_and_per_channel_reference():
    x = torch.zeros(130, 200)
    x[5, 7] = 896.0                   # block (0, 0)
    x[129, 199] = -8.0                # block (1, 1): partial in both directions
    q, sf = R.per_block_cast_to_fp8(x)
    assert sf.shape == (2, 2)
    assert sf[0, 0].item() == 2.0 and sf[1, 1] == torch.tensor(8.0) / 448
    assert sf[0, 1] == torch.tensor(1e-4) / 448
    assert q[5, 7].float().item() == 448.0 and q[129, 199].float().item() == -448.0
    qc, sfc = R.per_channel_cast_to_fp8(x)
    assert sfc.shape == (2, 200)
    assert sfc[0, 7].item() == 2.0 and sfc[1, 199] == torch.tensor(8.0) / 448
    assert qc[5, 7].float().item() == 448.0


def test_fp8_round_trip_error_bound():
    x = torch.randn(64, 384) * torch.logspace(-3, 3, 384)
    for fn in (R.per_token_cast_to_fp8, R.per_block_cast_to_fp8):
        for ue in (False, True):
            q, sf = fn(x, ue)
            rows = 1 if fn is R.per_token_cast_to_fp8 else 128
            s = R.expand_scales(sf, 64, 384, rows, 128)
            err = (q.float() * s - x).abs()
            # E4M3: half an ulp is 2^-4 relative for normals; 2^-10 * sf absolute in the subnormal range
            assert (err <= x.abs() * 2.0 ** -4 + s * 2.0 ** -10).all()


def test_nan_and_inf_reference_semantics():
    x = torch.randn(3, 256)
    x[0, 5] = float("nan")            # group (0, 0)
    x[1, 130] = float("-inf")         # group (1, 1)
    x[1, 131] = -2.0
    q, sf = R.per_token_cast_to_fp8(x)
    qb = q.view(torch.uint8)
    assert bits(sf)[0, 0].item() == NAN_BITS
    assert (qb[0, :128] == 0x7F).all(), "a NaN group is NaN throughout"
    assert torch.isinf(sf[1, 1]) and sf[1, 1] > 0
    assert qb[1, 130].item() == 0x7F, "inf * (1 / inf) is NaN"
    assert qb[1, 131].item() == 0x80, "finite elements of an inf group are (signed) zero"
    assert torch.isfinite(sf[0, 1]) and torch.isfinite(sf[1, 0]) and torch.isfinite(sf[2]).all()
    q2, sf2 = R.per_token_cast_to_fp8(x[2:])
    assert_same_bytes(q[2:], q2, "rows without inf/NaN are unaffected")


def test_e2m1_rounding_table():
    y = f32(0.0, 0.24, 0.25, 0.26, 0.5, 0.74, 0.75, 1.0, 1.25, 1.26, 1.5, 1.75, 2.0, 2.5, 2.51, 3.0,
            3.49, 3.5, 4.0, 5.0, 5.01, 6.0, 7.0, float("inf"), -0.1, -0.3, -6.0, -100.0, float("nan"), -0.0)
    want = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5,
            5, 6, 6, 6, 7, 7, 7, 7, 0, 9, 15, 15, 0, 0]
    assert R.e2m1_codes(y).tolist() == want
    table = torch.tensor(R.E2M1_VALUES)
    # Every code decodes to the nearest value (checked independently of the tie rule).
    z = torch.linspace(-7, 7, 2801)
    c = R.e2m1_codes(z).long()
    dec = table[c & 7] * torch.where(c >= 8, -1.0, 1.0)
    best = (z.clamp(-6, 6)[:, None].abs() - table).abs().min(1).values
    assert ((dec - z.clamp(-6, 6)).abs() <= best + 1e-7).all()


def test_fp4_reference_known_row_and_packing():
    x = torch.zeros(1, 64)
    x[0, :6] = f32(6.0, -0.5, 1.25, 3.5, 0.0, -6.0)   # group 0: amax 6 -> sf = 1 (exact power of two)
    x[0, 32] = 24.0                                     # group 1: amax 24 -> sf = 4
    x[0, 33] = 5.0                                      # 5 / 4 = 1.25 -> 1.0 (tie to even code 2)
    q, sf = R.per_token_cast_to_fp4(x)
    assert q.shape == (1, 32) and q.dtype == torch.uint8
    assert sf.tolist() == [[1.0, 4.0]]
    # bytes: (6 -> 7, -0.5 -> 9) -> 0x97; (1.25 -> 2, 3.5 -> 6) -> 0x62; (0 -> 0, -6 -> 15) -> 0xF0
    assert q[0, :3].tolist() == [0x97, 0x62, 0xF0]
    assert q[0, 16].item() == (7 | (2 << 4))
    _, sfb = R.per_token_cast_to_fp4(x, ue8m0_bytes=True)
    assert sfb.tolist() == [[127, 129]]
    # dequantised values agree with the grouped GEMM's FP4 decoder
    deq = R.dequantize_fp4(q, sfb)
    assert deq[0, :6].tolist() == [6.0, -0.5, 1.0, 4.0, 0.0, -6.0]
    # without UE8M0 the scale is amax / 6 itself
    _, sf_plain = R.per_token_cast_to_fp4(x, use_ue8m0=False)
    assert sf_plain[0, 1] == torch.tensor(24.0) / 6


def test_pack_ue8m0_to_int_layout():
    sf = f32(1.0, 2.0, 0.5, 2.0 ** -126, 2.0 ** 127).reshape(1, 5)
    packed = fp8gemm.pack_ue8m0_to_int(sf)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert packed[0, 0].item() == 127 | (128 << 8) | (126 << 16) | (1 << 24)
    assert packed[0, 1].item() == 254, "missing bytes of the last word are 0"
    assert torch.equal(R.unpack_ue8m0_from_int(packed, 5), sf)
    # a word whose top byte is >= 128 is a negative int32, and still round-trips
    sf = torch.full((3, 8), 2.0 ** 10)
    p = fp8gemm.pack_ue8m0_to_int(sf)
    assert (p < 0).all() and torch.equal(R.unpack_ue8m0_from_int(p, 8), sf)
    x = R.ceil_to_ue8m0(torch.rand(4, 3, 13) * 100 + 1e-3)
    assert torch.equal(R.unpack_ue8m0_from_int(fp8gemm.pack_ue8m0_to_int(x), 13), x)


# =====================================================================================
# Kernels against the reference, byte for byte (interpreter)
# =====================================================================================

def special_input(m, k, dtype, seed_scale=3.0):
    """randn with a zero row, a NaN, an inf, negative zeros and a wide dynamic range across rows."""
    x = torch.randn(m, k) * seed_scale * torch.logspace(-2, 2, m)[:, None]
    if m > 3:
        x[1] = 0.0
        x[2, k // 2] = float("nan")
        x[3, k - 1] = float("-inf")
        x[3, 0] = float("inf")
    x[0, : min(5, k)] = -0.0
    return x.to(dtype)


CASTS_FP8 = ["per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_channel_cast_to_fp8"]


@pytest.mark.parametrize("name", CASTS_FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("m,k", [(37, 300), (1, 128), (130, 260)])
def test_fp8_casts_match_reference(name, dtype, use_ue8m0, m, k, device):
    x = special_input(m, k, dtype).to(device)
    q, sf = getattr(fp8gemm, name)(x, use_ue8m0)
    rq, rsf = getattr(R, name)(x.cpu(), use_ue8m0)
    assert_same_bytes(q.cpu(), rq, f"{name} codes")
    assert_same_bytes(sf.cpu(), rsf, f"{name} scales")
    assert q.is_contiguous() and sf.is_contiguous()


@pytest.mark.parametrize("name", CASTS_FP8)
@pytest.mark.parametrize("gran_k", [32, 64])
def test_fp8_casts_other_granularities(name, gran_k, device):
    x = special_input(45, 200, torch.bfloat16).to(device)
    q, sf = getattr(fp8gemm, name)(x, True, gran_k)
    rq, rsf = getattr(R, name)(x.cpu(), True, gran_k)
    assert_same_bytes(q.cpu(), rq, "codes")
    assert_same_bytes(sf.cpu(), rsf, "scales")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_ue8m0,ue8m0_bytes", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("m,k,gran_k", [(37, 300, 32), (5, 64, 16), (9, 260, 128), (3, 98, 64)])
def test_fp4_cast_matches_reference(dtype, use_ue8m0, ue8m0_bytes, m, k, gran_k, device):
    x = special_input(m, k, dtype).to(device)
    q, sf = fp8gemm.per_token_cast_to_fp4(x, use_ue8m0, gran_k, ue8m0_bytes=ue8m0_bytes)
    rq, rsf = R.per_token_cast_to_fp4(x.cpu(), use_ue8m0, gran_k, ue8m0_bytes=ue8m0_bytes)
    assert_same_bytes(q.cpu(), rq, "packed codes")
    assert_same_bytes(sf.cpu(), rsf, "scales")


def one_scale_rows(values, group, top):
    """``values`` laid out in groups of ``group`` that each also hold ``top`` (so every amax is ``top``)."""
    chunks = []
    for chunk in values.split(group - 1):
        g = torch.zeros(group)
        g[:chunk.numel()] = chunk
        g[-1] = top
        chunks.append(g)
    return torch.cat(chunks)[None, :]


def test_e4m3_rounding_exhaustive(device):
    """Every E4M3 value, every midpoint between neighbours (ties) and their FP32 neighbours, through a
    row whose groups all have amax 448 (sf = 1, so the codes are the rounding itself)."""
    vals = torch.arange(0, 0x7F, dtype=torch.uint8).view(FP8).float()           # 0 .. 448
    mids = (vals[1:] + vals[:-1]) / 2
    up = torch.nextafter(mids, torch.tensor(float("inf")))
    down = torch.nextafter(mids, torch.tensor(0.0))
    row = torch.cat([vals, mids, up, down])
    row = torch.cat([row, -row])
    x = one_scale_rows(row, 128, 448.0).to(device)
    q, sf = fp8gemm.per_token_cast_to_fp8(x)
    assert (sf == 1.0).all()
    assert_same_bytes(q.cpu(), x.cpu().to(FP8), "E4M3 rounding vs torch's cast")


def test_e2m1_rounding_exhaustive(device):
    """Ties and near-ties of every E2M1 step through a row with amax 6 (sf = 1)."""
    table = torch.tensor(R.E2M1_VALUES)
    mids = (table[1:] + table[:-1]) / 2
    pts = torch.cat([table, mids, torch.nextafter(mids, torch.tensor(9.0)), torch.nextafter(mids, torch.tensor(0.0))])
    pts = torch.cat([pts, -pts])
    x = one_scale_rows(pts, 32, 6.0).to(device)
    q, sf = fp8gemm.per_token_cast_to_fp4(x)
    rq, _ = R.per_token_cast_to_fp4(x.cpu())
    assert (sf == 1.0).all()
    assert_same_bytes(q.cpu(), rq, "E2M1 rounding")


def test_strided_input(device):
    base = torch.randn(80, 2 * 200, dtype=torch.bfloat16, device=device)
    x = base[::2, ::2]                                    # non-unit strides in both dims
    for name in CASTS_FP8:
        q, sf = getattr(fp8gemm, name)(x)
        rq, rsf = getattr(R, name)(x.cpu())
        assert_same_bytes(q.cpu(), rq, f"{name} codes (strided input)")
        assert_same_bytes(sf.cpu(), rsf, f"{name} scales (strided input)")
    xt = torch.randn(256, 40, device=device).t()          # column-major [40, 256]
    q, sf = fp8gemm.per_token_cast_to_fp4(xt)
    rq, rsf = R.per_token_cast_to_fp4(xt.cpu())
    assert_same_bytes(q.cpu(), rq, "fp4 codes (transposed input)")
    assert_same_bytes(sf.cpu(), rsf, "fp4 scales (transposed input)")


@pytest.mark.parametrize("poison,persistent_sms", [(0x5A, 0), (0xA5, 0), (0x5A, 1), (0xA5, 2)])
def test_kernels_write_everything_and_nothing_more(poison, persistent_sms, device, monkeypatch):
    """Small tiles force several programs along both axes; outputs sit inside poisoned guard buffers:
    every element must be written (two different poisons) and nothing around it.  With
    ``persistent_sms`` the per-token and per-block casts run their persistent kernels on that many
    programs, so each program walks several tiles (and the last prefetch is past the end)."""
    m, k = 21 if not persistent_sms else 300, 330
    x = special_input(m, k, torch.bfloat16).to(device)

    word = poison * 0x01010101
    word -= (word >= 2 ** 31) * 2 ** 32                  # the same four bytes as a signed int32

    def guarded(rows, cols, dtype):
        """A [rows, cols] output inside a poisoned [rows + 2, cols + 3] buffer (strided rows)."""
        if dtype == torch.float32:
            buf = torch.full((rows + 2, cols + 3), word, dtype=torch.int32, device=device)
            return buf, buf[1:rows + 1, 1:cols + 1].view(torch.float32)
        buf = torch.full((rows + 2, cols + 3), poison, dtype=torch.uint8, device=device)
        return buf, buf[1:rows + 1, 1:cols + 1]

    def check_guard(buf, what):
        inner = torch.zeros(buf.shape, dtype=torch.bool, device=buf.device)
        inner[1:-1, 1:-2] = True
        assert (buf[~inner] == (poison if buf.dtype == torch.uint8 else word)).all(), f"{what}: written outside"

    soft = True
    cases = [
        ("per_token", KQ.launch_per_token, (m, k), (m, math.ceil(k / 128)), (4, 1, 1), R.per_token_cast_to_fp8),
        ("per_block", KQ.launch_per_block, (m, k), (math.ceil(m / 128), math.ceil(k / 128)), (1, 4),
         R.per_block_cast_to_fp8),
        ("per_channel", KQ.launch_per_channel, (m, k), (math.ceil(m / 128), k), (32, 4), R.per_channel_cast_to_fp8),
    ]
    if persistent_sms:
        monkeypatch.setattr(KQ, "get_num_sms", lambda: persistent_sms)
        cases = [(name + " persistent", launch, qs, ss, cfg + (1,), ref) for name, launch, qs, ss, cfg, ref in cases[:2]]
    for name, launch, qshape, sfshape, config, ref in cases:
        qbuf, q = guarded(*qshape, torch.uint8)
        sbuf, sf = guarded(*sfshape, torch.float32)
        launch(x, q.view(FP8), sf, 128, True, soft, config=config)
        rq, rsf = ref(x.cpu(), True)
        assert_same_bytes(q.view(FP8).cpu(), rq, f"{name} codes")
        assert_same_bytes(sf.cpu(), rsf, f"{name} scales")
        check_guard(qbuf, f"{name} codes")
        check_guard(sbuf, f"{name} scales")
    qbuf, q = guarded(m, k // 2, torch.uint8)
    sbuf, sf = guarded(m, math.ceil(k / 32), torch.uint8)
    KQ.launch_per_token_fp4(x, q, sf, 32, True, config=(4, 2, 1))
    rq, rsf = R.per_token_cast_to_fp4(x.cpu(), ue8m0_bytes=True)
    assert_same_bytes(q.cpu(), rq, "fp4 codes")
    assert_same_bytes(sf.cpu(), rsf, "fp4 scale bytes")
    check_guard(qbuf, "fp4 codes")
    check_guard(sbuf, "fp4 scale bytes")


def test_empty_inputs(device):
    for name in CASTS_FP8:
        for shape in ((0, 256), (5, 0)):
            q, sf = getattr(fp8gemm, name)(torch.empty(*shape, device=device))
            rq, rsf = getattr(R, name)(torch.empty(*shape))
            assert q.shape == rq.shape == shape and sf.shape == rsf.shape
    q, sf = fp8gemm.per_token_cast_to_fp8(torch.empty(0, 300, device=device))
    assert sf.shape == (0, 3)
    q, sf = fp8gemm.per_token_cast_to_fp4(torch.empty(0, 64, device=device))
    assert q.shape == (0, 32) and sf.shape == (0, 2)


# =====================================================================================
# Scale layouts
# =====================================================================================

def test_mn_major_tma_aligned_2d():
    sf = torch.randn(5, 3)
    out = fp8gemm.get_mn_major_tma_aligned_tensor(sf)
    assert out.shape == (5, 3) and out.stride() == (1, 8)
    assert torch.equal(out, sf)
    assert out.untyped_storage().nbytes() >= 8 * 3 * 4
    assert fp8gemm.get_mn_major_tma_aligned_tensor(out) is out, "already aligned: no copy"
    sf8 = torch.randn(8, 3)
    out8 = fp8gemm.get_mn_major_tma_aligned_tensor(sf8)
    assert out8.stride() == (1, 8) and torch.equal(out8, sf8)
    already = sf8.t().contiguous().t()
    assert fp8gemm.get_mn_major_tma_aligned_tensor(already) is already


def test_mn_major_tma_aligned_3d_and_int32():
    sf = torch.randn(3, 6, 4)
    out = fp8gemm.get_mn_major_tma_aligned_tensor(sf)
    assert out.shape == (3, 6, 4) and out.stride() == (32, 1, 8)
    assert torch.equal(out, sf)
    assert fp8gemm.get_mn_major_tma_aligned_tensor(out) is out
    packed = torch.randint(-2 ** 31, 2 ** 31 - 1, (7, 2), dtype=torch.int32)
    outp = fp8gemm.get_mn_major_tma_aligned_tensor(packed)
    assert outp.stride() == (1, 8) and torch.equal(outp, packed)


def test_transform_sf_into_required_layout():
    sfa = torch.randn(37, 3)              # per-row A scales, K = 300
    out = fp8gemm.transform_sf_into_required_layout(sfa, 37, 300, (1, 128, 128), is_sfa=True)
    assert out.stride() == (1, 40) and torch.equal(out, sfa)
    assert fp8gemm.transform_sf_into_required_layout(out, 37, 300, (1, 128, 128), is_sfa=True) is out
    sfb = torch.randn(2, 3)               # 128x128 B scales, N = 200
    assert fp8gemm.transform_sf_into_required_layout(sfb, 200, 300, (1, 128, 128)) is sfb
    sfg = torch.randn(4, 37, 3)
    outg = fp8gemm.transform_sf_into_required_layout(sfg, 37, 300, (1, 128), num_groups=4)
    assert outg.stride() == (120, 1, 40) and torch.equal(outg, sfg)
    # 1D1D recipe: B per row
    sfb1 = torch.randn(200, 3)
    assert fp8gemm.transform_sf_into_required_layout(sfb1, 200, 300, (1, 1, 128)).stride() == (1, 200)
    packed = torch.zeros(37, 1, dtype=torch.int32)
    assert fp8gemm.transform_sf_into_required_layout(packed, 37, 300, (1, 128, 128), is_sfa=True).shape == (37, 1)


# =====================================================================================
# Argument validation: errors name the argument, and come before any launch
# =====================================================================================

@pytest.fixture
def no_launch(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched before the arguments were validated")
    for name in ("launch_per_token", "launch_per_block", "launch_per_channel", "launch_per_token_fp4"):
        monkeypatch.setattr(KQ, name, boom)


@pytest.mark.parametrize("name", CASTS_FP8 + ["per_token_cast_to_fp4"])
def test_cast_argument_errors(name, no_launch):
    fn = getattr(fp8gemm, name)
    x = torch.randn(4, 64)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        fn([[1.0]])
    with pytest.raises(TypeError, match=r"x must have dtype bfloat16 or float32 or float16, got int32"):
        fn(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"x must have dtype .* got float8_e4m3fn"):
        fn(x.to(FP8))
    with pytest.raises(ValueError, match=r"x must be 2-D, got shape \(4, 64, 1\)"):
        fn(x[..., None])
    with pytest.raises(TypeError, match=r"use_ue8m0 must be a bool, got int"):
        fn(x, 1)
    with pytest.raises(ValueError, match=r"gran_k must be one of .*, got 100"):
        fn(x, True, 100)
    with pytest.raises(TypeError, match=r"gran_k must be an int, got float"):
        fn(x, True, 128.0)


def test_fp4_specific_errors(no_launch):
    with pytest.raises(ValueError, match=r"K \(x.shape\[1\] = 63\) must be even"):
        fp8gemm.per_token_cast_to_fp4(torch.randn(4, 63))
    with pytest.raises(ValueError, match=r"ue8m0_bytes=True needs use_ue8m0=True"):
        fp8gemm.per_token_cast_to_fp4(torch.randn(4, 64), use_ue8m0=False, ue8m0_bytes=True)
    with pytest.raises(TypeError, match=r"ue8m0_bytes must be a bool, got str"):
        fp8gemm.per_token_cast_to_fp4(torch.randn(4, 64), ue8m0_bytes="yes")
    with pytest.raises(ValueError, match=r"gran_k must be one of \(16, 32, 64, 128\), got 8"):
        fp8gemm.per_token_cast_to_fp4(torch.randn(4, 64), gran_k=8)


def test_scale_helper_errors():
    with pytest.raises(TypeError, match=r"x must have dtype float32 or bfloat16 or float16, got int32"):
        fp8gemm.ceil_to_ue8m0(torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"x must have dtype float32, got bfloat16"):
        fp8gemm.pack_ue8m0_to_int(torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"x must hold positive powers of two .* got 3.0"):
        fp8gemm.pack_ue8m0_to_int(f32(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"x must hold positive powers of two .* got -2.0"):
        fp8gemm.pack_ue8m0_to_int(f32(-2.0))
    with pytest.raises(ValueError, match=r"x must hold positive powers of two .* got 0.0"):
        fp8gemm.pack_ue8m0_to_int(f32(0.0))
    with pytest.raises(ValueError, match=r"x must have at least one dimension"):
        fp8gemm.pack_ue8m0_to_int(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"sf must have dtype float32 or int32, got bfloat16"):
        fp8gemm.get_mn_major_tma_aligned_tensor(torch.ones(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"sf must be 2-D \[mn, k\] or 3-D \[G, mn, k\], got shape \[4\]"):
        fp8gemm.get_mn_major_tma_aligned_tensor(torch.ones(4))


def test_transform_errors():
    sf = torch.randn(37, 3)
    t = fp8gemm.transform_sf_into_required_layout
    with pytest.raises(ValueError, match=r"sf must have shape \[37, 3\], got \[37, 2\]"):
        t(torch.randn(37, 2), 37, 300, (1, 128, 128), is_sfa=True)
    with pytest.raises(ValueError, match=r"sf must have shape \[2, 37, 3\], got \[37, 3\]"):
        t(sf, 37, 300, (1, 128, 128), num_groups=2, is_sfa=True)
    with pytest.raises(ValueError, match=r"recipe must be a tuple of 3 positive ints"):
        t(sf, 37, 300, (1, 0, 128), is_sfa=True)
    with pytest.raises(ValueError, match=r"recipe must be"):
        t(sf, 37, 300, "1x128")
    with pytest.raises(TypeError, match=r"mn must be an int, got float"):
        t(sf, 37.0, 300, (1, 128, 128))
    with pytest.raises(ValueError, match=r"k must be >= 0, got -1"):
        t(sf, 37, -1, (1, 128, 128))
    with pytest.raises(TypeError, match=r"is_sfa must be a bool"):
        t(sf, 37, 300, (1, 128, 128), is_sfa=1)
    with pytest.raises(ValueError, match=r"num_groups must be >= 1, got 0"):
        t(sf, 37, 300, (1, 128, 128), num_groups=0)
    with pytest.raises(TypeError, match=r"sf must have dtype float32 or int32, got float64"):
        t(sf.double(), 37, 300, (1, 128, 128))
    with pytest.raises(ValueError, match=r"sf must have shape \[37, 1\]"):
        t(torch.zeros(37, 3, dtype=torch.int32), 37, 300, (1, 128, 128), is_sfa=True)


# =====================================================================================
# Ahead-of-time compile for sm_90a: the GPU path (hardware E4M3 conversion) builds, loads and stores
# 16 bytes at a time, and keeps everything in registers
# =====================================================================================

def _aot_signature():
    return {"x_ptr": "*bf16", "q_ptr": "*u8", "sf_ptr": "*fp32", "M": "i32", "K": "i32", "stride_xm": "i32",
            "stride_qm": "i32", "stride_sm": "i32"}


# Register budget: the one-tile kernels stay at <= 128; the persistent ones hold a second (prefetched)
# tile, so up to 168 (three 4-warp programs or one 8-warp program and a half per SM still fit).


@pytest.mark.parametrize("kernel,constexprs,warps,stores", [
    ("per_token_cast_kernel", dict(BLOCK_M=16, GROUPS=4, GRAN=128, USE_UE8M0=True, SOFT_CVT=False), 8, "STG.E.128"),
    ("per_block_cast_kernel", dict(BLOCK_M=128, GROUPS=1, GRAN=128, USE_UE8M0=False, SOFT_CVT=False), 8,
     "STG.E.128"),
    ("per_token_cast_fp4_kernel", dict(BLOCK_M=16, GROUPS=16, GRAN=32, USE_UE8M0=True, SF_BYTES=False), 8,
     "STG.E.64"),
    ("per_token_cast_kernel", dict(BLOCK_M=16, GROUPS=4, GRAN=128, USE_UE8M0=True, SOFT_CVT=False, PERSISTENT=True),
     4, "STG.E.128"),
    ("per_block_cast_kernel", dict(BLOCK_M=128, GROUPS=1, GRAN=128, USE_UE8M0=False, SOFT_CVT=False, PERSISTENT=True),
     8, "STG.E.128"),
])
def test_quant_kernels_compile_sm90(kernel, constexprs, warps, stores):
    from fp8gemm.testing import compile_sm90_in_subprocess, sass_count
    res = compile_sm90_in_subprocess("fp8gemm.kernels.quant", kernel, _aot_signature(), dict(constexprs, stride_xk=1),
                                     num_warps=warps,
                                     divisible_by_16=["x_ptr", "q_ptr", "sf_ptr", "K", "stride_xm", "stride_qm"])
    assert res["local"] == 0 and res["stack"] == 0, f"{kernel}: local memory used"
    assert 0 < res["regs"] <= (168 if constexprs.get("PERSISTENT") else 128), f"{kernel}: {res['regs']} registers"
    sass = res["sass"]
    # 16-byte loads; evict-first ones (.EF) where quant.STREAM_EVICT applies (the FP4 tiles)
    assert sass_wide_loads(sass) > 0, f"{kernel}: input not read with 16-byte loads"
    if os.environ.get("FP8GEMM_STREAM_EVICT") is None:
        assert (sass_count(sass, "LDG.E.EF.128") > 0) == ("fp4" in kernel), f"{kernel}: eviction policy"
    assert sass_count(sass, stores) > 0, f"{kernel}: codes not stored with wide stores"
    if "SOFT_CVT" in constexprs:
        assert "F2FP.SATFINITE.E4M3" in sass, f"{kernel}: hardware E4M3 conversion not used"


def test_per_channel_cast_sm90_division_free():
    """The per-channel cast derives each column's scale in every thread holding a piece of the column; on
    the GPU it takes the FMA-corrected quotient and ``rcp.rn`` (no IEEE division: no FCHK; ``rcp.rn`` keeps
    a called slow path for extreme inputs), stays in registers and within 128 of them (four 4-warp programs
    an SM)."""
    from fp8gemm.testing import compile_sm90_in_subprocess, sass_count
    sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "sf_ptr": "*fp32", "M": "i32", "N": "i32", "stride_xm": "i32",
           "stride_qm": "i32", "stride_sm": "i32"}
    for ue8m0 in (False, True):
        res = compile_sm90_in_subprocess("fp8gemm.kernels.quant", "per_channel_cast_kernel", sig,
                                         dict(stride_xn=1, GRAN=128, BLOCK_N=64, USE_UE8M0=ue8m0, SOFT_CVT=False),
                                         num_warps=4, divisible_by_16=["x_ptr", "q_ptr", "sf_ptr", "M", "N",
                                                                        "stride_xm", "stride_qm", "stride_sm"])
        assert res["local"] == 0 and res["stack"] == 0, "local memory used"
        assert 0 < res["regs"] <= 128, f"{res['regs']} registers"
        sass = res["sass"]
        assert sass_count(sass, "FCHK") == 0, "IEEE division used"
        assert sass_count(sass, "MUFU.RCP") > 0 and sass_wide_loads(sass) > 0
        assert "F2FP.SATFINITE.E4M3" in sass


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_per_channel_gluon_cast_sm90(dtype):
    """The Gluon per-channel cast (the SM90 default) at its default tile: 16-byte loads, the hardware E4M3
    conversion, the division-free scales, no local memory and at most 128 registers (four 4-warp programs
    an SM, the occupancy it was measured at)."""
    import torch

    from fp8gemm.kernels import quant_gluon as KQG
    from fp8gemm.testing import compile_sm90_in_subprocess, sass_count, sass_wide_loads
    if not KQG.HAS_GLUON:
        pytest.skip("this triton has no Gluon")
    cfg = KQG.per_channel_config(torch.empty(1, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32), 128)
    sig = {"x_ptr": f"*{dtype}", "q_ptr": "*u8", "sf_ptr": "*fp32", "M": "i32", "N": "i32", "stride_xm": "i32",
           "stride_qm": "i32", "stride_sm": "i32"}
    res = compile_sm90_in_subprocess(
        "fp8gemm.kernels.quant_gluon", "per_channel_cast_kernel", sig,
        dict(stride_xn=1, GRAN=128, BLOCK_N=cfg.block_n, VEC=cfg.vec, TPW_R=cfg.tpw_r, WPC_R=cfg.wpc_r,
             USE_UE8M0=False), gluon=True, num_warps=cfg.warps,
        divisible_by_16=["x_ptr", "q_ptr", "sf_ptr", "M", "N", "stride_xm", "stride_qm", "stride_sm"])
    assert res["local"] == 0 and res["stack"] == 0, "local memory used"
    assert 0 < res["regs"] <= 128, f"{res['regs']} registers"
    sass = res["sass"]
    assert sass_wide_loads(sass) > 0, "input not read with 16-byte loads"
    assert sass_count(sass, "FCHK") == 0 and sass_count(sass, "MUFU.RCP") > 0, "scales not division-free"
    assert "F2FP.SATFINITE.E4M3" in sass


# =====================================================================================
# FP4 cast on the bits (UE8M0 scale without a division, 1/sf folded into the rounding FMA):
# every E2M1 tie at every scale, inf/NaN groups, both input paths; e2m1_codes on its own
# =====================================================================================

def _neighbours(t, dtype):
    """``t`` (exact in ``dtype``, positive) and its next values up and down in ``dtype``."""
    t = t.to(dtype)
    if dtype == torch.bfloat16:
        i = t.view(torch.int16)
        return t, (i + 1).view(torch.bfloat16), (i - 1).view(torch.bfloat16)
    return t, torch.nextafter(t, torch.tensor(float("inf"))), torch.nextafter(t, torch.tensor(0.0))


def e2m1_points(dtype):
    """Every E2M1 value, every midpoint (the ties) and their neighbours in ``dtype``, both signs."""
    table = torch.tensor(R.E2M1_VALUES)
    mids = (table[1:] + table[:-1]) / 2
    pts = torch.cat([table[1:], *_neighbours(mids, dtype)]).float()
    return torch.cat([pts, -pts, torch.tensor([0.0, -0.0])])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ue8m0_bytes", [False, True])
def test_fp4_ue8m0_every_tie_at_every_scale(dtype, ue8m0_bytes, device):
    """Rows of groups whose amax is ``top * 2^s`` for s from -16 to 120 and tops at, just above and below the
    scale boundaries (6, 4, 3, ...) and under the 1e-4 clamp: every tie rounds as the reference's cast."""
    pts = e2m1_points(dtype)
    rows = []
    for s in list(range(-16, 12)) + [30, 63, 100, 120]:
        for top in (6.0, 6.0 * (1 + 2 ** -7), 6.0 * (1 - 2 ** -8), 4.0, 3.0, 7.5, 5.0):
            rows.append(one_scale_rows(pts, 32, top)[0] * 2.0 ** s)
    rows.append(one_scale_rows(pts, 32, 6.0)[0] * 1e-6)                   # amax far under the 1e-4 clamp
    x = torch.stack(rows).to(dtype)
    assert x.isfinite().all()
    q, sf = fp8gemm.per_token_cast_to_fp4(x.to(device), ue8m0_bytes=ue8m0_bytes)
    rq, rsf = R.per_token_cast_to_fp4(x.cpu(), ue8m0_bytes=ue8m0_bytes)
    assert_same_bytes(q.cpu(), rq, "fp4 codes")
    assert_same_bytes(sf.cpu(), rsf, "fp4 scales")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp4_ue8m0_special_groups(dtype, device):
    """Groups holding inf, -inf or NaN (scale inf / NaN, every code 0) next to ordinary, all-zero, negative-zero
    and subnormal groups, in every position of a group; gran 32 and 16."""
    k = 32 * 12
    x = torch.randn(6, k) * 3
    for r in range(6):
        x[r, 0 * 32 + (5 * r) % 32] = float("inf")
        x[r, 2 * 32 + (7 * r) % 32] = float("-inf")
        x[r, 4 * 32 + (3 * r) % 32] = float("nan")
        x[r, 6 * 32:7 * 32] = 0.0
        x[r, 7 * 32:8 * 32] = -0.0
        x[r, 8 * 32:9 * 32] = torch.randn(32) * 1e-39                     # FP32 subnormals (0 in BF16)
    x[:, 9 * 32 + 1] = -1e30
    x = x.to(dtype)
    for gran in (32, 16):
        for sf_bytes in (False, True):
            q, sf = fp8gemm.per_token_cast_to_fp4(x.to(device), True, gran, ue8m0_bytes=sf_bytes)
            rq, rsf = R.per_token_cast_to_fp4(x.cpu(), True, gran, ue8m0_bytes=sf_bytes)
            assert_same_bytes(q.cpu(), rq, f"fp4 codes (gran {gran})")
            assert_same_bytes(sf.cpu(), rsf, f"fp4 scales (gran {gran})")


def test_fp4_bf16_unaligned_takes_the_value_path(device):
    """A BF16 input whose rows are not 4-byte aligned cannot be read as 32-bit pairs: same bytes anyway."""
    base = torch.randn(20, 258, dtype=torch.bfloat16)
    base[3, 40] = float("nan")
    x = base.to(device)[:, 1:257]                                         # start 2 bytes into the row
    assert x.data_ptr() % 4 != 0
    q, sf = fp8gemm.per_token_cast_to_fp4(x, ue8m0_bytes=True)
    rq, rsf = R.per_token_cast_to_fp4(base.cpu()[:, 1:257], ue8m0_bytes=True)
    assert_same_bytes(q.cpu(), rq, "fp4 codes")
    assert_same_bytes(sf.cpu(), rsf, "fp4 scales")


def test_e2m1_codes_device_helper(device):
    """kernels.quant.e2m1_codes (the non-UE8M0 cast and the MoE pre-dispatch use it) against the reference on
    ties, their neighbours, saturation, infinities, NaN, zeros, subnormals and a wide random range."""
    import triton
    import triton.language as tl

    @triton.jit
    def codes_kernel(y_ptr, c_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        y = tl.load(y_ptr + offs, mask=offs < n, other=0.0)
        tl.store(c_ptr + offs, KQ.e2m1_codes(y).to(tl.uint8), mask=offs < n)

    pts = e2m1_points(torch.float32)
    rnd = torch.randn(4000) * torch.logspace(-45, 38, 4000)
    special = torch.tensor([6.0, 6.5, 7.0, 8.0, 1e10, 3.4e38, float("inf"), float("nan"), 1e-45, 1e-40, 0.0])
    y = torch.cat([pts, rnd, special, -special, pts * 1.0000001, pts * 0.9999999])
    c = torch.empty(y.numel(), dtype=torch.uint8, device=device)
    codes_kernel[(triton.cdiv(y.numel(), 1024),)](y.to(device), c, y.numel(), BLOCK=1024)
    assert_same_bytes(c.cpu(), R.e2m1_codes(y.cpu()), "E2M1 codes")


def test_fp4_cast_sass_on_the_bits():
    """sm_90a: the UE8M0 FP4 cast has no IEEE division (no MUFU.RCP and its slow path) and about 15 SASS
    instructions a value (1096 before, ~34), with 16-byte loads and 8-byte code stores."""
    from fp8gemm.testing import compile_sm90_in_subprocess, sass_count, sass_opcodes
    for sf_bytes in (False, True):
        sig = dict(_aot_signature(), sf_ptr="*u8" if sf_bytes else "*fp32")
        c = dict(BLOCK_M=16, GROUPS=16, GRAN=32, USE_UE8M0=True, SF_BYTES=sf_bytes, stride_xk=1)
        res = compile_sm90_in_subprocess("fp8gemm.kernels.quant", "per_token_cast_fp4_kernel", sig, c, num_warps=8,
                                         divisible_by_16=["x_ptr", "q_ptr", "sf_ptr", "K", "stride_xm", "stride_qm"])
        sass = res["sass"]
        assert res["local"] == 0 and res["stack"] == 0 and res["regs"] <= 128
        assert "MUFU.RCP" not in sass and "CALL" not in sass, "division on the UE8M0 path"
        assert sass_wide_loads(sass) > 0 and sass_count(sass, "STG.E.64") > 0
        ops = len(sass_opcodes(sass))
        assert ops <= 16 * 32, f"{ops} SASS instructions for 32 values a thread"


def test_mn_major_copy_and_empty_layout():
    """The layout helpers behind get_mn_major_tma_aligned_tensor (also used by the MoE layer's scale buffers and
    by the Gluon GEMM's row-major copy): strides (aligned_mn * k, 1, aligned_mn), values equal, a 2-D input kept
    2-D; an empty buffer has the same layout."""
    from fp8gemm.quant import empty_mn_major, mn_major_copy
    sf = torch.rand(3, 10, 7)
    out = mn_major_copy(sf)
    assert out.shape == sf.shape and out.stride() == (12 * 7, 1, 12) and torch.equal(out, sf)
    two = mn_major_copy(sf[0], zero_pad=True)
    assert two.shape == (10, 7) and two.stride() == (1, 12) and torch.equal(two, sf[0])
    assert two.untyped_storage().nbytes() == 12 * 7 * 4
    assert torch.all(torch.as_strided(two, (7, 12), (12, 1))[:, 10:] == 0)       # the padding reads 0
    e = empty_mn_major(2, 5, 3)
    assert e.shape == (2, 5, 3) and e.stride() == (8 * 3, 1, 8)
    assert fp8gemm.get_mn_major_tma_aligned_tensor(sf).stride() == out.stride()
