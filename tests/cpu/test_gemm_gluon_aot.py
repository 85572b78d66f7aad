"""CPU tests of the Gluon FP8 GEMM (fp8gemm.kernels.gemm_gluon): it imports without a GPU, declines
CPU tensors, picks sane tiles, and compiles ahead of time for sm_90a with QGMMA, no local memory, and
without ptxas serialising its asynchronous MMAs (the overlap of MMA and scale promotion depends on it).
"""
from __future__ import annotations

import re

import pytest
import torch

from fp8gemm import reference as R
from fp8gemm.kernels import gemm_gluon as gg
from fp8gemm.testing import compile_sm90_in_subprocess, ptxas_log, sass_count

FP8 = torch.float8_e4m3fn


def test_import_and_supports_on_cpu():
    a = torch.zeros(128, 256, dtype=FP8)
    assert gg.supports("dense", a, torch.ones(128, 2), a, torch.ones(1, 2),
                       torch.zeros(128, 128, dtype=torch.bfloat16)) is False
    assert gg.supports("nonsense", a, None, a, None, None) is False


def test_pick_config():
    big = gg.pick_config("dense", 4096, 4096, 7168, tma_store=True)
    assert (big.block_m, big.block_n, big.num_warps) == (128, 128, 8)
    small = gg.pick_config("dense", 64, 4096, 7168)
    assert small.block_m == 64 and small.block_n <= 64 and small.num_warps == 4
    capped = gg.pick_config("dense", 4096, 4096, 7168, max_block_n=64)
    assert capped.block_n <= 64
    for cfg in (big, small, capped):
        assert cfg.stages >= 2
        stage = (cfg.block_m + cfg.block_n) * gg.BLOCK_K
        assert cfg.stages * stage + cfg.block_m * cfg.block_n * 4 <= 227 * 1024
    # 12 warps (8 consumer + a producer warpgroup) share the register file at launch
    assert big.maxnreg * (8 + 4) * 32 <= 65536 and small.maxnreg <= 255


def test_pick_config_whole_m_order():
    """Short-K dense calls with a small A walk their tiles in whole-M order (group_m 0); long K, few m-blocks and
    grouped calls keep groups of 8 (RESULTS.md session 12)."""
    for n, k in ((32768, 512), (24576, 1536), (7168, 2048)):
        assert gg.pick_config("dense", 4096, n, k, tma_store=True, num_sms=132).group_m == 0
    for m, n, k in ((4096, 4096, 7168), (4096, 7168, 16384), (1024, 32768, 512), (8192, 4096, 2048),
                    (4096, 2112, 4096)):
        assert gg.pick_config("dense", m, n, k, tma_store=True, num_sms=132).group_m == 8, (m, n, k)
    assert gg.pick_config("contiguous", 4096, 4096, 512, num_sms=132).group_m == 8
    assert gg.pick_config("masked", 4096, 4096, 512, groups=4, expected_m=1024, num_sms=132).group_m == 8
    assert gg.whole_m_order("dense", 1025, 2048, 128) and not gg.whole_m_order("dense", 1024, 2048, 128)


@pytest.mark.parametrize("groups,n,k,want_bn", [
    (6, 6144, 7168, 64), (6, 7168, 3072, 128), (6, 4096, 4096, 64), (6, 4096, 2048, 64),
    (32, 6144, 7168, 128), (32, 7168, 3072, 128), (32, 4096, 4096, 128), (32, 4096, 2048, 128)])
def test_pick_config_masked_decode_tiles(groups, n, k, want_bn):
    """Masked decode (expected_m 20): the tile each ANCHORS row got on the H100 sweep
    (benchmarks/masked_tiles.py): 64x64 where 64x128 leaves a ragged last wave, K rotation on; larger
    expected_m and dense calls keep their model picks without rotation."""
    cfg = gg.pick_config("masked", 4096, n, k, groups=groups, expected_m=20, num_sms=132)
    assert (cfg.block_m, cfg.block_n, cfg.k_rotate) == (64, want_bn, True)
    assert not gg.pick_config("masked", 4096, n, k, groups=groups, expected_m=1024, num_sms=132).k_rotate
    assert not gg.pick_config("dense", 64, n, k, tma_store=True, num_sms=132).k_rotate


def test_tma_store_decision():
    """Which calls store D by TMA (:func:`gemm_gluon._problem`): BF16 without C in every mode, a 16-byte row
    pitch, and for the masked layout only a D that is one [G * max_m, N] matrix (the kernel then stores a
    group's full blocks by TMA and the rest through registers); FP32, C, or another layout: register stores.
    Masked calls with an SBO signal too while SIGNAL_TMA_STORE; ``launch`` turns it off for the tail kernel."""
    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16
    a2, b2 = torch.zeros(256, 256, dtype=fp8), torch.zeros(128, 256, dtype=fp8)
    a3, b3 = torch.zeros(3, 64, 256, dtype=fp8), torch.zeros(3, 128, 256, dtype=fp8)
    tma = lambda mode, a, b, d, c=None: gg._problem(mode, a, b, d, c)[4]   # noqa: E731
    assert tma("dense", a2, b2, torch.zeros(256, 128, dtype=bf16))
    assert not tma("dense", a2, b2, torch.zeros(256, 128))                                   # FP32
    assert not tma("dense", a2, b2, torch.zeros(256, 128), torch.zeros(256, 128))            # C
    assert tma("contiguous", a2, b3, torch.zeros(256, 128, dtype=bf16))
    assert not tma("contiguous", a2, b3, torch.zeros(256, 132, dtype=bf16)[:, :120])         # 264-byte pitch
    assert tma("masked", a3, b3, torch.zeros(3, 64, 128, dtype=bf16))
    assert not tma("masked", a3, b3, torch.zeros(3, 80, 128, dtype=bf16)[:, :64])            # groups apart
    assert not tma("masked", a3, b3, torch.zeros(3, 64, 128))
    # an SBO signal: TMA stores while SIGNAL_TMA_STORE (each TMA-stored block signalled once its writes are
    # complete), register stores without it
    d3 = torch.zeros(3, 64, 128, dtype=bf16)
    sig = torch.zeros(3, dtype=torch.int32)
    assert gg.SIGNAL_TMA_STORE is True and gg._problem("masked", a3, b3, d3, None, signal=sig)[4]
    old_sig = gg.SIGNAL_TMA_STORE
    try:
        gg.SIGNAL_TMA_STORE = False
        assert not gg._problem("masked", a3, b3, d3, None, signal=sig)[4]
    finally:
        gg.SIGNAL_TMA_STORE = old_sig
    # PDL (the FP4 convert route): grouped calls store by TMA while GROUPED_TMA_STORE_UNDER_PDL (on since
    # test_pdl_gpu.py passed with it, session 9), register stores without it
    assert gg.GROUPED_TMA_STORE_UNDER_PDL is True
    assert gg._problem("masked", a3, b3, d3, None, pdl=True)[4]
    assert gg._problem("contiguous", a2, b3, torch.zeros(256, 128, dtype=bf16), None, pdl=True)[4]
    assert gg._problem("dense", a2, b2, torch.zeros(256, 128, dtype=bf16), None, pdl=True)[4]
    old = gg.GROUPED_TMA_STORE_UNDER_PDL
    try:
        gg.GROUPED_TMA_STORE_UNDER_PDL = False
        assert not gg._problem("masked", a3, b3, d3, None, pdl=True)[4]
        assert not gg._problem("contiguous", a2, b3, torch.zeros(256, 128, dtype=bf16), None, pdl=True)[4]
        assert gg._problem("dense", a2, b2, torch.zeros(256, 128, dtype=bf16), None, pdl=True)[4]
    finally:
        gg.GROUPED_TMA_STORE_UNDER_PDL = old


def test_stages_count_a_scales_only_with_sa_smem():
    """A stage holds the A and B boxes, and A's scales only for the SA_SMEM kernel (launch then keeps the stages
    that still fit): the configs picked without it keep their stage counts."""
    assert gg._stages(128, 16, 128 * 16 * 2) == 12 and gg._stages(128, 16, 128 * 16 * 2, sa_smem=True) == 11
    assert gg._stages(128, 128, 128 * 128 * 2) == gg._stages(128, 128, 128 * 128 * 2, sa_smem=True) == 5
    for bm in (64, 128):
        for bn in (16, 32, 64, 128):
            epi = gg._epi_bytes(bm, bn, True, 2, False)
            stages = gg._stages(bm, bn, epi, sa_smem=True)
            assert stages * ((bm + bn) * gg.BLOCK_K + 4 * bm) + epi <= gg._SMEM_BUDGET


def test_fit_stages_counts_both_grouped_epilogue_buffers():
    """launch's hard check (:func:`gemm_gluon._fit_stages`): a grouped call with TMA stores has the TMA tile and
    the register stores' scratch.  The masked decode tile (64x64, 13 stages) with A's scales in shared memory
    asked 232924 bytes of the 232448 an H200 block may use (test_pdl_gpu.py, session 9): one stage less now;
    the picks that fit keep their stages."""
    epi_grouped = gg._epi_bytes(64, 64, True, 2, False, grouped=True)
    assert epi_grouped == 64 * 64 * 2 * 2 and gg._epi_bytes(64, 64, True, 2, False) == 64 * 64 * 2
    assert gg._fit_stages(64, 64, 13, epi_grouped, sa_smem=True) == 12
    assert gg._fit_stages(64, 64, 13, epi_grouped, sa_smem=False) == 13       # 229596 bytes measured: fits
    assert gg._fit_stages(128, 128, 5, gg._epi_bytes(128, 128, True, 2, False, grouped=True), sa_smem=True) == 5
    assert gg._fit_stages(128, 128, 5, gg._epi_bytes(128, 128, True, 2, False), sa_smem=False) == 5
    for bm in (64, 128):
        for bn in (16, 32, 64, 128):
            for tma in (False, True):
                for sa in (False, True):
                    epi = gg._epi_bytes(bm, bn, tma, 2, False, grouped=True)
                    st = gg._fit_stages(bm, bn, 16, epi, sa)
                    assert st * ((bm + bn) * gg.BLOCK_K + (4 * bm if sa else 0) + 16) + epi + 256 <= 227 * 1024


def test_sa_smem_policy(monkeypatch):
    """Where A's scales go through shared memory by default (measured, RESULTS.md session 9): MN-major scales,
    row-major ones only for dense calls of at most 256 rows; grouped calls with MN-major scales only (while
    SA_SMEM_GROUPED); the environment forces either way and rejects anything but 0/1."""
    mn = torch.empty(56, 4096).t()                 # [4096, 56], M contiguous
    row = torch.empty(4096, 56)
    assert gg.sa_smem_pays("dense", 4096, mn) and not gg.sa_smem_pays("dense", 4096, row)
    assert gg.sa_smem_pays("dense", 128, row[:128]) and gg.sa_smem_pays("dense", 256, row[:256])
    assert not gg.sa_smem_pays("dense", 257, row[:257])
    g_mn = torch.empty(4, 56, 512).transpose(1, 2)
    assert gg.SA_SMEM_GROUPED is True and gg.sa_smem_pays("masked", 512, g_mn)
    assert gg.sa_smem_pays("contiguous", 512, g_mn[0])
    assert not gg.sa_smem_pays("masked", 64, torch.empty(4, 64, 56))
    assert not gg.sa_smem_pays("contiguous", 64, torch.empty(64, 56))
    monkeypatch.delenv("FP8GEMM_GLUON_SA_SMEM", raising=False)
    assert gg.runtime.gluon_sa_smem() is None
    monkeypatch.setenv("FP8GEMM_GLUON_SA_SMEM", "0")
    assert gg.runtime.gluon_sa_smem() is False
    monkeypatch.setenv("FP8GEMM_GLUON_SA_SMEM", "1")
    assert gg.runtime.gluon_sa_smem() is True
    monkeypatch.setenv("FP8GEMM_GLUON_SA_SMEM", "yes")
    with pytest.raises(ValueError, match="FP8GEMM_GLUON_SA_SMEM"):
        gg.runtime.gluon_sa_smem()


def test_pick_config_wide_is_opt_in():
    """The 128x256 variant (GluonConfig.wide_n) is chosen only when asked for (or WIDE_N_DEFAULT is flipped),
    only for dense BF16 TMA-store calls, and its config fits the SM."""
    assert gg.WIDE_N_DEFAULT is False
    for n, k in [(2112, 7168), (4096, 7168), (7168, 16384)]:
        assert not gg.pick_config("dense", 4096, n, k, tma_store=True).wide_n
    wide = gg.pick_config("dense", 4096, 4096, 7168, tma_store=True, wide_n=True)
    assert wide == gg.wide_config() and (wide.block_m, wide.block_n, wide.num_warps) == (128, 256, 4)
    assert wide.stages == 4
    assert wide.stages * (128 + 256) * gg.BLOCK_K + 2 * 64 * 128 * 2 <= 227 * 1024 - 1024
    assert wide.maxnreg * 12 * 32 <= 65536            # 4 + 4 consumer warps + a producer warpgroup
    # never for the grouped modes, FP32 output, or small m
    assert not gg.pick_config("dense", 4096, 4096, 7168, tma_store=False, out_bytes=4, wide_n=True).wide_n
    assert not gg.pick_config("masked", 4096, 4096, 7168, groups=6, expected_m=1024, wide_n=True).wide_n
    assert not gg.pick_config("dense", 128, 4096, 7168, tma_store=True, wide_n=True).wide_n
    assert not gg.pick_config("dense", 4096, 4096, 7168, tma_store=True, max_block_n=128, wide_n=True).wide_n


if not gg.HAS_GLUON:  # pragma: no cover
    pytest.skip("triton without Gluon", allow_module_level=True)


def _signature(mode, bm, bn, tma_store, out_dtype, has_c):
    from triton.runtime.jit import mangle_type
    a = torch.empty(256, 512, dtype=FP8)
    d = torch.empty(256, 256, dtype=out_dtype)
    sig = {
        "a_desc": mangle_type(gg._desc2d(a, 256, (bm, 128), "fp8")),
        "b_desc": mangle_type(gg._desc2d(a, 256, (bn, 128), "fp8")),
        "d_ptr": "*bf16" if out_dtype == torch.bfloat16 else "*fp32",
        "c_ptr": "*fp32" if has_c else ("*bf16" if out_dtype == torch.bfloat16 else "*fp32"),
        "sfa_ptr": "*fp32", "sfb_ptr": "*fp32", "masked_m_ptr": "*i32", "m_indices_ptr": "*i32",
        "signal_ptr": "*i32",
    }
    if tma_store:
        sig["d_desc"] = mangle_type(gg._desc2d(d, 256, (bm, bn), "bf16"))
    for name in ("M", "N", "K", "G", "s_dg", "s_dm", "s_cg", "s_cm", "s_ag", "s_am", "s_ak", "s_bg", "s_bn", "s_bk"):
        sig[name] = "i32"
    return sig


VARIANTS = [
    # mode, block_m, block_n, tma_store, out, has_c, signal, k_rotate
    ("dense", 128, 128, True, torch.bfloat16, False, False, False),
    ("dense", 64, 32, True, torch.bfloat16, False, False, True),
    ("dense", 128, 128, False, torch.float32, True, False, False),
    ("masked", 64, 128, False, torch.bfloat16, False, True, False),
    ("contiguous", 128, 64, False, torch.bfloat16, False, False, False),
    # grouped modes with the TMA store of full blocks (register stores for the partial ones)
    ("masked", 128, 128, True, torch.bfloat16, False, False, False),
    ("contiguous", 128, 128, True, torch.bfloat16, False, False, False),
    # SBO signals with TMA stores (SIGNAL_TMA_STORE): each TMA-stored block signalled once its writes are complete
    ("masked", 128, 128, True, torch.bfloat16, False, True, False),
    ("masked", 64, 64, True, torch.bfloat16, False, True, True),
]


@pytest.mark.parametrize("sa_smem", [True, False], ids=["sa_smem", "sa_global"])
@pytest.mark.parametrize("mode,bm,bn,tma_store,out,has_c,signal,k_rotate", VARIANTS)
def test_aot_sm90a(tmp_path, mode, bm, bn, tma_store, out, has_c, signal, k_rotate, sa_smem):
    """Every variant compiles for sm_90a with FP8 QGMMAs, no local memory, the MMAs asynchronous; with A's
    scales through shared memory (SA_SMEM, the default) the producer's cp.async copies arrive on the stage's
    full barrier; without (the probe's and DIAG's kernel) there is no cp.async at all."""
    # the stages launch gives it (A's scales take room in each stage with SA_SMEM)
    cfg = gg.GluonConfig(bm, bn, gg._stages(bm, bn, bm * bn * 4, sa_smem=sa_smem), 8 if bm == 128 else 4,
                         k_rotate=k_rotate)
    constexprs = dict(MODE=gg._MODES[mode], BLOCK_M=bm, BLOCK_N=bn, GROUP_M=cfg.group_m, STAGES=cfg.stages,
                      TMA_STORE=tma_store, HAS_C=has_c, HAS_SIGNAL=signal, SB_SCALAR=(128 % bn == 0),
                      K_ROTATE=k_rotate, PRODUCER_REGS=cfg.producer_regs, SA_SMEM=sa_smem)
    if not tma_store:
        constexprs["d_desc"] = None
    if signal:
        constexprs["SIG_WARP"] = gg.SIGNAL_WARP         # as launch builds it
    r = compile_sm90_in_subprocess("fp8gemm.kernels.gemm_gluon", "fp8_gemm_ws_kernel",
                                   _signature(mode, bm, bn, tma_store, out, has_c), constexprs,
                                   num_warps=cfg.num_warps, gluon=True, maxnreg=cfg.maxnreg,
                                   divisible_by_16=["sfa_ptr", "sfb_ptr", "d_ptr", "c_ptr", "N", "K", "s_dm"])
    assert sass_count(r["sass"], "QGMMA") >= 8, "no FP8 tensor-core MMA in the SASS"
    assert r["local"] == 0 and r["stack"] == 0, (r["local"], r["stack"])
    assert sass_count(r["sass"], "LDL") == 0 and sass_count(r["sass"], "STL") == 0
    assert 0 < r["regs"] <= 255
    assert r["shared"] <= 227 * 1024
    if signal:
        assert "atom.global.gpu.release.add" in r["ptx"]
        # a TMA-stored block's signal waits for the store's writes (not only its shared-memory read), then a
        # proxy fence; register-store kernels have neither
        full_wait = re.search(r"cp\.async\.bulk\.wait_group 0;\s*fence\.proxy\.async\.global;", r["ptx"])
        assert bool(full_wait) == tma_store, "TMA-stored blocks must be signalled after their writes complete"
        # the release (MEMBAR.GPU) only in the signal warp, once: the consumer hands tiles off through barriers
        assert sass_count(r["sass"], "MEMBAR.ALL.GPU") == 1 and sass_count(r["sass"], "REDG.E.ADD") == 1
    if sa_smem:
        assert "cp.async.ca.shared.global" in r["ptx"]
        # each producer lane's arrival counts toward the full barrier's 33 (see _copy_sa): .noinc, and the count
        assert "cp.async.mbarrier.arrive.noinc.shared" in r["ptx"]
        assert re.search(r"mbarrier\.init\.shared(::cta)?\.b64 \[[^\]]*\], 33;", r["ptx"]), "full barrier count"
        assert "cp.async.wait" not in r["ptx"]        # the full barrier alone tracks the copies
    else:
        assert "cp.async.ca" not in r["ptx"] and "cp.async.mbarrier" not in r["ptx"]
    # ptxas must keep the MMAs asynchronous: C7514/C7515 mean it serialised them (waits after each).
    log = ptxas_log(r["ptx"])
    assert "C7514" not in log and "C7515" not in log, log


def test_aot_sm90a_whole_m_order(tmp_path):
    """The dense kernel in whole-M tile order (GROUP_M 0, what pick_config gives short-K calls with a small A):
    FP8 QGMMAs, no local memory, the MMAs asynchronous, and a different kernel from the grouped order's (the
    order is really compiled in: the PTX differs)."""
    cfg = gg.GluonConfig(128, 128, gg._stages(128, 128, 128 * 128 * 2, sa_smem=True), 8)

    def build(group_m):
        constexprs = dict(MODE=0, BLOCK_M=128, BLOCK_N=128, GROUP_M=group_m, STAGES=cfg.stages, TMA_STORE=True,
                          HAS_C=False, HAS_SIGNAL=False, SB_SCALAR=True, K_ROTATE=False,
                          PRODUCER_REGS=cfg.producer_regs, SA_SMEM=True)
        return compile_sm90_in_subprocess("fp8gemm.kernels.gemm_gluon", "fp8_gemm_ws_kernel",
                                          _signature("dense", 128, 128, True, torch.bfloat16, False), constexprs,
                                          num_warps=cfg.num_warps, gluon=True, maxnreg=cfg.maxnreg,
                                          divisible_by_16=["sfa_ptr", "sfb_ptr", "d_ptr", "c_ptr", "N", "K", "s_dm"])
    r = build(0)
    assert sass_count(r["sass"], "QGMMA") >= 8
    assert r["local"] == 0 and r["stack"] == 0, (r["local"], r["stack"])
    assert sass_count(r["sass"], "LDL") == 0 and sass_count(r["sass"], "STL") == 0
    log = ptxas_log(r["ptx"])
    assert "C7514" not in log and "C7515" not in log, log
    assert r["ptx"] != build(8)["ptx"]


@pytest.mark.parametrize("tile,sa_smem", [("wide", False), ("wide", True), ("split", True)])
def test_aot_sm90a_wide(tmp_path, tile, sa_smem):
    """The opt-in 128x256 variant: two one-warpgroup consumer partitions (8 QGMMA each per K-slice pair of
    halves), 4 x 48 KB stages + two [64, 128] epilogue buffers within 227 KB, no spills, MMAs asynchronous.
    With A's scales through shared memory (SA_SMEM, the stages launch gives it: still 4 for wide) the producer's
    copies arrive on the full barrier (count 33) and each warpgroup reads its 64 rows from the stage; the split
    128x128 form the same."""
    cfg = gg.wide_config() if tile == "wide" else gg.split_config()
    bn = cfg.block_n
    stages = cfg.stages
    if sa_smem:
        stages = min(stages, gg.wide_sa_stages(bn))      # as launch fits them
        assert stages == cfg.stages, "the SA scales must not cost a stage"
    constexprs = dict(MODE=0, BLOCK_M=128, BLOCK_N=bn, GROUP_M=cfg.group_m, STAGES=stages, TMA_STORE=True,
                      HAS_C=False, HAS_SIGNAL=False, SB_SCALAR=bn == 128, K_ROTATE=False,
                      PRODUCER_REGS=cfg.producer_regs, WIDE_N=True, SA_SMEM=sa_smem)
    # boxes: A 64 rows (one per warpgroup), B 128 rows (one per half), D 64 x 128
    r = compile_sm90_in_subprocess("fp8gemm.kernels.gemm_gluon", "fp8_gemm_ws_kernel",
                                   _signature("dense", 64, 128, True, torch.bfloat16, False), constexprs,
                                   num_warps=cfg.num_warps, gluon=True, maxnreg=cfg.maxnreg,
                                   divisible_by_16=["sfa_ptr", "sfb_ptr", "d_ptr", "c_ptr", "N", "K", "s_dm"])
    assert sass_count(r["sass"], "QGMMA") >= (16 if bn == 256 else 8), "expected the MMAs of both partitions"
    assert "QGMMA.64x128x32" in r["sass"]
    assert r["local"] == 0 and r["stack"] == 0, (r["local"], r["stack"])
    assert sass_count(r["sass"], "LDL") == 0 and sass_count(r["sass"], "STL") == 0
    want = stages * ((128 + bn) * 128 + (4 * 128 if sa_smem else 0)) + 2 * 64 * 128 * 2
    assert r["shared"] >= want, r["shared"]   # buffers not aliased
    assert r["shared"] <= 227 * 1024
    # the worker consumer warpgroup really gets the consumer's register budget
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+232;", r["ptx"])
    if sa_smem:
        assert "cp.async.mbarrier.arrive.noinc.shared" in r["ptx"]
        assert re.search(r"mbarrier\.init\.shared(::cta)?\.b64 \[[^\]]*\], 33;", r["ptx"]), "full barrier count"
    else:
        assert "cp.async.ca" not in r["ptx"]
    log = ptxas_log(r["ptx"])
    assert "C7514" not in log and "C7515" not in log, log
    assert "spill" not in log or "0 bytes spill stores" in log, log


# ------------------------------------------------------------------------------------------------
# Cycle probe (PROBE=True, benchmarks/gluon_probe.py): it compiles cleanly, and with PROBE off the
# production kernel is the one committed before the probe existed.
# ------------------------------------------------------------------------------------------------

# sha256 of cuobjdump -sass of the production dense 128x128 BF16 TMA-store kernel (pick_config for
# 4096x4096x7168: 5 stages, 8 consumer warps), recorded with triton 3.6.0 at the commit before the probe
# was added and unchanged by it.  A deliberate kernel change must update it (after checking its SASS).
_PROD_SASS_SHA256 = {"3.6.0": "bbdd37ed050fed1e"}
_CLOCK_SASS = re.compile(r"SR_CLOCK|SR_GLOBALTIMER|CLOCKLO|CLOCKHI")


def _compile_prod_128(probe=None, sa_smem=None):
    """The dense 128x128 kernel of 4096x4096x7168; ``sa_smem`` None: as launch builds it for row-major scales (A's
    scales loaded from global memory, :func:`gemm_gluon.sa_smem_pays`)."""
    cfg = gg.pick_config("dense", 4096, 4096, 7168, tma_store=True)
    assert (cfg.block_m, cfg.block_n, cfg.stages, cfg.num_warps) == (128, 128, 5, 8)
    if sa_smem is None:
        sa_smem = gg.sa_smem_pays("dense", 4096, torch.empty(4096, 56)) and not probe
    constexprs = dict(MODE=0, BLOCK_M=128, BLOCK_N=128, GROUP_M=cfg.group_m, STAGES=cfg.stages, TMA_STORE=True,
                      HAS_C=False, HAS_SIGNAL=False, SB_SCALAR=True, K_ROTATE=False, PRODUCER_REGS=cfg.producer_regs,
                      SA_SMEM=sa_smem)
    sig = _signature("dense", 128, 128, True, torch.bfloat16, False)
    div16 = ["sfa_ptr", "sfb_ptr", "d_ptr", "c_ptr", "N", "K", "s_dm"]
    if probe is not None:
        constexprs["PROBE"] = probe
        if probe:
            sig["probe_ptr"] = "*i64"       # what the JIT makes of an int64 torch tensor (16-byte aligned)
            div16.append("probe_ptr")
    return compile_sm90_in_subprocess("fp8gemm.kernels.gemm_gluon", "fp8_gemm_ws_kernel", sig, constexprs,
                                      num_warps=cfg.num_warps, gluon=True, maxnreg=cfg.maxnreg,
                                      divisible_by_16=div16)


def _num_params(ptx: str) -> int:
    return len(re.findall(r"^\s*\.param\b", ptx, flags=re.M))


def test_aot_sm90a_probe(tmp_path):
    """PROBE=True: compiles, no local memory/spills, the MMAs stay asynchronous (the probe must time the
    real pipeline: same QGMMA/DEPBAR/bar.sync structure as the kernel it instruments, the one that loads A's
    scales from global memory), and the stamps are there."""
    prod = _compile_prod_128(sa_smem=False)
    r = _compile_prod_128(probe=True)
    assert r["local"] == 0 and r["stack"] == 0, (r["local"], r["stack"])
    assert sass_count(r["sass"], "LDL") == 0 and sass_count(r["sass"], "STL") == 0
    assert r["shared"] == prod["shared"] <= 227 * 1024
    assert _num_params(r["ptx"]) == _num_params(prod["ptx"]) + 1      # probe_ptr
    for op in ("QGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "BAR.SYNC", "SYNCS.ARRIVE"):
        assert sass_count(r["sass"], op) == sass_count(prod["sass"], op), op
    # the explicit barrier the probe puts before each full wait replaces the one membar inserts there
    assert r["ptx"].count("bar.sync \t0, 256;") == prod["ptx"].count("bar.sync \t0, 256;")
    assert r["ptx"].count("%clock64") >= 10 and r["ptx"].count("%globaltimer") == 2
    assert sass_count(r["sass"], "STG") >= 10 and len(_CLOCK_SASS.findall(r["sass"])) >= 10
    log = ptxas_log(r["ptx"])
    assert "C7514" not in log and "C7515" not in log, log
    assert "spill" not in log or "0 bytes spill stores" in log, log


def test_aot_sm90a_probe_off_is_production(tmp_path):
    """PROBE=False (the default) generates exactly the committed production kernel: no clock reads, no global
    stores (BF16 output goes out by TMA), no probe parameter, 16 QGMMA, and the SASS digest recorded before the
    probe was added (triton 3.6.0)."""
    import hashlib

    import triton
    default = _compile_prod_128()
    off = _compile_prod_128(probe=False)
    assert off["sass"] == default["sass"]
    sass, ptx = default["sass"], default["ptx"]
    assert not _CLOCK_SASS.search(sass)
    assert "%clock" not in ptx and "%globaltimer" not in ptx
    assert sass_count(sass, "STG") == 0 and sass_count(sass, "QGMMA") == 16
    assert _num_params(ptx) == 38             # the committed parameter list: no probe pointer
    want = _PROD_SASS_SHA256.get(triton.__version__)
    if want is not None:
        got = hashlib.sha256(sass.encode()).hexdigest()[:16]
        assert got == want, (f"production SASS changed ({got} != {want}); if the kernel change is deliberate, "
                             "check its SASS and update _PROD_SASS_SHA256")
    # A config leaves SA_SMEM to launch (sa_smem_pays); with row-major scales this is the kernel measured before.
    assert gg.GluonConfig(128, 128, 5, 8).sa_smem is None


@pytest.mark.parametrize("mode,out,has_c", [("dense", torch.bfloat16, False), ("dense", torch.float32, True),
                                            ("masked", torch.bfloat16, False), ("contiguous", torch.bfloat16, False)])
def test_aot_sm90a_tail(mode, out, has_c):
    """The BN_TAIL kernel (128x128 blocks + a 16-wide remainder slice each): compiles for sm_90a with the
    MMAs asynchronous (no C7514/C7515: both scratch pairs are pinned), 64x128 and 64x16 QGMMAs, within the
    shared memory, and no local memory in the K loop (a few registers spill around the tile epilogue, once a
    tile)."""
    from triton.runtime.jit import mangle_type
    cfg = gg.tail_config(out_bytes=out.itemsize)
    assert cfg.bn_tail == 16 and cfg.stages == (5 if out == torch.bfloat16 else 4)
    constexprs = dict(MODE=gg._MODES[mode], BLOCK_M=128, BLOCK_N=128, GROUP_M=cfg.group_m, STAGES=cfg.stages,
                      TMA_STORE=False, HAS_C=has_c, HAS_SIGNAL=False, SB_SCALAR=True, K_ROTATE=False,
                      PRODUCER_REGS=cfg.producer_regs, BN_TAIL=16, d_desc=None)
    sig = _signature(mode, 128, 128, False, out, has_c)
    sig["b2_desc"] = mangle_type(gg._desc2d(torch.empty(256, 512, dtype=FP8), 256, (16, 128), "fp8"))
    r = compile_sm90_in_subprocess("fp8gemm.kernels.gemm_gluon", "fp8_gemm_ws_kernel", sig, constexprs,
                                   num_warps=cfg.num_warps, gluon=True, maxnreg=cfg.maxnreg,
                                   divisible_by_16=["sfa_ptr", "sfb_ptr", "d_ptr", "c_ptr", "N", "K", "s_dm"])
    assert "QGMMA.64x128x32" in r["sass"] and "QGMMA.64x16x32" in r["sass"], "expected both MMAs"
    assert r["shared"] <= 227 * 1024 and r["stack"] <= 128, r["stack"]
    lines = [ln for ln in r["sass"].splitlines() if re.search(r"/\*[0-9a-f]{4,5}\*/", ln)]
    mma = [i for i, ln in enumerate(lines) if "QGMMA" in ln]
    assert not any(re.search(r"\b(STL|LDL)\b", ln) for ln in lines[mma[0]:mma[-1]]), "spills in the K loop"
    log = ptxas_log(r["ptx"])
    assert "C7514" not in log and "C7515" not in log, log


@pytest.mark.parametrize("m,n,k,tail", [
    (4096, 576, 7168, True), (8192, 576, 7168, True), (4096, 2112, 7168, False), (2048, 576, 7168, False),
    (4096, 1088, 2048, False), (128, 576, 7168, False), (4096, 4096, 7168, False)])
def test_pick_config_tail(m, n, k, tail):
    """The remainder-tail tile where the H100 A/B (benchmarks/tail_ab.py) measured it faster, nowhere else."""
    cfg = gg.pick_config("dense", m, n, k, tma_store=True, num_sms=132)
    assert (cfg.bn_tail == 16) == tail, cfg
    assert not gg.pick_config("contiguous", m, n, k, num_sms=132).bn_tail


@pytest.mark.parametrize("m,n,k,want", [(4096, 2112, 7168, 2048), (8192, 2112, 7168, 2048), (4096, 1088, 2048, 1024),
                                         (4096, 1088, 7168, 0), (4096, 7232, 2048, 0), (4096, 4096, 7168, 0),
                                         (4096, 576, 7168, 0), (64, 2112, 7168, 0)])
def test_split_n_columns(m, n, k, want):
    """Two launches (full blocks + remainder on a side stream) only where that saves a wave (H100 A/B rows);
    never for the tail tile (n576), 128-aligned N, or tiles other than 128x128."""
    cfg = gg.pick_config("dense", m, n, k, tma_store=True, num_sms=132)
    assert gg.split_n_columns(m, n, k, cfg, 132) == want


def test_tail_rules():
    assert gg.tail_ok(576) and gg.tail_ok(2112) and gg.tail_ok(4096 + 64)
    assert not gg.tail_ok(4096) and not gg.tail_ok(100) and not gg.tail_ok(128 + 64)   # r = 0; r > 16 q
    assert not gg.tail_ok(576, signal=True) and not gg.tail_ok(576, pdl=True) and not gg.tail_ok(584)


def _payload_rule(amax: torch.Tensor):
    """The Gluon epilogue's scale rule (_store_fp8_payload) on FP32 amaxes: (UE8M0 byte, 1 / scale)."""
    bits = amax.view(torch.int32) & 0x7FFFFFFF
    bits = torch.maximum(bits, torch.tensor(0x38D1B717, dtype=torch.int32))
    sf_exp = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    special = bits >= 0x7F800000
    inv = ((254 - sf_exp) << 23).view(torch.float32)
    inv = torch.where(special, torch.where(bits > 0x7F800000, float("nan"), 0.0), inv)
    return torch.where(special, 255, sf_exp).to(torch.uint8), inv


def test_fp8_payload_scale_rule_matches_the_reference():
    """The Gluon FP8-payload epilogue finds ceil_pow2(max(amax, 1e-4) / 448) on the amax's bits, without a
    division (it cannot run here, so its rule is checked in torch): the same UE8M0 byte as the reference for
    every BF16 magnitude and random FP32 ones, 1.75 * 2^k and its neighbours, the 1e-4 floor, inf and NaN; and
    1 / scale exact, so codes equal the reference's x / scale."""
    bf16 = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    rnd = torch.randn(100000) * torch.pow(2.0, torch.randint(-40, 40, (100000,)).float())
    ks = torch.pow(2.0, torch.arange(-30, 30).float())
    edge = torch.cat([ks * 1.75, torch.nextafter(ks * 1.75, ks * 4), torch.nextafter(ks * 1.75, ks * 0),
                      torch.tensor([1e-4, 1e-5, 0.0, 448.0, 448.0 * 2 ** 120, float("inf"), float("nan")])])
    amax = torch.cat([bf16, rnd.abs(), edge])
    byte, inv = _payload_rule(amax)
    want = R.to_ue8m0_bytes(R.ceil_to_ue8m0(torch.clamp(amax, min=1e-4) / 448.0))
    assert torch.equal(byte, want), amax[byte != want][:8]
    finite = byte != 255
    scale = torch.pow(2.0, byte[finite].float() - 127)
    assert torch.equal(inv[finite] * scale, torch.ones_like(scale))


def test_aot_fp8_payload_epilogue(tmp_path):
    """The masked kernel writing the FP8 combine payload (D_FP8, 128-wide tiles, SBO signal): compiles for
    sm_90a with its QGMMAs, no local memory, byte stores of the scales, the E4M3 conversion."""
    bm, bn = 64, 128
    cfg = gg.GluonConfig(bm, bn, gg._stages(bm, bn, bm * bn, sa_smem=True), 4)
    constexprs = dict(MODE=gg._MODES["masked"], BLOCK_M=bm, BLOCK_N=bn, GROUP_M=cfg.group_m, STAGES=cfg.stages,
                      TMA_STORE=False, HAS_C=False, HAS_SIGNAL=True, SB_SCALAR=True, K_ROTATE=False,
                      PRODUCER_REGS=cfg.producer_regs, SA_SMEM=True, D_FP8=True, d_desc=None,
                      SIG_WARP=gg.SIGNAL_WARP)      # as launch builds a signalled call
    sig = _signature("masked", bm, bn, False, torch.bfloat16, False)
    sig.update(d_ptr="*fp8e4nv", c_ptr="*fp8e4nv", dsf_ptr="*u8", s_fg="i32", s_fm="i32")
    r = compile_sm90_in_subprocess("fp8gemm.kernels.gemm_gluon", "fp8_gemm_ws_kernel", sig, constexprs,
                                   num_warps=cfg.num_warps, gluon=True, maxnreg=cfg.maxnreg,
                                   divisible_by_16=["sfa_ptr", "sfb_ptr", "d_ptr", "N", "K", "s_dm"])
    assert sass_count(r["sass"], "QGMMA") >= 8
    assert r["local"] == 0 and r["stack"] == 0, (r["local"], r["stack"])
    assert "STG.E.U8" in r["sass"] and "e4m3" in r["ptx"]
    assert "atom.global.gpu.release.add" in r["ptx"]
    assert sass_count(r["sass"], "MEMBAR.ALL.GPU") == 1       # the release in the signal warp only


def test_transpose_for_sa_decision(monkeypatch):
    """When launch copies row-major A scales MN-major to run SA_SMEM (TRANSPOSE_ROW_MAJOR_FOR_SA, on): large
    dense and contiguous calls with >= 8 K-slices on a kernel that has SA_SMEM; never masked calls, PDL, short K,
    the remainder-tail or wide tiles, explicit configs, MN-major scales, small calls SA_SMEM already takes, or
    with the environment override set."""
    monkeypatch.delenv("FP8GEMM_GLUON_SA_SMEM", raising=False)
    row, mn = torch.empty(4096, 56), torch.empty(56, 4096).t()
    cfg = gg.pick_config("dense", 4096, 4096, 7168, tma_store=True)
    assert gg.TRANSPOSE_ROW_MAJOR_FOR_SA is True
    assert gg.transpose_for_sa("dense", 4096, 4096, 7168, row, cfg)
    monkeypatch.setattr(gg, "TRANSPOSE_ROW_MAJOR_FOR_SA", False)
    assert not gg.transpose_for_sa("dense", 4096, 4096, 7168, row, cfg)
    monkeypatch.setattr(gg, "TRANSPOSE_ROW_MAJOR_FOR_SA", True)
    assert gg.transpose_for_sa("contiguous", 4096, 4096, 7168, row, cfg)
    assert not gg.transpose_for_sa("masked", 4096, 4096, 7168, torch.empty(4, 4096, 56), cfg)
    assert not gg.transpose_for_sa("dense", 4096, 4096, 7168, row, cfg, pdl=True)
    assert not gg.transpose_for_sa("dense", 4096, 4096, 7168, mn, cfg)
    assert not gg.transpose_for_sa("dense", 256, 4096, 7168, row[:256], cfg)         # SA_SMEM already
    assert not gg.transpose_for_sa("dense", 4096, 32768, 512, torch.empty(4096, 4), cfg)
    assert not gg.transpose_for_sa("dense", 4096, 4096, 7168, row, gg.GluonConfig(128, 128, 5, 8, sa_smem=False))
    assert not gg.transpose_for_sa("dense", 4096, 4096, 7168, row, gg.wide_config())
    tail = gg.GluonConfig(128, 128, 5, 8, bn_tail=16)
    assert not gg.transpose_for_sa("dense", 4096, 576, 7168, row, tail)             # the tail kernel runs
    assert gg.transpose_for_sa("dense", 4096, 4096, 7168, row, tail)                # no remainder: plain kernel
    monkeypatch.setenv("FP8GEMM_GLUON_SA_SMEM", "0")
    assert not gg.transpose_for_sa("dense", 4096, 4096, 7168, row, cfg)
