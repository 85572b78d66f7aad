"""GPU tests of the Gluon warp-specialised FP8 GEMM (fp8gemm.kernels.gemm_gluon), SM90 only.

Every case: fresh ``randn`` inputs, outputs poisoned with NaN, DeepGEMM's ``calc_diff < 1e-3`` against
:mod:`fp8gemm.reference` on the rows that must be written, untouched rows still NaN, SBO signals exact.
The ``check_*`` helpers are also used by ``benchmarks/gluon_dev.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

from fp8gemm import reference as R
from fp8gemm.testing import calc_diff, check_signal

FP8 = torch.float8_e4m3fn
TOL = 1e-3


def _gg():
    from fp8gemm.kernels import gemm_gluon
    return gemm_gluon


def _sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _fp8(*shape):
    return torch.randn(*shape, device="cuda").to(FP8)


def _scales(*shape):
    return torch.rand(*shape, device="cuda") + 0.5


def _mn_major(sf: torch.Tensor) -> torch.Tensor:
    """The same scales in DeepGEMM's MN-major TMA-aligned layout: stride (1, align(M, 4))."""
    m, kb = sf.shape
    pad = (m + 3) // 4 * 4
    buf = torch.empty(kb, pad, device=sf.device, dtype=sf.dtype)
    buf[:, :m] = sf.t()
    return buf[:, :m].t()


def check_dense(m, n, k, *, sfa_layout="row", out_dtype=torch.bfloat16, with_c=False, num_sms=None,
                max_block_n=256, graph=False, config=None) -> dict:
    gg = _gg()
    a, b = _fp8(m, k), _fp8(n, k)
    sfa = _scales(m, k // 128)
    if sfa_layout == "mn":
        sfa = _mn_major(sfa)
    sfb = _scales(math.ceil(n / 128), k // 128)
    d = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
    c = torch.randn(m, n, device="cuda") if with_c else None
    assert gg.supports("dense", a, sfa, b, sfb, d, c)
    kw = dict(c=c, num_sms=num_sms or _sms(), max_block_n=max_block_n, config=config)
    if graph:
        gg.launch("dense", a, sfa, b, sfb, d, **kw)          # compile outside the capture
        d.fill_(float("nan"))
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            bm, bn = gg.launch("dense", a, sfa, b, sfb, d, **kw)
        d.fill_(float("nan"))
        g.replay()
    else:
        bm, bn = gg.launch("dense", a, sfa, b, sfb, d, **kw)
    torch.cuda.synchronize()
    ref = R.fp8_gemm_nt(a, sfa, b, sfb, c, out_dtype=out_dtype)
    nan = int(d.isnan().sum())
    diff = calc_diff(d, ref)
    res = dict(mode="dense", m=m, n=n, k=k, block=(bm, bn), diff=diff, nan=nan, sfa=sfa_layout,
               out=str(out_dtype), c=with_c, graph=graph)
    assert nan == 0, res
    assert diff < TOL, res
    return res


def check_masked(groups, max_m, n, k, masked, expected_m, *, signal=True, num_sms=None, max_block_n=256,
                 config=None, d_rows=None) -> dict:
    """``d_rows`` > max_m: D is the first max_m rows of each group of a taller buffer (not one [G * max_m, N]
    matrix, so no TMA store)."""
    gg = _gg()
    a, b = _fp8(groups, max_m, k), _fp8(groups, n, k)
    sfa = _scales(groups, max_m, k // 128)
    sfb = _scales(groups, math.ceil(n / 128), k // 128)
    d = torch.full((groups, d_rows or max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)[:, :max_m]
    masked_m = torch.tensor(masked, dtype=torch.int32, device="cuda")
    sig = torch.zeros(groups * math.ceil(max_m / 64), dtype=torch.int32, device="cuda") if signal else None
    assert gg.supports("masked", a, sfa, b, sfb, d)
    bm, bn = gg.launch("masked", a, sfa, b, sfb, d, masked_m=masked_m, expected_m=expected_m, signal=sig,
                       num_sms=num_sms or _sms(), max_block_n=max_block_n, config=config)
    torch.cuda.synchronize()
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, torch.full_like(d, float("nan")))
    got = torch.cat([d[g, :min(mm, max_m)] for g, mm in enumerate(masked)])
    want = torch.cat([ref[g, :min(mm, max_m)] for g, mm in enumerate(masked)])
    untouched_ok = all(bool(d[g, mm:].isnan().all()) for g, mm in enumerate(masked) if mm < max_m)
    nan = int(got.isnan().sum())
    diff = calc_diff(got, want) if got.numel() else 0.0
    res = dict(mode="masked", groups=groups, max_m=max_m, n=n, k=k, masked=list(masked), block=(bm, bn),
               diff=diff, nan=nan, untouched_ok=untouched_ok, signal=signal)
    assert nan == 0 and untouched_ok, res
    assert diff < TOL, res
    if signal:
        check_signal(sig, masked_m, max_m, n, bm, math.ceil(n / bn))
        res["signal_ok"] = True
    return res


def check_contiguous(sizes, n, k, *, trailing_pad_blocks=1, num_sms=None, max_block_n=256, config=None,
                     holes=()) -> dict:
    """``sizes[g]`` rows for expert g, each segment padded with -1 rows to a multiple of 128; ``holes``: more
    rows set to -1 (inside segments), which must stay untouched too."""
    gg = _gg()
    ids = []
    for g, s in enumerate(sizes):
        pad = (s + 127) // 128 * 128
        ids += [g] * s + [-1] * (pad - s)
    ids += [-1] * (128 * trailing_pad_blocks)
    for r in holes:
        ids[r] = -1
    m = len(ids)
    groups = len(sizes)
    m_indices = torch.tensor(ids, dtype=torch.int32, device="cuda")
    a, b = _fp8(m, k), _fp8(groups, n, k)
    sfa = _scales(m, k // 128)
    sfb = _scales(groups, math.ceil(n / 128), k // 128)
    d = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    assert gg.supports("contiguous", a, sfa, b, sfb, d)
    bm, bn = gg.launch("contiguous", a, sfa, b, sfb, d, m_indices=m_indices, num_sms=num_sms or _sms(),
                       max_block_n=max_block_n, config=config)
    torch.cuda.synchronize()
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, torch.full_like(d, float("nan")))
    valid = m_indices >= 0
    nan = int(d[valid].isnan().sum())
    untouched_ok = bool(d[~valid].isnan().all())
    diff = calc_diff(d[valid], ref[valid])
    res = dict(mode="contiguous", sizes=list(sizes), n=n, k=k, block=(bm, bn), diff=diff, nan=nan,
               untouched_ok=untouched_ok)
    assert nan == 0 and untouched_ok, res
    assert diff < TOL, res
    return res


# ---------------------------------------------------------------------------------------------
# pytest cases
# ---------------------------------------------------------------------------------------------

DENSE_SHAPES = [
    # ANCHORS shapes (a subset; the benchmark covers the rest)
    (4096, 4096, 7168), (4096, 2112, 7168), (4096, 576, 7168), (4096, 7168, 2048), (4096, 24576, 1536),
    (128, 2112, 7168), (64, 4096, 7168), (1, 2112, 7168), (1, 32768, 512),
    # odd shapes: ragged M and N, K of 1, 2, 3 slices
    (300, 1000, 384), (129, 200, 128), (64, 576, 256), (1000, 4100, 640), (17, 136, 1152),
]


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("m,n,k", DENSE_SHAPES)
def test_dense(m, n, k):
    check_dense(m, n, k)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("m,n,k", [(257, 4096, 1536), (4096, 2112, 7168)])
def test_dense_mn_major_scales(m, n, k):
    check_dense(m, n, k, sfa_layout="mn")


@pytest.mark.gpu
@pytest.mark.sm90
def test_dense_fp32_with_c():
    check_dense(300, 520, 768, out_dtype=torch.float32, with_c=True)


@pytest.mark.gpu
@pytest.mark.sm90
def test_dense_few_sms_and_graph():
    check_dense(1024, 1024, 1024, num_sms=7)
    check_dense(512, 2048, 2048, graph=True)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("expected_m,masked", [
    (20, [20, 0, 7, 33, 1, 64]),
    (192, [192, 250, 0, 129, 64, 256]),
])
@pytest.mark.parametrize("signal", [True, False])
def test_masked(expected_m, masked, signal):
    check_masked(len(masked), 256, 1536, 512, masked, expected_m, signal=signal)


@pytest.mark.gpu
@pytest.mark.sm90
def test_masked_ragged_n_and_few_sms():
    check_masked(3, 200, 1000, 384, [200, 77, 3], 90, num_sms=5)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("sizes,n,k", [
    ([300, 0, 129, 512], 1024, 768),
    ([1, 128, 255], 4096, 7168),
    ([77, 333], 1000, 384),
])
def test_contiguous(sizes, n, k):
    check_contiguous(sizes, n, k)


TILES = [(bm, bn) for bm in (64, 128) for bn in (16, 32, 64, 128)]


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("bm,bn", TILES)
@pytest.mark.parametrize("k_rotate", [False, True])
def test_every_tile_shape(bm, bn, k_rotate):
    gg = _gg()
    smem = gg._SMEM_BUDGET - bm * bn * 4
    cfg = gg.GluonConfig(bm, bn, gg._stages(bm, bn, bm * bn * 4), 8 if bm == 128 else 4, k_rotate=k_rotate)
    assert cfg.stages >= 2 and smem > 0
    check_dense(200, 300, 640, config=cfg)
    check_masked(3, 150, 272, 384, [150, 0, 65], 60, config=cfg)
    check_contiguous([130, 5], 200, 384, config=cfg)


@pytest.mark.gpu
@pytest.mark.sm90
def test_grouped_tma_store(kernel_launches):
    """Grouped calls store their full blocks by TMA and the partial ones through registers: rows past
    masked_m and -1 rows (padding, or holes inside a segment) stay untouched.  The spy tells which epilogue
    was compiled in: TMA for masked calls (D one [G * max_m, N] matrix; with a signal while SIGNAL_TMA_STORE) and
    contiguous ones; registers for a D that is not one matrix."""
    cfg = _gg().GluonConfig(128, 128, 4, 8)

    def tma(case):
        n0 = len(kernel_launches)
        case()
        return [launch["TMA_STORE"] for launch in kernel_launches[n0:]]

    assert tma(lambda: check_masked(3, 384, 272, 384, [384, 0, 200], 200, signal=False, config=cfg)) == [True]
    assert tma(lambda: check_masked(2, 200, 296, 256, [200, 129], 160, signal=False)) == [True]
    # a 600-byte row pitch (N = 300) is no TMA layout: register stores for every block
    assert tma(lambda: check_masked(2, 200, 300, 256, [200, 129], 160, signal=False)) == [False]
    # with a signal too (SIGNAL_TMA_STORE): each TMA-stored block is signalled once its writes are complete
    assert tma(lambda: check_masked(3, 384, 272, 384, [384, 0, 200], 200, signal=True, config=cfg)) == [True]
    old = _gg().SIGNAL_TMA_STORE
    try:
        _gg().SIGNAL_TMA_STORE = False
        assert tma(lambda: check_masked(3, 384, 272, 384, [384, 0, 200], 200, signal=True, config=cfg)) == [False]
    finally:
        _gg().SIGNAL_TMA_STORE = old
    assert tma(lambda: check_masked(2, 256, 272, 384, [256, 140], 200, signal=False, config=cfg,
                                    d_rows=300)) == [False]
    assert tma(lambda: check_contiguous([300, 0, 129, 512], 1024, 768, config=cfg)) == [True]
    assert tma(lambda: check_contiguous([256, 384], 272, 384, config=cfg, holes=(5, 130, 300, 511))) == [True]


# A's scales through shared memory (GluonConfig.sa_smem; the default for MN-major scales and small dense calls): every tile shape and
# mode, K-slice counts odd and even, ragged M and N, and the ANCHORS shapes of each dense tile family.
@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("bm,bn", TILES)
@pytest.mark.parametrize("k_rotate", [False, True])
def test_sa_smem_every_tile_shape(bm, bn, k_rotate, kernel_launches):
    gg = _gg()
    cfg = gg.GluonConfig(bm, bn, gg._stages(bm, bn, bm * bn * 4), 8 if bm == 128 else 4, k_rotate=k_rotate,
                         sa_smem=True)
    check_dense(200, 300, 640, config=cfg)
    check_dense(129, 136, 384, config=cfg, sfa_layout="mn")
    check_masked(3, 150, 272, 384, [150, 0, 65], 60, config=cfg)
    check_masked(3, 150, 272, 384, [150, 0, 65], 60, config=cfg, signal=False)
    check_contiguous([130, 5], 200, 384, config=cfg)
    assert kernel_launches and all(launch["SA_SMEM"] for launch in kernel_launches)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (128, 4096, 7168), (4096, 4096, 7168), (4096, 7168, 2048),
                                   (1000, 4100, 640)])
def test_sa_smem_dense(m, n, k):
    import dataclasses
    gg = _gg()
    a, b = _fp8(m, k), _fp8(n, k)
    d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    cfg = dataclasses.replace(gg._config_for("dense", a, b, d, None, None, 256, _sms()), sa_smem=True)
    for layout in ("row", "mn"):
        check_dense(m, n, k, config=cfg, sfa_layout=layout)


# Opt-in 128x256 variant (GluonConfig.wide_n): dense BF16 TMA-store calls only.  Cases cover an upper
# warpgroup wholly past M (m=300, 129), an upper N half wholly past N (n=2112, 200) or partly (1000, 4104;
# the row pitch must stay 16-byte aligned for the TMA store, else the call falls back to 128x128),
# one K slice, several tiles per program (num_sms=7: phases carried across tiles), MN-major scales.
WIDE_CASES = [
    dict(m=4096, n=4096, k=7168), dict(m=4096, n=2112, k=7168), dict(m=300, n=1000, k=384),
    dict(m=129, n=200, k=128), dict(m=1000, n=4104, k=640, num_sms=7), dict(m=257, n=4096, k=1536, sfa_layout="mn"),
    dict(m=512, n=2048, k=2048, graph=True),
]


def check_dense_wide(**kw) -> dict:
    res = check_dense(config=_gg().wide_config(), **kw)
    assert tuple(res["block"]) == (128, 256), res      # really ran the variant, not the fallback
    return res


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("kw", WIDE_CASES, ids=lambda kw: "x".join(str(kw[k]) for k in ("m", "n", "k")))
def test_dense_wide_variant(kw):
    check_dense_wide(**kw)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("tile", ["wide", "split"])
def test_wide_and_split_sa_smem(tile, kernel_launches):
    """The wide and split tiles with A's scales through shared memory (MN-major scales: SA_SMEM by launch's
    policy): ragged M and N, 1-3 K-slices and many, fewer programs than tiles, a graph replay.  The spy tells
    that the variant ran with SA_SMEM."""
    gg = _gg()
    cfg = gg.wide_config() if tile == "wide" else gg.split_config()
    for kw in (dict(m=4096, n=2112, k=7168), dict(m=300, n=1000, k=384), dict(m=129, n=200, k=128),
               dict(m=1000, n=4104, k=640, num_sms=7), dict(m=512, n=2048, k=2048, graph=True)):
        res = check_dense(config=cfg, sfa_layout="mn", **kw)
        assert tuple(res["block"]) == (cfg.block_m, cfg.block_n), res
    ran = [(launch["WIDE_N"], launch["SA_SMEM"]) for launch in kernel_launches]
    assert ran and all(r == (True, True) for r in ran), ran


@pytest.mark.gpu
@pytest.mark.sm90
def test_wide_variant_falls_back_where_unsupported():
    cfg = _gg().wide_config()
    res = check_dense(300, 520, 768, out_dtype=torch.float32, with_c=True, config=cfg)
    assert tuple(res["block"]) != (128, 256)
    check_masked(3, 150, 272, 384, [150, 0, 65], 60, config=cfg)
    check_contiguous([130, 5], 200, 384, config=cfg)


# 128x128 + 16 remainder-tail tiles (GluonConfig.bn_tail): N = 128 q + r as q tile columns.  Cases: the row it is
# picked for (m4096 n576), rows not a multiple of 128 with an odd K-slice count (the odd-K tail branch), several
# tiles per program (num_sms=7), r = 64 shared by 4 of 8 blocks (the others compute a repeated slice and must not
# store it), FP32 + C, MN-major scales, graph replay; masked (without signal) and contiguous forms; a width the
# tail cannot take (falls back).
TAIL_CASES = [
    dict(m=4096, n=576, k=7168), dict(m=300, n=576, k=384), dict(m=256, n=1088, k=640, num_sms=7),
    dict(m=200, n=2112, k=256, out_dtype=torch.float32, with_c=True), dict(m=129, n=144, k=1536, sfa_layout="mn"),
    dict(m=512, n=576, k=2048, graph=True),
]


@pytest.fixture
def kernel_launches(monkeypatch):
    """The arguments of every launch of the Gluon GEMM kernel during the test by name (it still runs), so a
    test can tell which variant ran: a silent fallback gives the same output."""
    gg = _gg()
    real = gg.fp8_gemm_ws_kernel
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(dict(zip(real.arg_names, args), **kw, grid=grid))
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(gg, "fp8_gemm_ws_kernel", Spy())
    return seen


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("kw", TAIL_CASES, ids=lambda kw: "x".join(str(kw[k]) for k in ("m", "n", "k")))
def test_dense_tail(kw, kernel_launches):
    gg = _gg()
    assert gg.tail_ok(kw["n"])
    check_dense(config=gg.tail_config(), **kw)
    ran = [launch.get("BN_TAIL", 0) for launch in kernel_launches]
    assert ran and all(t == 16 for t in ran), ran          # the tail kernel, not the plain fallback


@pytest.mark.gpu
@pytest.mark.sm90
def test_dense_whole_m_order(kernel_launches):
    """Whole-M tile order (``group_m`` 0, picked by ``whole_m_order`` for short-K dense calls with a small A):
    ragged M and N, fewer programs than tiles (each walks several n-blocks), both scale layouts, a graph replay,
    A's scales through shared memory, and the remainder-tail kernel's walk (N = 5 x 128 + 16).  The spy tells
    that the order was compiled in, and that the tail kernel ran."""
    gg = _gg()
    assert gg.whole_m_order("dense", 1100, 384, 128)
    check_dense(1100, 1000, 384)
    check_dense(2000, 3000, 512, num_sms=7)
    check_dense(1300, 2200, 1536, sfa_layout="mn", graph=True)
    check_dense(4096, 24576, 1536)
    check_dense(1200, 600, 2048, config=gg.GluonConfig(128, 128, 4, 8, group_m=0, sa_smem=True), sfa_layout="mn")
    assert gg.tail_ok(656)
    check_dense(1200, 656, 4096, config=gg.tail_config(group_m=0))
    assert kernel_launches[-1].get("BN_TAIL") == 16
    orders = [launch["GROUP_M"] for launch in kernel_launches]
    assert orders and all(g == 0 for g in orders), orders


@pytest.mark.gpu
@pytest.mark.sm90
def test_tail_grouped_and_fallback(kernel_launches):
    gg = _gg()
    cfg = gg.tail_config()
    def tails(case):
        n0 = len(kernel_launches)
        case()
        return [launch.get("BN_TAIL", 0) for launch in kernel_launches[n0:]]

    assert tails(lambda: check_masked(3, 150, 272, 384, [150, 0, 65], 60, signal=False, config=cfg)) == [16]
    assert tails(lambda: check_masked(3, 150, 272, 384, [150, 0, 65], 60, signal=True, config=cfg)) == [0]
    assert tails(lambda: check_contiguous([130, 5], 144, 384, config=cfg)) == [16]
    assert tails(lambda: check_contiguous([300, 0, 77], 272, 640, config=cfg)) == [16]
    assert tails(lambda: check_dense(300, 200, 384, config=cfg)) == [0]           # r = 72: the plain kernel
    if _sms() == 132:
        assert gg.pick_config("dense", 4096, 576, 7168, tma_store=True, num_sms=132).bn_tail == 16


# A ragged N as two launches (full 128-column blocks, then the remainder on a side stream, joined back):
# the outputs of both parts, FP32 + C, graph capture of the fork/join, and an explicit config (one launch).
SPLIT_CASES = [dict(m=4096, n=2112, k=256), dict(m=4096, n=1088, k=384, out_dtype=torch.float32, with_c=True),
               dict(m=4000, n=2112, k=256, graph=True, sfa_layout="mn")]


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("kw", SPLIT_CASES, ids=lambda kw: "x".join(str(kw[k]) for k in ("m", "n", "k")))
def test_dense_split_n(kw, kernel_launches):
    gg = _gg()
    cfg = gg.pick_config("dense", kw["m"], kw["n"], kw["k"], tma_store="with_c" not in kw, num_sms=_sms(),
                         out_bytes=4 if "out_dtype" in kw else 2, has_c="with_c" in kw)
    nm = gg.split_n_columns(kw["m"], kw["n"], kw["k"], cfg, _sms())
    if _sms() == 132:
        assert nm > 0
    check_dense(**kw)
    if nm:      # two launches (graph: one outside the capture, two captured), the second on the remainder
        assert {launch["N"] for launch in kernel_launches} == {nm, kw["n"] - nm}, kernel_launches
    n0 = len(kernel_launches)
    check_dense(config=cfg, **kw)
    assert len(kernel_launches) - n0 == (2 if kw.get("graph") else 1)   # an explicit config: one launch


# Row-major A scales copied MN-major for SA_SMEM (gemm_gluon.TRANSPOSE_ROW_MAJOR_FOR_SA, on by default):
# dense (one launch; two launches on two streams for a ragged N) and contiguous calls run the SA_SMEM kernel
# and stay exact; short K keeps the plain kernel.
@pytest.mark.gpu
@pytest.mark.sm90
def test_row_major_scales_transposed_for_sa_smem(kernel_launches, monkeypatch):
    gg = _gg()
    monkeypatch.setattr(gg, "TRANSPOSE_ROW_MAJOR_FOR_SA", True)
    monkeypatch.delenv("FP8GEMM_GLUON_SA_SMEM", raising=False)
    check_dense(1000, 1024, 1024)
    check_dense(1000, 2112, 1024)                       # split into two launches: both with SA_SMEM
    check_contiguous([300, 0, 129, 512], 512, 1024)
    assert kernel_launches and all(launch["SA_SMEM"] for launch in kernel_launches)
    kernel_launches.clear()
    check_dense(1000, 1024, 512)                        # 4 K-slices: no copy, no SA_SMEM at 1000 rows
    assert kernel_launches and not any(launch["SA_SMEM"] for launch in kernel_launches)



# SBO ordering: a block's signal must not be observable before its rows of D are.  A watcher kernel on a side stream
# spins on each counter (acquire) and copies the block's rows the moment it sees the counter complete; the GEMM
# runs beside it on the SMs the watcher leaves.  Its snapshot must equal the final D (D starts as NaN: a signal
# published before the block's writes were complete would leave NaN or stale rows in the snapshot).  The control:
# counters already complete when the watcher starts give a snapshot with NaN, i.e. the watcher does see early ones.
def _watcher():
    import triton
    import triton.language as tl

    @triton.jit
    def watch(sig_ptr, masked_m_ptr, d_ptr, snap_ptr, seen_ptr, num_blocks, blocks_per_group, max_m, N, threshold,
              max_spins, BM: tl.constexpr, BN: tl.constexpr):
        pid = tl.program_id(0)
        rows = tl.arange(0, BM)
        cols = tl.arange(0, BN)
        for b in range(pid, num_blocks, tl.num_programs(0)):
            g = b // blocks_per_group
            r0 = (b % blocks_per_group) * BM
            limit = tl.minimum(tl.load(masked_m_ptr + g), max_m)
            if r0 < limit:
                seen = tl.atomic_add(sig_ptr + b, 0, sem="acquire", scope="gpu")
                spins = 0
                while (seen < threshold) & (spins < max_spins):
                    seen = tl.atomic_add(sig_ptr + b, 0, sem="acquire", scope="gpu")
                    spins += 1
                tl.store(seen_ptr + b, seen)        # what the watcher saw (< threshold: it gave up)
                r = r0 + rows
                base = (g * max_m + r).to(tl.int64) * N
                for c0 in range(0, N, BN):
                    c = c0 + cols
                    m = (r < limit)[:, None] & (c < N)[None, :]
                    v = tl.load(d_ptr + base[:, None] + c[None, :], mask=m)
                    tl.store(snap_ptr + base[:, None] + c[None, :], v, mask=m)
    return watch


def _watched_masked_run(preset: bool):
    gg = _gg()
    groups, max_m, n, k = 8, 1024, 2048, 2048
    masked = [1024, 700, 0, 1000, 129, 512, 1024, 64]
    a, b = _fp8(groups, max_m, k), _fp8(groups, n, k)
    sfa, sfb = _scales(groups, max_m, k // 128), _scales(groups, n // 128, k // 128)
    d = torch.full((groups, max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    snap = torch.full_like(d, float("nan"))
    masked_m = torch.tensor(masked, dtype=torch.int32, device="cuda")
    cfg = gg.GluonConfig(128, 128, 5, 8)
    bpg = max_m // 128
    sig = torch.zeros(groups * bpg, dtype=torch.int32, device="cuda")
    threshold = n // 128
    if preset:
        sig.fill_(threshold)
    seen = torch.full_like(sig, -1)
    watch = _watcher()
    # compile both kernels first: a launch that compiles would leave the watcher spinning alone for seconds
    kw = dict(masked_m=masked_m, expected_m=512, num_sms=_sms() - 8, config=cfg)
    gg.launch("masked", a, sfa, b, sfb, d.clone(), signal=torch.zeros_like(sig), **kw)
    watch[(4,)](torch.full_like(sig, threshold), masked_m, d, snap.clone(), seen.clone(), groups * bpg, bpg, max_m,
                n, threshold, 1, BM=128, BN=128)
    # both on streams of their own (not the legacy default stream, which would wait for the spinning watcher)
    side, main = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        watch[(4,)](sig, masked_m, d, snap, seen, groups * bpg, bpg, max_m, n, threshold, 1 << 20, BM=128, BN=128)
    with torch.cuda.stream(main):
        bm, bn = gg.launch("masked", a, sfa, b, sfb, d, signal=sig, **kw)
    torch.cuda.synchronize()
    assert (bm, bn) == (128, 128)
    gave_up = [i for i, v in enumerate(seen.tolist()) if 0 <= v < threshold]
    assert not gave_up, f"the watcher gave up on counters {gave_up[:8]} (saw {seen[gave_up[:8]].tolist()})"
    if not preset:
        check_signal(sig, masked_m, max_m, n, bm, threshold)
    got_d = torch.cat([d[g, :mm] for g, mm in enumerate(masked)])
    got_snap = torch.cat([snap[g, :mm] for g, mm in enumerate(masked)])
    return got_d, got_snap


@pytest.mark.gpu
@pytest.mark.sm90
def test_signal_never_precedes_the_rows_it_publishes():
    gg = _gg()
    assert gg.SIGNAL_TMA_STORE
    for _ in range(5):
        got_d, got_snap = _watched_masked_run(preset=False)
        assert not got_d.isnan().any()
        assert torch.equal(got_snap.view(torch.int16), got_d.view(torch.int16)), \
            f"{int(got_snap.isnan().sum())} NaN in the watcher's snapshot"
    got_d, got_snap = _watched_masked_run(preset=True)
    assert got_snap.isnan().any(), "control: counters complete before the GEMM ran must give an early snapshot"
