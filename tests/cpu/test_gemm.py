"""GEMM family through the Triton kernels (the interpreter on CPU; the GPU when there is one).

Inputs are fresh randn per case, outputs are poisoned with NaN first, and every element that must
(or must not) be written is checked.  Reference: fp8gemm.reference.
"""
import math

import pytest
import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm.testing import calc_diff, check_signal, poison_

FP8 = torch.float8_e4m3fn


def fp8_operand(*shape, device):
    return torch.randn(*shape, device=device).to(FP8)


def block_scales(*shape, device):
    # Scales spread over two binades so a wrong scale index changes the result visibly.
    return torch.rand(*shape, device=device) * 1.5 + 0.25


def dense_case(m, n, k, device, gran_n=128):
    a = fp8_operand(m, k, device=device)
    b = fp8_operand(n, k, device=device)
    sfa = block_scales(m, math.ceil(k / 128), device=device)
    sfb = block_scales(math.ceil(n / gran_n), math.ceil(k / 128), device=device)
    return a, sfa, b, sfb


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (17, 200, 272), (130, 96, 256), (64, 128, 48), (33, 16, 384)])
def test_fp8_gemm_nt_matches_reference(m, n, k, device):
    a, sfa, b, sfb = dense_case(m, n, k, device)
    d = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=device))
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    ref = R.fp8_gemm_nt(a, sfa, b, sfb)
    assert not d.isnan().any(), "some output element was not written"
    assert calc_diff(d, ref) < 1e-3


def test_fp8_gemm_nt_detects_wrong_scale(device):
    """The metric used above is sensitive enough to see one wrong B scale block."""
    a, sfa, b, sfb = dense_case(64, 256, 256, device)
    d = torch.empty(64, 256, dtype=torch.bfloat16, device=device)
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    wrong = sfb.clone()
    wrong[1, 1] *= 2
    assert calc_diff(d, R.fp8_gemm_nt(a, sfa, b, wrong)) > 1e-3


def test_fp8_gemm_fp32_out_with_accumulation(device):
    m, n, k = 40, 136, 256
    a, sfa, b, sfb = dense_case(m, n, k, device)
    c = torch.randn(m, n, device=device)
    d = poison_(torch.empty(m, n, dtype=torch.float32, device=device))
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d, c=c)
    assert calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb, c=c, out_dtype=torch.float32)) < 1e-5
    # In place: c is d.
    d2 = c.clone()
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d2, c=d2)
    assert calc_diff(d2, d) < 1e-6


def test_fp8_gemm_1d1d_recipe(device):
    m, n, k = 24, 80, 256
    a, sfa, b, _ = dense_case(m, n, k, device)
    sfb = block_scales(n, k // 128, device=device)
    d = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=device))
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d, recipe=(1, 1, 128))
    assert calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb, gran_n_b=1)) < 1e-3


def test_fp8_gemm_mn_major_and_ue8m0_scales(device):
    m, n, k = 72, 128, 640
    a, sfa, b, sfb = dense_case(m, n, k, device)
    ref = R.fp8_gemm_nt(a, sfa, b, sfb)
    # MN-major, TMA-aligned storage of the same values (stride 1 along M, M padded to 4).
    storage = torch.empty(sfa.shape[1], 76, device=device)
    mn_major = storage[:, :m].t()
    mn_major.copy_(sfa)
    d = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=device))
    fp8gemm.fp8_gemm_nt((a, mn_major), (b, sfb), d)
    assert calc_diff(d, ref) < 1e-3
    # Packed UE8M0: powers of two, four exponent bytes per int32.
    exps_a = torch.randint(120, 133, (m, k // 128), device=device)
    exps_b = torch.randint(120, 133, (1, k // 128), device=device)

    def pack(e):
        e = torch.nn.functional.pad(e, (0, (-e.shape[1]) % 4)).to(torch.uint8)
        return e.contiguous().view(torch.int32)

    pa, pb = pack(exps_a), pack(exps_b)
    d = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=device))
    fp8gemm.fp8_gemm_nt((a, pa), (b, pb), d)
    ref = R.fp8_gemm_nt(a, torch.pow(2.0, exps_a - 127.0), b, torch.pow(2.0, exps_b - 127.0))
    assert calc_diff(d, ref) < 1e-3


@pytest.mark.parametrize("variant", ["nn", "tn", "tt"])
def test_layout_variants(variant, device):
    m, n, k = 48, 160, 256
    a, sfa, b, sfb = dense_case(m, n, k, device)
    ref = R.fp8_gemm_nt(a, sfa, b, sfb)
    A = (a.t().contiguous(), sfa.t().contiguous()) if variant[0] == "t" else (a, sfa)
    B = (b.t().contiguous(), sfb.t().contiguous()) if variant[1] == "n" else (b, sfb)
    d = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=device))
    getattr(fp8gemm, f"fp8_gemm_{variant}")(A, B, d)
    assert calc_diff(d, ref) < 1e-3


def test_bf16_gemms(device):
    m, n, k = 50, 72, 96
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    ref = R.bf16_gemm_nt(a, b)
    for variant, A, B in [("nt", a, b), ("nn", a, b.t().contiguous()), ("tn", a.t().contiguous(), b.t().contiguous()),
                          ("tt", a.t().contiguous(), b)]:
        d = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=device))
        getattr(fp8gemm, f"bf16_gemm_{variant}")(A, B, d)
        assert calc_diff(d, ref) < 1e-4, variant


def test_zero_sized_dims_are_accepted(device):
    a, sfa, b, sfb = dense_case(0, 64, 128, device)
    d = torch.empty(0, 64, dtype=torch.bfloat16, device=device)
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
    a, sfa, b, sfb = dense_case(8, 0, 128, device)
    fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), torch.empty(8, 0, dtype=torch.bfloat16, device=device))
    # A masked call with max_m = 0 still reports the tiles and the threshold a consumer would wait for.
    g, n, k = 2, 300, 128
    a, sfa, b, sfb = masked_case(g, 0, n, k, device)
    signal = fp8gemm.alloc_signal(g, 1, device)
    block_m, threshold = fp8gemm.m_grouped_fp8_gemm_nt_masked(
        (a, sfa), (b, sfb), torch.empty(g, 0, n, dtype=torch.bfloat16, device=device),
        torch.zeros(g, dtype=torch.int32, device=device), 4, enable_overlap=True, signal=signal)
    assert block_m >= 16 and threshold >= 2, (block_m, threshold)   # n = 300 needs >= 2 N-tiles
    assert signal.eq(0).all()


def test_num_sms_cap_is_respected(device):
    m, n, k = 130, 200, 256
    a, sfa, b, sfb = dense_case(m, n, k, device)
    old = fp8gemm.get_num_sms()
    try:
        fp8gemm.set_num_sms(1)  # one persistent program walks every tile
        d = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=device))
        fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
        assert calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb)) < 1e-3
    finally:
        fp8gemm.set_num_sms(old)


# ------------------------------------------------------------------------------------------------
# Grouped
# ------------------------------------------------------------------------------------------------

def contiguous_case(seg_rows, n, k, device, alignment=128):
    """Segments of ``seg_rows[g]`` real rows, each padded with -1 rows to the alignment."""
    ids = []
    for g, rows in enumerate(seg_rows):
        padded = math.ceil(rows / alignment) * alignment
        ids += [g] * rows + [-1] * (padded - rows)
    m = len(ids)
    m_indices = torch.tensor(ids, dtype=torch.int32, device=device)
    g = len(seg_rows)
    a = fp8_operand(m, k, device=device)
    sfa = block_scales(m, math.ceil(k / 128), device=device)
    b = fp8_operand(g, n, k, device=device)
    sfb = block_scales(g, math.ceil(n / 128), math.ceil(k / 128), device=device)
    return a, sfa, b, sfb, m_indices


def test_contiguous_padding_rows_untouched(device):
    a, sfa, b, sfb, m_indices = contiguous_case([100, 0, 129, 5], 144, 256, device)
    d = poison_(torch.empty(a.shape[0], 144, dtype=torch.bfloat16, device=device))
    fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, m_indices)
    valid = m_indices >= 0
    assert not d[valid].isnan().any(), "a valid row was not written"
    assert d[~valid].isnan().all(), "a padding row (-1) was written"
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, d.clone())
    assert calc_diff(d[valid], ref[valid]) < 1e-3


def test_contiguous_alignment_64(device):
    old = fp8gemm.get_mk_alignment_for_contiguous_layout()
    try:
        fp8gemm.set_mk_alignment_for_contiguous_layout(64)
        a, sfa, b, sfb, m_indices = contiguous_case([70, 10], 128, 128, device, alignment=64)
        d = poison_(torch.empty(a.shape[0], 128, dtype=torch.bfloat16, device=device))
        fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, m_indices)
        valid = m_indices >= 0
        ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, d.clone())
        assert calc_diff(d[valid], ref[valid]) < 1e-3
        assert d[~valid].isnan().all()
    finally:
        fp8gemm.set_mk_alignment_for_contiguous_layout(old)


def test_contiguous_out_of_range_expert_is_not_read(device):
    a, sfa, b, sfb, m_indices = contiguous_case([128, 128], 64, 128, device)
    m_indices[128:] = 7  # no such expert: the block is skipped, not read from beyond B
    d = poison_(torch.empty(a.shape[0], 64, dtype=torch.bfloat16, device=device))
    fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, m_indices)
    assert d[128:].isnan().all()
    assert not d[:128].isnan().any()


def test_contiguous_bf16(device):
    m_indices = torch.tensor([0] * 100 + [-1] * 28 + [1] * 128, dtype=torch.int32, device=device)
    a = torch.randn(256, 64, device=device, dtype=torch.bfloat16)
    b = torch.randn(2, 48, 64, device=device, dtype=torch.bfloat16)
    d = poison_(torch.empty(256, 48, dtype=torch.bfloat16, device=device))
    fp8gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)
    valid = m_indices >= 0
    ref = torch.stack([a[r].float() @ b[max(int(m_indices[r]), 0)].float().T for r in range(256)])
    assert calc_diff(d[valid], ref[valid]) < 1e-4
    assert d[~valid].isnan().all()


def masked_case(g, max_m, n, k, device):
    a = fp8_operand(g, max_m, k, device=device)
    sfa = block_scales(g, max_m, math.ceil(k / 128), device=device)
    b = fp8_operand(g, n, k, device=device)
    sfb = block_scales(g, math.ceil(n / 128), math.ceil(k / 128), device=device)
    return a, sfa, b, sfb


@pytest.mark.parametrize("masked,expected_m", [([0, 5, 64, 37], 20), ([130, 1, 0, 96], 96)])
@pytest.mark.parametrize("overlap", [False, True])
def test_masked_rows_and_signals(masked, expected_m, overlap, device):
    g, max_m, n, k = 4, 160, 200, 256
    a, sfa, b, sfb = masked_case(g, max_m, n, k, device)
    masked_m = torch.tensor(masked, dtype=torch.int32, device=device)
    d = poison_(torch.empty(g, max_m, n, dtype=torch.bfloat16, device=device))
    signal = fp8gemm.alloc_signal(g, max_m, device) if overlap else None
    out = fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, expected_m,
                                               enable_overlap=overlap, signal=signal)
    for gi, mm in enumerate(masked):
        assert not d[gi, :mm].isnan().any(), f"group {gi}: a masked-in row was not written"
        assert d[gi, mm:].isnan().all(), f"group {gi}: a row past masked_m was written"
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, torch.zeros_like(d))
    rows = torch.cat([d[gi, :mm] for gi, mm in enumerate(masked)])
    ref_rows = torch.cat([ref[gi, :mm] for gi, mm in enumerate(masked)])
    assert calc_diff(rows, ref_rows) < 1e-3
    if overlap:
        block_m, threshold = out
        assert threshold >= 1
        check_signal(signal, masked_m, max_m, n, block_m, threshold)
        blocks = math.ceil(max_m / block_m)
        assert signal[g * blocks:].eq(0).all(), "a counter past the used range was touched"
        want = R.masked_signal_counts(masked_m.cpu(), max_m, n, block_m, math.ceil(n / threshold))
        assert torch.equal(signal[:g * blocks].cpu(), want.cpu())
    else:
        assert out is None


@pytest.mark.parametrize("masked,expected_m", [([0, 5, 64, 37], 20), ([130, 1, 0, 96], 96)])
@pytest.mark.parametrize("overlap", [False, True])
def test_masked_fp8_payload_output(masked, expected_m, overlap, device):
    """``d`` FP8 + ``d_sf`` (the EP layer's FP8 combine payload straight from the GEMM): exactly
    quantize_combine_payload of what the same call writes as BF16 (same kernel, same accumulation), rows past
    masked_m untouched, SBO counters at N / 128 per block."""
    g, max_m, n, k = 4, 160, 256, 256
    a, sfa, b, sfb = masked_case(g, max_m, n, k, device)
    masked_m = torch.tensor(masked, dtype=torch.int32, device=device)
    d16 = torch.zeros(g, max_m, n, dtype=torch.bfloat16, device=device)
    fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d16, masked_m, expected_m)
    d8 = torch.full((g, max_m, n), 0x55, dtype=torch.uint8, device=device).view(FP8)
    d_sf = torch.full((g, max_m, n // 128), 0xAA, dtype=torch.uint8, device=device)
    signal = fp8gemm.alloc_signal(g, max_m, device) if overlap else None
    out = fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d8, masked_m, expected_m,
                                               enable_overlap=overlap, signal=signal, d_sf=d_sf)
    for gi, mm in enumerate(masked):
        if mm:
            q, sf = R.quantize_combine_payload(d16[gi, :mm])
            assert torch.equal(d8[gi, :mm].view(torch.uint8), q.view(torch.uint8)), gi
            assert torch.equal(d_sf[gi, :mm], sf), gi
        assert torch.all(d8[gi, mm:].view(torch.uint8) == 0x55) and torch.all(d_sf[gi, mm:] == 0xAA), gi
    if overlap:
        block_m, threshold = out
        assert threshold == n // 128
        check_signal(signal, masked_m, max_m, n, block_m, threshold)


def test_masked_fp8_payload_output_validation(device):
    g, max_m, n, k = 2, 16, 256, 128
    a, sfa, b, sfb = masked_case(g, max_m, n, k, device)
    masked_m = torch.tensor([3, 0], dtype=torch.int32, device=device)
    d8 = torch.empty(g, max_m, n, dtype=FP8, device=device)
    with pytest.raises(TypeError, match="d must have dtype"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d8, masked_m, 4)       # FP8 D without d_sf
    with pytest.raises(ValueError, match=r"d_sf must have shape \[2, 16, 2\]"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d8, masked_m, 4,
                                             d_sf=torch.empty(g, max_m, 1, dtype=torch.uint8, device=device))
    with pytest.raises(TypeError, match="d must have dtype"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d8.to(torch.bfloat16), masked_m, 4,
                                             d_sf=torch.empty(g, max_m, 2, dtype=torch.uint8, device=device))
    a2, sfa2, b2, sfb2 = masked_case(g, max_m, 200, k, device)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((a2, sfa2), (b2, sfb2), torch.empty(g, max_m, 200, dtype=FP8,
                                             device=device), masked_m, 4,
                                             d_sf=torch.empty(g, max_m, 2, dtype=torch.uint8, device=device))


def test_check_signal_catches_a_wrong_counter(device):
    signal = torch.tensor([2, 2, 0, 0], dtype=torch.int32)
    check_signal(signal, torch.tensor([33, 0]), 64, 256, 32, 2)
    signal[2] = 1
    with pytest.raises(AssertionError, match="signal\\[2\\]"):
        check_signal(signal, torch.tensor([33, 0]), 64, 256, 32, 2)


def test_masked_bf16(device):
    g, max_m, n, k = 3, 40, 64, 64
    a = torch.randn(g, max_m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(g, n, k, device=device, dtype=torch.bfloat16)
    masked_m = torch.tensor([40, 0, 13], dtype=torch.int32, device=device)
    d = poison_(torch.empty(g, max_m, n, dtype=torch.bfloat16, device=device))
    fp8gemm.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 16)
    for gi, mm in enumerate([40, 0, 13]):
        if mm:
            assert calc_diff(d[gi, :mm], a[gi, :mm].float() @ b[gi].float().T) < 1e-4
        assert d[gi, mm:].isnan().all()


def test_k_grouped(device):
    ks = [128, 0, 384, 256]
    m, n = 72, 96
    total = sum(ks)
    a = fp8_operand(total, m, device=device)
    b = fp8_operand(total, n, device=device)
    sfa = block_scales(total // 128, m, device=device)
    sfb = block_scales(total // 128, n, device=device)
    ks_tensor = torch.tensor(ks, dtype=torch.int32, device=device)
    c = torch.randn(len(ks), m, n, device=device)
    d = poison_(torch.empty(len(ks), m, n, device=device))
    fp8gemm.k_grouped_fp8_gemm_tn_contiguous((a, sfa), (b, sfb), d, ks, ks_tensor, c=c)
    ref = R.k_grouped_fp8_gemm_tn_contiguous(a, sfa, b, sfb, ks, c, len(ks), m, n)
    assert calc_diff(d, ref) < 1e-5
    assert torch.equal(d[1], c[1]), "an empty group must leave d = c"


# ------------------------------------------------------------------------------------------------
# Argument errors: raised before any launch, nothing written
# ------------------------------------------------------------------------------------------------

def _dense_args(device):
    a, sfa, b, sfb = dense_case(32, 64, 256, device)
    return a, sfa, b, sfb, torch.full((32, 64), 3.0, dtype=torch.bfloat16, device=device)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a, sfa, b, sfb, d: ((a.float(), sfa), (b, sfb), d), TypeError, "a\\[0\\].*float8_e4m3fn"),
    (lambda a, sfa, b, sfb, d: ((a, sfa), (b[:, :128], sfb), d), ValueError, "b must have shape"),
    (lambda a, sfa, b, sfb, d: ((a, sfa[:, :1]), (b, sfb), d), ValueError, "a\\[1\\] must have shape"),
    (lambda a, sfa, b, sfb, d: ((a, sfa), (b, sfb[:, :1]), d), ValueError, "b\\[1\\] must have shape"),
    (lambda a, sfa, b, sfb, d: ((a, sfa), (b, sfb), d[:, :8]), ValueError, "d must have shape \\[32, 64\\]"),
    (lambda a, sfa, b, sfb, d: ((a, sfa), (b, sfb), d.half()), TypeError, "d must have dtype"),
    (lambda a, sfa, b, sfb, d: (a, (b, sfb), d), TypeError, "a must be a \\(tensor, scale_factors\\) pair"),
    (lambda a, sfa, b, sfb, d: ((a, sfa.double()), (b, sfb), d), TypeError, "a\\[1\\] must have dtype"),
    (lambda a, sfa, b, sfb, d: ((a[:, :200], sfa), (b[:, :200], sfb), d), ValueError, "multiple of 16"),
])
def test_dense_argument_errors(mutate, exc, match, device):
    a, sfa, b, sfb, d = _dense_args(device)
    args = mutate(a, sfa, b, sfb, d)
    before = args[2].clone()
    with pytest.raises(exc, match=match):
        fp8gemm.fp8_gemm_nt(*args)
    assert torch.equal(args[2], before)


def test_dense_c_requires_fp32_d(device):
    a, sfa, b, sfb, d = _dense_args(device)
    with pytest.raises(TypeError, match="d must be float32 when c is given"):
        fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d, c=torch.zeros(32, 64, device=device))
    with pytest.raises(ValueError, match="recipe must be"):
        fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d, recipe=(1, 64, 128))


def test_grouped_argument_errors(device):
    g, max_m, n, k = 2, 64, 128, 128
    a, sfa, b, sfb = masked_case(g, max_m, n, k, device)
    d = torch.zeros(g, max_m, n, dtype=torch.bfloat16, device=device)
    mm = torch.tensor([3, 4], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="masked_m must have dtype int32"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, mm.long(), 4)
    with pytest.raises(ValueError, match="signal must be given"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, mm, 4, enable_overlap=True)
    with pytest.raises(ValueError, match="signal must hold at least"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, mm, 4, enable_overlap=True,
                                             signal=torch.zeros(1, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="b must have 2 groups"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b[:1], sfb[:1]), d, mm, 4)
    with pytest.raises(ValueError, match="max_block_n"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, mm, 4, max_block_n=300)
    assert d.eq(0).all()
    a2, sfa2, b2, sfb2, m_indices = contiguous_case([100], 128, 128, device)
    d2 = torch.zeros(128, 128, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="multiple of get_mk_alignment"):
        fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a2[:100], sfa2[:100]), (b2, sfb2), d2[:100], m_indices[:100])
    with pytest.raises(ValueError, match="m_indices must have shape"):
        fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a2, sfa2), (b2, sfb2), d2, m_indices[:64])
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8gemm.k_grouped_fp8_gemm_tn_contiguous(
            (a2, sfa2), (a2, sfa2), torch.zeros(1, 128, 128, device=device), [100], torch.tensor([100], dtype=torch.int32))
    assert d2.eq(0).all()


def test_set_num_sms_validates():
    with pytest.raises(TypeError):
        fp8gemm.set_num_sms(2.5)
    with pytest.raises(ValueError):
        fp8gemm.set_num_sms(0)


# ------------------------------------------------------------------------------------------------
# FP4 (E2M1) activations, turned into E4M3 inside the grouped kernels
# ------------------------------------------------------------------------------------------------

def fp4_activations(*rows, k, device, spread=6):
    codes = torch.randint(0, 256, (*rows, k // 2), dtype=torch.uint8, device=device)
    scale_bytes = torch.randint(127 - spread, 127 + spread + 1, (*rows, k // 32), dtype=torch.uint8, device=device)
    return codes, scale_bytes


def test_masked_fp4_activations(device):
    g, max_m, n, k = 3, 48, 136, 384
    codes, sbytes = fp4_activations(g, max_m, k=k, device=device)
    b = fp8_operand(g, n, k, device=device)
    sfb = block_scales(g, math.ceil(n / 128), k // 128, device=device)
    masked_m = torch.tensor([48, 0, 17], dtype=torch.int32, device=device)
    d = poison_(torch.empty(g, max_m, n, dtype=torch.bfloat16, device=device))
    fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes), (b, sfb), d, masked_m, 16)
    ref = R.m_grouped_fp8_gemm_nt_masked(codes, sbytes, b, sfb, masked_m, torch.zeros_like(d))
    for gi, mm in enumerate(masked_m.tolist()):
        assert d[gi, mm:].isnan().all()
        if mm:
            assert calc_diff(d[gi, :mm], ref[gi, :mm]) < 1e-3
    # The dequantised reference really differs from a wrong decoding (e.g. swapped nibbles).
    swapped = ((codes & 0xF) << 4) | (codes >> 4)
    wrong = R.m_grouped_fp8_gemm_nt_masked(swapped, sbytes, b, sfb, masked_m, torch.zeros_like(d))
    assert calc_diff(d[0], wrong[0]) > 1e-2


def test_contiguous_fp4_activations(device):
    a, sfa, b, sfb, m_indices = contiguous_case([60, 128], 64, 256, device)
    codes, sbytes = fp4_activations(a.shape[0], k=256, device=device)
    d = poison_(torch.empty(a.shape[0], 64, dtype=torch.bfloat16, device=device))
    fp8gemm.m_grouped_fp8_gemm_nt_contiguous((codes, sbytes), (b, sfb), d, m_indices)
    ok = m_indices >= 0
    ref = R.m_grouped_fp8_gemm_nt_contiguous(codes, sbytes, b, sfb, m_indices, torch.zeros_like(d))
    assert calc_diff(d[ok], ref[ok]) < 1e-3
    assert d[~ok].isnan().all()


def test_fp4_argument_errors(device):
    codes, sbytes = fp4_activations(2, 16, k=256, device=device)
    b = fp8_operand(2, 64, 256, device=device)
    sfb = block_scales(2, 1, 2, device=device)
    d = torch.zeros(2, 16, 64, dtype=torch.bfloat16, device=device)
    mm = torch.tensor([1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="two E2M1 codes per byte"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((codes[..., :64], sbytes), (b, sfb), d, mm, 2)
    with pytest.raises(ValueError, match="a\\[1\\] must have shape"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes[..., :2]), (b, sfb), d, mm, 2)
    with pytest.raises(TypeError, match="a\\[1\\] must have dtype uint8"):
        fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes.float()), (b, sfb), d, mm, 2)
    assert d.eq(0).all()


def test_masked_overlap_with_per_row_b_scales(device):
    """1D1D recipe + SBO: the tiles the call reports (and sized the signal check with) are the ones it ran."""
    g, max_m, n, k = 2, 96, 160, 256
    a = fp8_operand(g, max_m, k, device=device)
    sfa = block_scales(g, max_m, k // 128, device=device)
    b = fp8_operand(g, n, k, device=device)
    sfb = block_scales(g, n, k // 128, device=device)
    masked_m = torch.tensor([70, 9], dtype=torch.int32, device=device)
    d = poison_(torch.empty(g, max_m, n, dtype=torch.bfloat16, device=device))
    signal = fp8gemm.alloc_signal(g, max_m, device)
    block_m, threshold = fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, 40,
                                                              recipe=(1, 1, 128), enable_overlap=True, signal=signal)
    check_signal(signal, masked_m, max_m, n, block_m, threshold)
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, torch.zeros_like(d), gran_n_b=1)
    assert calc_diff(torch.cat([d[0, :70], d[1, :9]]), torch.cat([ref[0, :70], ref[1, :9]])) < 1e-3


# DeepGEMM's public names that exist for features this library has (DeepGEMM 2.6.1's __init__, SM90 scope);
# the SM100-only FP8xFP4 GEMMs, einsum, the mega-MoE and the cuBLASLt wrappers are not here.
DEEPGEMM_NAMES = [
    "set_num_sms", "get_num_sms", "set_pdl", "get_pdl", "get_mk_alignment_for_contiguous_layout",
    "set_mk_alignment_for_contiguous_layout", "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt",
    "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked", "k_grouped_fp8_gemm_tn_contiguous",
    "bf16_gemm_nt", "bf16_gemm_nn", "bf16_gemm_tn", "bf16_gemm_tt", "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nt_masked", "fp8_mqa_logits", "fp8_paged_mqa_logits", "get_paged_mqa_logits_metadata",
    "transform_sf_into_required_layout", "get_mn_major_tma_aligned_tensor", "per_token_cast_to_fp8",
    "per_block_cast_to_fp8", "ceil_to_ue8m0", "pack_ue8m0_to_int", "fp8_m_grouped_gemm_nt_masked",
    "bf16_m_grouped_gemm_nt_masked",
]


def test_deepgemm_names_and_set_pdl():
    missing = [name for name in DEEPGEMM_NAMES if not callable(getattr(fp8gemm, name, None))]
    assert not missing, missing
    assert fp8gemm.fp8_m_grouped_gemm_nt_masked is fp8gemm.m_grouped_fp8_gemm_nt_masked
    assert fp8gemm.get_pdl() is True
    try:
        fp8gemm.set_pdl(False)
        assert fp8gemm.get_pdl() is False
        with pytest.raises(TypeError, match="enable"):
            fp8gemm.set_pdl(1)
        assert fp8gemm.get_pdl() is False
    finally:
        fp8gemm.set_pdl(True)
