"""FP4 activations -> FP8 operand (fp8gemm.kernels.fp4_convert): the kernel byte for byte against its PyTorch
statement on poisoned buffers (rows the GEMM skips must stay untouched), against the Triton GEMM's in-kernel
A-load (the same values), and the dispatcher's route choice (convert + Gluon vs in-kernel Triton).
"""
import functools
import math
import re

import pytest
import torch
import triton
import triton.language as tl

import fp8gemm
from fp8gemm import reference as R
from fp8gemm import runtime
from fp8gemm.kernels import fp4_convert as FC
from fp8gemm.kernels import gemm_dispatch, gemm_triton
from fp8gemm.testing import bit_view, calc_diff, sass_opcodes

FP8 = torch.float8_e4m3fn
POISON = 0xAB


def fp4_input(*rows, k, device, lo=121, hi=133):
    codes = torch.randint(0, 256, (*rows, k // 2), dtype=torch.uint8, device=device)
    sbytes = torch.randint(lo, hi + 1, (*rows, k // 32), dtype=torch.uint8, device=device)
    return codes, sbytes


def poisoned_operand(codes, k):
    q, sf = FC.empty_fp8_operand(codes, k)
    q.view(torch.uint8).fill_(POISON)
    sf.fill_(float("nan"))
    return q, sf


def assert_bits(got, want, what):
    got = got.cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = (bit_view(got) != bit_view(want.cpu())).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}"


def assert_untouched(q, sf, what):
    assert (q.view(torch.uint8) == POISON).all(), f"{what}: FP8 bytes written"
    assert sf.isnan().all(), f"{what}: scales written"


# =====================================================================================
# The PyTorch statement of the rule
# =====================================================================================

def test_reference_rule_by_hand():
    # one row, K = 160: a full 128-block (chunk bytes 127, 130, 125, 129) and a 32-wide tail (byte 120)
    codes = torch.zeros(1, 80, dtype=torch.uint8)
    codes[0, 0] = 0x2F          # col 0: code 0xF = -6, col 1: code 2 = 1.0
    codes[0, 16] = 0x07         # col 32 (chunk 1): 6.0
    codes[0, 32] = 0x01         # col 64 (chunk 2): 0.5
    codes[0, 64] = 0x05         # col 128 (tail chunk): 3.0
    sbytes = torch.tensor([[127, 130, 125, 129, 120]], dtype=torch.uint8)
    q, sf = FC.fp4_to_fp8_reference(codes, sbytes)
    assert sf.tolist() == [[8.0, 2.0 ** -7]]                                   # 2^(130-127), 2^(120-127)
    assert q[0, 0].item() == -6.0 / 8 and q[0, 1].item() == 1.0 / 8             # chunk 0: 2^(127-130)
    assert q[0, 32].item() == 6.0 and q[0, 64].item() == 0.5 / 32               # 2^0, 2^(125-130)
    assert q[0, 128].item() == 3.0                                              # the tail is its own block
    assert q.dtype == FP8 and q.shape == (1, 160)


def test_reference_is_exact_within_2_pow_8():
    codes, sbytes = fp4_input(7, k=384, device="cpu", lo=100, hi=108)
    q, sf = FC.fp4_to_fp8_reference(codes, sbytes)
    assert torch.equal(R.dequantize(q, sf, 1), R.dequantize_fp4(codes, sbytes))


def test_reference_rounds_far_chunks_to_nearest_even():
    # chunk 0 is 2^9 below chunk 1: 0.5 * 2^-9 = 2^-10, half of E4M3's smallest subnormal -> 0 (even);
    # 1.5 * 2^-9 = 1.5 subnormal units -> 2 units
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 0] = 0x31                          # col 0: 0.5, col 1: 1.5
    sbytes = torch.tensor([[100, 109, 0, 0]], dtype=torch.uint8)
    q, _ = FC.fp4_to_fp8_reference(codes, sbytes)
    assert q[0, 0].item() == 0.0 and q[0, 1].item() == 2 * 2.0 ** -9


# =====================================================================================
# The kernel against the reference (interpreter on CPU, compiled on a GPU)
# =====================================================================================

@pytest.mark.parametrize("k", [384, 160, 96, 2048])
def test_masked_convert_matches_reference(k, device):
    g, max_m = 3, 40
    codes, sbytes = fp4_input(g, max_m, k=k, device=device, lo=90, hi=140)   # wide: subnormal rounding too
    masked_m = torch.tensor([40, 0, 17], dtype=torch.int32, device=device)
    q, sf = poisoned_operand(codes, k)
    assert sf.shape == (g, max_m, math.ceil(k / 128)) and sf.stride()[1] == 1, "MN-major scales"
    FC.launch_fp4_to_fp8(codes, sbytes, q, sf, masked_m=masked_m, rows_hint=20)
    want_q, want_sf = FC.fp4_to_fp8_reference(codes.cpu(), sbytes.cpu())
    for gi, mm in enumerate(masked_m.tolist()):
        assert_bits(q[gi, :mm], want_q[gi, :mm], f"group {gi} codes")
        assert_bits(sf[gi, :mm], want_sf[gi, :mm], f"group {gi} scales")
        assert_untouched(q[gi, mm:], sf[gi, mm:], f"group {gi} rows past masked_m")


def test_masked_counts_above_max_m_and_several_tiles_per_program(device):
    g, max_m, k = 5, 70, 256
    codes, sbytes = fp4_input(g, max_m, k=k, device=device)
    masked_m = torch.tensor([1000, 3, 70, 0, 33], dtype=torch.int32, device=device)
    q, sf = poisoned_operand(codes, k)
    # 16 x 128 tiles and one program: the persistent loop walks every live tile
    FC.launch_fp4_to_fp8(codes, sbytes, q, sf, masked_m=masked_m, config=(16, 128, 4), ctas_per_sm=1)
    want_q, want_sf = FC.fp4_to_fp8_reference(codes.cpu(), sbytes.cpu())
    for gi, mm in enumerate(masked_m.clamp(max=max_m).tolist()):
        assert_bits(q[gi, :mm], want_q[gi, :mm], f"group {gi} codes")
        assert_bits(sf[gi, :mm], want_sf[gi, :mm], f"group {gi} scales")
        assert_untouched(q[gi, mm:], sf[gi, mm:], f"group {gi} tail")


def test_zero_rows(device):
    """Zero codes with zero scale bytes (the pre-dispatch's padding rows) and with ordinary scales."""
    codes, sbytes = fp4_input(1, 8, k=256, device=device)
    codes[0, :4] = 0
    sbytes[0, :2] = 0
    codes[0, 5, :] = 0x88                      # negative zeros
    q, sf = poisoned_operand(codes, 256)
    FC.launch_fp4_to_fp8(codes, sbytes, q, sf, masked_m=torch.tensor([8], dtype=torch.int32, device=device))
    want_q, want_sf = FC.fp4_to_fp8_reference(codes.cpu(), sbytes.cpu())
    assert_bits(q, want_q, "codes")
    assert_bits(sf, want_sf, "scales")
    assert (q[0, :4].view(torch.uint8) == 0).all()
    assert (q[0, 5].view(torch.uint8) == 0x80).all()
    assert sf[0, :2].tolist() == [[2.0 ** -126] * 2] * 2      # e_max 0: the clamp of the in-kernel path


@pytest.mark.parametrize("k", [256, 160])
def test_contiguous_convert_skips_padding_rows(k, device):
    ids = [0] * 20 + [-1] * 12 + [2] * 7 + [-1] * 25 + [-1] * 32 + [1] * 32
    m_indices = torch.tensor(ids, dtype=torch.int32, device=device)
    codes, sbytes = fp4_input(len(ids), k=k, device=device)
    q, sf = poisoned_operand(codes, k)
    assert sf.stride() == (1, math.ceil(len(ids) / 4) * 4)
    FC.launch_fp4_to_fp8(codes, sbytes, q, sf, m_indices=m_indices)
    want_q, want_sf = FC.fp4_to_fp8_reference(codes.cpu(), sbytes.cpu())
    ok = (m_indices >= 0).cpu()
    assert_bits(q.cpu()[ok], want_q[ok], "codes")
    assert_bits(sf.cpu()[ok], want_sf[ok], "scales")
    assert_untouched(q.cpu()[~ok], sf.cpu()[~ok], "-1 rows")
    # every row without m_indices
    q2, sf2 = FC.fp4_to_fp8(codes, sbytes)
    assert_bits(q2, want_q, "codes, all rows")
    assert_bits(sf2, want_sf, "scales, all rows")


def test_strided_input(device):
    codes, sbytes = fp4_input(2, 24, k=512, device=device)
    c, s = codes[:, ::2, :128], sbytes[:, ::2, :8]          # K = 256 out of a wider, row-strided buffer
    q, sf = poisoned_operand(c, 256)
    FC.launch_fp4_to_fp8(c, s, q, sf, masked_m=torch.tensor([12, 5], dtype=torch.int32, device=device))
    want_q, want_sf = FC.fp4_to_fp8_reference(c.cpu(), s.cpu())
    assert_bits(q[0], want_q[0], "group 0")
    assert_bits(sf[1, :5], want_sf[1, :5], "group 1 scales")
    assert_untouched(q[1, 5:], sf[1, 5:], "group 1 tail")


def every_nibble_and_gap(gaps, top, blocks_per_row=2):
    """Rows of 128-blocks whose chunk 0 has scale byte ``top`` (the block's largest) and chunks 1-3 the bytes
    ``top + gap`` for the next three of ``gaps`` (each <= 0); every chunk holds all 16 codes, each at an even
    and at an odd column.  Returns ``(codes, sbytes)`` [rows, K / 2], [rows, K / 32]."""
    gaps = list(gaps)
    per_row = 3 * blocks_per_row
    gaps += [0] * (-len(gaps) % per_row)
    rows = len(gaps) // per_row
    chunk = torch.tensor(list(range(16)) + list(range(15, -1, -1)), dtype=torch.uint8)      # 32 codes
    vals = chunk.repeat(rows, 4 * blocks_per_row)
    codes = vals[:, 0::2] | (vals[:, 1::2] << 4)
    g = torch.tensor(gaps, dtype=torch.int64).view(rows, blocks_per_row, 3)
    sbytes = torch.cat([torch.zeros(rows, blocks_per_row, 1, dtype=torch.int64), g], dim=2) + top
    assert sbytes.min() >= 0 and sbytes.max() <= 255
    return codes.contiguous(), sbytes.view(rows, -1).to(torch.uint8)


# Every relative scale a chunk can have: exact (0 .. -8), rounding onto E4M3's subnormal grid with ties
# (-9 .. -12), underflow to (signed) zero, and gaps past the -126 clamp.
GAPS = list(range(0, -31, -1)) + [-60, -100, -120, -125, -126, -127, -128, -200, -254, -255]


@pytest.mark.parametrize("top", [255, 254, 127])
def test_every_code_at_every_scale_gap(top, device):
    gaps = [max(g, -top) for g in GAPS]
    codes, sbytes = every_nibble_and_gap(gaps, top)
    want_q, want_sf = FC.fp4_to_fp8_reference(codes, sbytes)
    codes, sbytes = codes.to(device), sbytes.to(device)
    q, sf = FC.fp4_to_fp8(codes, sbytes)
    assert FC._words_fit(codes, sbytes, q.view(torch.uint8), codes.shape[-1] * 2, 16), "word path not taken"
    assert_bits(q, want_q, "E4M3 bytes")
    assert_bits(sf, want_sf, "scales")
    # as a masked 3-D operand (two groups, the second one's rows reversed), through a few tiles per program
    c3 = torch.stack([codes, codes.flip(0)])
    s3 = torch.stack([sbytes, sbytes.flip(0)])
    q3, sf3 = poisoned_operand(c3, codes.shape[-1] * 2)
    m = codes.shape[0]
    FC.launch_fp4_to_fp8(c3, s3, q3, sf3, masked_m=torch.tensor([m, m - 3], dtype=torch.int32, device=device),
                         config=(16, 128, 4), ctas_per_sm=1)
    assert_bits(q3[0], want_q, "masked group 0")
    assert_bits(q3[1, :m - 3], want_q.flip(0)[:m - 3], "masked group 1")
    assert_bits(sf3[1, :m - 3], want_sf.flip(0)[:m - 3], "masked group 1 scales")
    assert_untouched(q3[1, m - 3:], sf3[1, m - 3:], "masked group 1 tail")


def test_reference_values_at_every_scale_gap():
    """The reference's bytes are E2M1 * 2^gap rounded to nearest even onto E4M3, checked against exact
    rational arithmetic (E4M3 subnormals are multiples of 2^-9, its normals have three mantissa bits)."""
    from fractions import Fraction
    codes, sbytes = every_nibble_and_gap(GAPS, 255, blocks_per_row=1)
    q, _ = FC.fp4_to_fp8_reference(codes, sbytes)
    nib = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)

    def e4m3(x: Fraction) -> Fraction:
        mag = abs(x)
        if mag < Fraction(1, 64):
            unit = Fraction(1, 512)
        else:
            e = 0
            while Fraction(2) ** (e + 1) <= mag:
                e += 1
            while Fraction(2) ** e > mag:
                e -= 1
            unit = Fraction(2) ** e / 8
        n, rem = divmod(mag, unit)
        if rem > unit / 2 or (rem == unit / 2 and n % 2 == 1):
            n += 1
        return (n * unit) if x >= 0 else -(n * unit)

    for r in range(codes.shape[0]):
        for chunk in range(4):
            gap = max(int(sbytes[r, chunk]) - int(sbytes[r, chunk // 4 * 4:chunk // 4 * 4 + 4].max()), -126)
            for j in range(32):
                c = int(nib[r, chunk * 32 + j])
                v = Fraction(FC._E2M1_VALUES[c & 7]) * Fraction(2) ** gap * (-1 if c & 8 else 1)
                got = q[r, chunk * 32 + j]
                assert Fraction(got.item()) == e4m3(v), (r, chunk, c, gap)
                assert (got.view(torch.uint8).item() >> 7) == (c >> 3), "sign bit (negative zero included)"


def test_unaligned_input_takes_the_value_path(device):
    """Codes that are not 4-byte aligned (or a K that is not a multiple of 32) go value by value: same bytes."""
    codes, sbytes = every_nibble_and_gap(GAPS, 255)
    big = torch.zeros(codes.shape[0], codes.shape[1] + 4, dtype=torch.uint8)
    big[:, 1:1 + codes.shape[1]] = codes
    unaligned = big.to(device)[:, 1:1 + codes.shape[1]]
    q, sf = FC.empty_fp8_operand(unaligned, codes.shape[1] * 2)
    assert not FC._words_fit(unaligned, sbytes, q.view(torch.uint8), codes.shape[1] * 2, 16)
    FC.launch_fp4_to_fp8(unaligned, sbytes.to(device), q, sf)
    want_q, want_sf = FC.fp4_to_fp8_reference(codes, sbytes)
    assert_bits(q, want_q, "E4M3 bytes")
    assert_bits(sf, want_sf, "scales")


def test_zero_sizes(device):
    codes = torch.zeros(2, 0, 64, dtype=torch.uint8, device=device)
    q, sf = FC.fp4_to_fp8(codes, torch.zeros(2, 0, 4, dtype=torch.uint8, device=device),
                          masked_m=torch.zeros(2, dtype=torch.int32, device=device))
    assert q.shape == (2, 0, 128) and sf.shape == (2, 0, 1)


# =====================================================================================
# Same values as the Triton GEMM's in-kernel A-load
# =====================================================================================

@triton.jit
def _in_kernel_tiles(codes_ptr, sbytes_ptr, q_ptr, sf_ptr, M, K, s_cm, s_bm,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """What gemm_triton's A-load hands the tensor cores, stored (one [BLOCK_M, 128] tile per program)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    kb = tl.program_id(1)
    a, sa = gemm_triton._load_fp4_as_fp8(codes_ptr, sbytes_ptr, offs_m, m_ok, kb, K, s_cm, 1, s_bm, 1,
                                         BLOCK_M, BLOCK_K)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(q_ptr + offs_m[:, None] * K + cols[None, :], a, mask=m_ok[:, None] & (cols < K)[None, :])
    tl.store(sf_ptr + offs_m * tl.cdiv(K, BLOCK_K) + kb, sa, mask=m_ok)


@pytest.mark.parametrize("k", [384, 160])
def test_same_values_as_the_in_kernel_a_load(k, device):
    # The interpreter's own E4M3 conversion rounds ties away from zero, so there the scale spread stays
    # within 2^8 (every value exact); compiled, both round to nearest even and any spread must agree.
    spread = (124, 131) if runtime.interpreting() else (60, 160)
    m = 48
    codes, sbytes = fp4_input(m, k=k, device=device, lo=spread[0], hi=spread[1])
    q = torch.empty(m, k, dtype=FP8, device=device)
    sf = torch.empty(m, math.ceil(k / 128), device=device)
    _in_kernel_tiles[(triton.cdiv(m, 16), math.ceil(k / 128))](codes, sbytes, q, sf, m, k, codes.stride(0),
                                                               sbytes.stride(0), BLOCK_M=16, BLOCK_K=128)
    got_q, got_sf = FC.fp4_to_fp8(codes, sbytes)
    assert_bits(got_q, q.cpu(), "E4M3 bytes")
    assert_bits(got_sf, sf.cpu(), "scales")


def test_convert_then_fp8_gemm_equals_fp4_gemm(device, monkeypatch):
    """Converted operand through the FP8 GEMM == FP4 through the in-kernel path (Triton, same tiles)."""
    monkeypatch.setenv("FP8GEMM_BACKEND", "triton")
    g, max_m, n, k = 2, 40, 136, 384
    codes, sbytes = fp4_input(g, max_m, k=k, device=device, lo=124, hi=131)    # exact: no rounding anywhere
    b = torch.randn(g, n, k, device=device).to(FP8)
    sfb = torch.rand(g, math.ceil(n / 128), k // 128, device=device) + 0.5
    masked_m = torch.tensor([40, 9], dtype=torch.int32, device=device)
    q, sf = FC.fp4_to_fp8(codes, sbytes, masked_m=masked_m)
    d4 = torch.full((g, max_m, n), float("nan"), dtype=torch.bfloat16, device=device)
    d8 = d4.clone()
    fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes), (b, sfb), d4, masked_m, 20)
    fp8gemm.m_grouped_fp8_gemm_nt_masked((q, sf), (b, sfb), d8, masked_m, 20)
    assert_bits(d8, d4.cpu(), "FP8 GEMM on the converted operand vs the FP4 GEMM")
    ref = R.m_grouped_fp8_gemm_nt_masked(codes.cpu(), sbytes.cpu(), b.cpu(), sfb.cpu(), masked_m.cpu(),
                                         torch.zeros_like(d4.cpu()))
    assert calc_diff(d8[0].cpu(), ref[0]) < 1e-3 and calc_diff(d8[1, :9].cpu(), ref[1, :9]) < 1e-3
    assert d8[1, 9:].isnan().all()


# =====================================================================================
# The route choice (gemm_dispatch), with a stand-in for the Gluon kernel where there is no SM90
# =====================================================================================

class _FakeGluon:
    """Records the operands handed to the Gluon launch and computes the GEMM with the reference."""

    def __init__(self):
        self.calls = []

    def plan(self, mode, a, sfa, b, sfb, d, **kw):
        return 64, 128

    def launch(self, mode, a, sfa, b, sfb, d, *, masked_m=None, m_indices=None, **kw):
        self.calls.append((mode, a, sfa))
        a_c, sfa_c, b_c, sfb_c = a.cpu(), sfa.cpu(), b.cpu(), sfb.cpu()
        if mode == "masked":
            out = R.m_grouped_fp8_gemm_nt_masked(a_c, sfa_c, b_c, sfb_c, masked_m.cpu(), d.cpu())
        else:
            out = R.m_grouped_fp8_gemm_nt_contiguous(a_c, sfa_c, b_c, sfb_c, m_indices.cpu(), d.cpu())
        d.copy_(out)
        return 64, 128


@pytest.fixture
def fake_sm90(monkeypatch):
    from fp8gemm.kernels import gemm_gluon
    fake = _FakeGluon()
    monkeypatch.setattr(runtime, "is_sm90", lambda device: True)
    monkeypatch.setattr(gemm_gluon, "supports", lambda mode, a, sfa, b, sfb, d, c=None:
                        a.dtype == FP8 and sfa.dtype == torch.float32 and a.shape[-1] % 128 == 0)
    monkeypatch.setattr(gemm_gluon, "launch", fake.launch)
    monkeypatch.setattr(gemm_gluon, "plan", fake.plan)
    monkeypatch.delenv("FP8GEMM_BACKEND", raising=False)
    return fake


def test_route_masked_fp4_converts_then_gluon(fake_sm90, device, monkeypatch):
    g, max_m, n, k = 2, 40, 64, 256
    codes, sbytes = fp4_input(g, max_m, k=k, device=device)
    b = torch.randn(g, n, k, device=device).to(FP8)
    sfb = torch.rand(g, 1, k // 128, device=device) + 0.5
    masked_m = torch.tensor([33, 7], dtype=torch.int32, device=device)
    d = torch.full((g, max_m, n), float("nan"), dtype=torch.bfloat16, device=device)
    signal = fp8gemm.alloc_signal(g, max_m, device)
    assert fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes), (b, sfb), d, masked_m, 20,
                                                enable_overlap=True, signal=signal) == (64, 1)
    (mode, q, sf), = fake_sm90.calls
    assert mode == "masked" and q.dtype == FP8 and q.shape == (g, max_m, k) and sf.stride()[1] == 1
    want_q, want_sf = FC.fp4_to_fp8_reference(codes.cpu(), sbytes.cpu())
    for gi, mm in enumerate(masked_m.tolist()):
        assert_bits(q[gi, :mm], want_q[gi, :mm], "converted codes")
        assert_bits(sf[gi, :mm], want_sf[gi, :mm], "converted scales")
    ref = R.m_grouped_fp8_gemm_nt_masked(codes.cpu(), sbytes.cpu(), b.cpu(), sfb.cpu(), masked_m.cpu(),
                                         d.cpu())
    assert calc_diff(d[0, :33].cpu(), ref[0, :33]) < 1e-3 and d[1, 7:].isnan().all()

    # FP8GEMM_BACKEND=triton keeps the in-kernel path; so does K not a multiple of 128
    monkeypatch.setenv("FP8GEMM_BACKEND", "triton")
    kind, _ = gemm_dispatch._plan("masked", codes, sbytes, b, sfb, d, None, 20, 128, 256, None)
    assert kind == "triton"
    monkeypatch.delenv("FP8GEMM_BACKEND")
    c2, s2 = fp4_input(g, max_m, k=160, device=device)
    b2 = torch.randn(g, n, 160, device=device).to(FP8)
    kind, _ = gemm_dispatch._plan("masked", c2, s2, b2, sfb, d, None, 20, 128, 256, None)
    assert kind == "triton"
    kind, _ = gemm_dispatch._plan("masked", codes, sbytes, b, sfb, d, None, 20, 1, 256, None)
    assert kind == "triton", "per-row B scales stay on the Triton kernel"


def test_route_contiguous_fp4_converts_then_gluon(fake_sm90, device):
    ids = [0] * 100 + [-1] * 28 + [1] * 128
    m_indices = torch.tensor(ids, dtype=torch.int32, device=device)
    codes, sbytes = fp4_input(len(ids), k=256, device=device)
    b = torch.randn(2, 64, 256, device=device).to(FP8)
    sfb = torch.rand(2, 1, 2, device=device) + 0.5
    d = torch.full((len(ids), 64), float("nan"), dtype=torch.bfloat16, device=device)
    fp8gemm.m_grouped_fp8_gemm_nt_contiguous((codes, sbytes), (b, sfb), d, m_indices)
    (mode, q, sf), = fake_sm90.calls
    assert mode == "contiguous" and q.shape == (len(ids), 256)
    ok = (m_indices >= 0).cpu()
    want_q, _ = FC.fp4_to_fp8_reference(codes.cpu(), sbytes.cpu())
    assert_bits(q.cpu()[ok], want_q[ok], "converted codes")
    ref = R.m_grouped_fp8_gemm_nt_contiguous(codes.cpu(), sbytes.cpu(), b.cpu(), sfb.cpu(), m_indices.cpu(),
                                             torch.zeros_like(d.cpu()))
    assert calc_diff(d.cpu()[ok], ref[ok]) < 1e-3 and d.cpu()[~ok].isnan().all()


# =====================================================================================
# sm_90a compile: no local memory, 16-byte E4M3 stores
# =====================================================================================

# stride_bk and stride_fm are not specialised (do_not_specialize): runtime integers here as well
_CONVERT_SIG = {"codes_ptr": "*u8", "sbytes_ptr": "*u8", "q_ptr": "*u8", "sf_ptr": "*fp32", "rows_ptr": "*i32",
                "M": "i32", "K": "i32", "num_groups": "i32", "num_progs": "i32",
                "stride_cg": "i64", "stride_cm": "i32", "stride_bg": "i64", "stride_bm": "i32", "stride_bk": "i32",
                "stride_qg": "i64", "stride_qm": "i32", "stride_fg": "i64", "stride_fm": "i32", "stride_fk": "i32"}
_CONVERT_DIV = ["codes_ptr", "sbytes_ptr", "q_ptr", "sf_ptr", "rows_ptr", "K", "stride_cg", "stride_cm", "stride_bg",
                "stride_bm", "stride_qg", "stride_qm"]


@functools.lru_cache(maxsize=None)
def _compile_convert(rows, block_m, block_k, warps, groups_pow2, trigger=None):
    from fp8gemm.testing import compile_sm90_in_subprocess
    c = dict(stride_ck=1, ROWS=rows, BLOCK_M=block_m, BLOCK_K=block_k, GROUPS_POW2=groups_pow2, SOFT=False,
             WORDS=True)
    if trigger is not None:
        c["PDL_TRIGGER"] = trigger
    return compile_sm90_in_subprocess("fp8gemm.kernels.fp4_convert", "fp4_to_fp8_kernel", _CONVERT_SIG, c,
                                      num_warps=warps, divisible_by_16=_CONVERT_DIV)


@pytest.mark.parametrize("rows,block_m,block_k,warps", [(2, 16, 1024, 8), (1, 32, 512, 8)])
def test_convert_kernel_compiles_sm90(rows, block_m, block_k, warps):
    from fp8gemm.testing import sass_count
    res = _compile_convert(rows, block_m, block_k, warps, 32)
    sass = res["sass"]
    assert res["regs"] <= 128, f"{res['regs']} registers"
    assert res["local"] == 0 and res["stack"] == 0
    assert sass_count(sass, "STG.E.128") > 0, "E4M3 bytes not stored 16 at a time"
    assert sass_count(sass, "LDG.E.64") + sass_count(sass, "LDG.E.128") > 0, "codes not read wide"
    # The word path: table look-ups (PRMT), no shared-memory layout conversion, and about 7 instructions per
    # value in all (prologue included; 30 for the value-by-value FP32 path, measured on sm_90a SASS)
    assert sass_count(sass, "STS") == 0 and sass_count(sass, "BAR") == 0, "layout conversion through shared memory"
    ops = len(sass_opcodes(sass))
    per_thread = block_m * block_k // (32 * warps)
    assert ops <= 8 * per_thread, f"{ops} SASS instructions for {per_thread} values a thread"


# =====================================================================================
# Programmatic dependent launch: PDL_TRIGGER first, or nothing (the GEMM side: test_pdl_aot.py)
# =====================================================================================

# sha256[:16] of cuobjdump -sass of the decode shapes' convert (masked rows, convert_config(20, 4096)),
# recorded at the commit before PDL_TRIGGER existed (triton 3.6.0).
_CONVERT_SASS_BEFORE_PDL = {"3.6.0": "ec73490ae365b7f6"}


def _decode_convert(trigger):
    block_m, block_k, warps = FC.convert_config(20, 4096)
    return _compile_convert(FC.ROWS_MASKED, block_m, block_k, warps, 8, trigger)


def test_convert_trigger_off_is_the_committed_kernel():
    import hashlib
    default, off = _decode_convert(None), _decode_convert(False)
    assert off["sass"] == default["sass"]
    assert not re.search(r"\b(ACQBULK|PREEXIT)\b", default["sass"]) and "griddepcontrol" not in default["ptx"]
    want = _CONVERT_SASS_BEFORE_PDL.get(triton.__version__)
    if want is not None:
        assert hashlib.sha256(default["sass"].encode()).hexdigest()[:16] == want


def test_convert_trigger_comes_first():
    off, on = _decode_convert(False), _decode_convert(True)
    ops = sass_opcodes(on["sass"])
    assert ops.count("PREEXIT") == 1 and "ACQBULK" not in ops
    assert on["ptx"].count("griddepcontrol.launch_dependents;") == 1
    # before any memory access (only constant-bank and register set-up ahead of it)
    first = ops.index("PREEXIT")
    memory = ("LDG", "STG", "LDS", "STS")
    assert first < 12 and not any(op.startswith(memory) for op in ops[:first]), ops[:first + 1]
    assert on["regs"] <= off["regs"] + 2 and on["local"] == 0
    assert len(ops) <= len(sass_opcodes(off["sass"])) + 4
