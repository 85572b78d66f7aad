"""sm_90a AOT tests of the Gluon GEMM's diagnostic modes (``DIAG``, ``benchmarks/gluon_probe.py --diag``).

* ``DIAG=0`` is the production kernel byte for byte: every production config compiled with ``DIAG=0`` has the
  SASS of the kernel source before ``DIAG`` existed (commit ``_PRE_DIAG_COMMIT``, read with git; without git the
  compile that does not name ``DIAG``), and the digests the other AOT tests recorded.
* ``DIAG`` 1-4 (probe off and on) compile without local memory or spills, keep the 16 asynchronous QGMMA and
  the barrier / MMA-wait structure of production, and each removes exactly what it claims: 1 loads every slice
  at K coordinate 0, 2/4 add the producer's plain arrive on the full barrier (next to its predicated TMA), 3/4
  drop the scale loads and the promotion FFMAs.
* The wide path's diagnostics and the split tile (``split_config``): every production config (``wide``
  included, flags off) compiles to the SASS of the kernel at ``_PRE_SPLIT_COMMIT`` (before the wide kernel took
  ``PROBE``/``DIAG`` and the split variant existed) and to the recorded digests; wide and split with ``PROBE``
  and/or ``DIAG`` 3 compile cleanly (no local memory, ptxas without C7514/C7515, QGMMA asynchronous).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess

import pytest
import torch

from fp8gemm.kernels import gemm_gluon as gg
from fp8gemm.testing import compile_sm90_in_subprocess, ptxas_log, sass_count

if not gg.HAS_GLUON:  # pragma: no cover
    pytest.skip("triton without Gluon", allow_module_level=True)

FP8 = torch.float8_e4m3fn
_DIV16 = ["sfa_ptr", "sfb_ptr", "d_ptr", "c_ptr", "N", "K", "s_dm"]
# The last commit of fp8gemm/kernels/gemm_gluon.py before DIAG was added.
_PRE_DIAG_COMMIT = "f5f6f68041a1151c114514063bbbbfa9efae27d9"
# The last commit of fp8gemm/kernels/gemm_gluon.py before the wide kernel's PROBE/DIAG and the split tile.
_PRE_SPLIT_COMMIT = "fc13375babc780fd3e272fe48b4176149e77dc87"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# sha256[:16] of cuobjdump -sass recorded by tests/cpu/test_gemm_gluon_aot.py (dense) and test_pdl_aot.py
# (masked, contiguous) for triton 3.6.0 (the same configs as _config below gives).
# The other configs' digests were recorded with the kernel at _PRE_SPLIT_COMMIT (same triton).
_RECORDED = {"3.6.0": {"dense": "bbdd37ed050fed1e", "masked": "f5570d6537275196", "contiguous": "6203e9777274bc5c",
                       "dense_pdl": "d0b27a2c35192ef4", "dense_small": "30a0fdd7e329e722",
                       "dense_fp32_c": "84d4b68fb39b5acb", "masked_signal": "7bdd34daaa27e370",
                       "wide": "4e3929678de093a3"}}


def _signature(bm, bn, tma_store, out_dtype=torch.bfloat16, has_c=False, probe=False):
    from triton.runtime.jit import mangle_type
    a = torch.empty(256, 512, dtype=FP8)
    d = torch.empty(256, 256, dtype=torch.bfloat16)
    out = "*bf16" if out_dtype == torch.bfloat16 else "*fp32"
    sig = {"a_desc": mangle_type(gg._desc2d(a, 256, (bm, 128), "fp8")),
           "b_desc": mangle_type(gg._desc2d(a, 256, (bn, 128), "fp8")),
           "d_ptr": out, "c_ptr": "*fp32" if has_c else out, "sfa_ptr": "*fp32", "sfb_ptr": "*fp32",
           "masked_m_ptr": "*i32", "m_indices_ptr": "*i32", "signal_ptr": "*i32"}
    if tma_store:
        sig["d_desc"] = mangle_type(gg._desc2d(d, 256, (bm, bn), "bf16"))
    sig.update({name: "i32" for name in ("M", "N", "K", "G", "s_dg", "s_dm", "s_cg", "s_cm", "s_ag", "s_am", "s_ak",
                                         "s_bg", "s_bn", "s_bk")})
    if probe:
        sig["probe_ptr"] = "*i64"
    return sig


def _config(which):
    """(GluonConfig, mode, tma_store, out dtype, has_c, signal, extra constexprs) of a production config."""
    if which == "dense":          # 4096x4096x7168 BF16: the 128x128 5-stage kernel the probe measures
        return gg.pick_config("dense", 4096, 4096, 7168, tma_store=True), "dense", True, torch.bfloat16, False, \
            False, {}
    if which == "dense_pdl":      # the FP4 route's dense GEMM after the convert
        return gg.pick_config("dense", 4096, 4096, 7168, tma_store=True), "dense", True, torch.bfloat16, False, \
            False, {"PDL_WAIT": True}
    if which == "dense_small":    # narrow tile, K rotation
        cfg = dataclasses.replace(gg.pick_config("dense", 64, 4096, 7168, tma_store=True), k_rotate=True)
        return cfg, "dense", True, torch.bfloat16, False, False, {}
    if which == "dense_fp32_c":   # FP32 output with C, masked vector stores
        cfg = gg.pick_config("dense", 4096, 4096, 7168, out_bytes=4, has_c=True)
        return cfg, "dense", False, torch.float32, True, False, {}
    if which == "masked":         # the 64x128 8-stage decode tile test_pdl_aot recorded (SBO signal off)
        return gg.GluonConfig(64, 128, 8, 4), "masked", False, torch.bfloat16, False, False, {}
    if which == "masked_signal":  # today's pick for the 6-group decode rows (64x64, K rotation), SBO on
        return gg.pick_config("masked", 4096, 4096, 4096, groups=6, expected_m=20), "masked", False, \
            torch.bfloat16, False, True, {}
    if which == "contiguous":
        return gg.pick_config("contiguous", 4096, 4096, 2048, groups=8), "contiguous", False, torch.bfloat16, \
            False, False, {}
    if which == "wide":
        return gg.wide_config(), "dense", True, torch.bfloat16, False, False, {"WIDE_N": True}
    if which == "split":          # opt-in only (never picked): the wide path with one 128-wide half
        return gg.split_config(), "dense", True, torch.bfloat16, False, False, {"WIDE_N": True}
    raise KeyError(which)


def _compile(which, diag=None, probe=False, module="fp8gemm.kernels.gemm_gluon"):
    cfg, mode, tma_store, out, has_c, signal, extra = _config(which)
    if cfg.wide_n:
        sig = _signature(64, 128, True, probe=probe)   # 64-row A boxes, 128-wide B/D halves
    else:
        sig = _signature(cfg.block_m, cfg.block_n, tma_store, out, has_c, probe)
    c = dict(MODE=gg._MODES[mode], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
             STAGES=cfg.stages, TMA_STORE=tma_store, HAS_C=has_c, HAS_SIGNAL=signal,
             SB_SCALAR=(128 % cfg.block_n == 0), K_ROTATE=cfg.k_rotate and not cfg.wide_n,
             PRODUCER_REGS=cfg.producer_regs, **extra)
    if not tma_store:
        c["d_desc"] = None
    div = list(_DIV16)
    if probe:
        c["PROBE"] = True
        div.append("probe_ptr")
    if diag is not None:
        c["DIAG"] = diag
    return compile_sm90_in_subprocess(module, "fp8_gemm_ws_kernel", sig, c, num_warps=cfg.num_warps, gluon=True,
                                      maxnreg=cfg.maxnreg, divisible_by_16=div)


def _digest(sass: str) -> str:
    return hashlib.sha256(sass.encode()).hexdigest()[:16]


def _module_at(commit, name, tmp_path_factory):
    """A directory holding ``{name}.py``: the kernel module at ``commit`` (its one relative import made
    absolute), and its source; (None, None) when git or the commit is not available."""
    try:
        src = subprocess.run(["git", "-C", _ROOT, "show", f"{commit}:fp8gemm/kernels/gemm_gluon.py"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
    except Exception:  # noqa: BLE001
        return None, None
    assert src.count("from .. import runtime") == 1
    d = tmp_path_factory.mktemp(name)
    (d / f"{name}.py").write_text(src.replace("from .. import runtime", "from fp8gemm import runtime"))
    return str(d), src


@pytest.fixture(scope="module")
def pre_diag_dir(tmp_path_factory):
    """A directory holding ``gemm_gluon_pre_diag.py``: the kernel module at ``_PRE_DIAG_COMMIT``, or None."""
    d, src = _module_at(_PRE_DIAG_COMMIT, "gemm_gluon_pre_diag", tmp_path_factory)
    assert src is None or "DIAG" not in src
    return d


@pytest.fixture(scope="module")
def pre_split_dir(tmp_path_factory):
    """A directory holding ``gemm_gluon_pre_split.py``: the kernel module at ``_PRE_SPLIT_COMMIT``, or None."""
    d, src = _module_at(_PRE_SPLIT_COMMIT, "gemm_gluon_pre_split", tmp_path_factory)
    assert src is None or ("split_config" not in src and 'gl.static_assert(not PROBE, "PROBE: default' in src)
    return d


_PRODUCTION = ["dense", "dense_pdl", "dense_small", "dense_fp32_c", "masked", "masked_signal", "contiguous", "wide"]


@pytest.mark.parametrize("which", _PRODUCTION)
def test_diag0_is_the_production_kernel(which, pre_diag_dir, monkeypatch):
    import triton
    r0 = _compile(which, diag=0)
    pre = pre_diag_dir
    if pre is not None:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([pre, _ROOT, os.environ.get("PYTHONPATH", "")]))
        ref = _compile(which, module="gemm_gluon_pre_diag")
    else:
        ref = _compile(which)            # the compile that does not name DIAG
    assert r0["sass"] == ref["sass"], f"{which}: DIAG=0 SASS differs from the kernel without DIAG"
    assert r0["shared"] == ref["shared"] and r0["regs"] == ref["regs"]
    want = _RECORDED.get(triton.__version__, {}).get(which)
    if want is not None:
        assert _digest(r0["sass"]) == want, (which, _digest(r0["sass"]), want)


# ------------------------------------------------------------------------------------------------
# DIAG 1-4
# ------------------------------------------------------------------------------------------------

_KEY_OPS = ("QGMMA", "WARPGROUP", "SYNCS", "BAR", "UTMA", "WARPSYNC")


def _key_ops(sass: str) -> list[str]:
    """The MMA / barrier / TMA instructions in order (opcode and modifiers, predicates dropped)."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    return [o for o in ops if o.startswith(_KEY_OPS)]


_TMA_LOAD = re.compile(r"cp\.async\.bulk\.tensor\.2d\.shared::cluster\.global\S*\s+\[%r\d+\],\s*"
                       r"\[%rd\d+,\s*\{(%r\d+),\s*%r\d+\}\],\s*\[(%r\d+)\];")


def _is_zero(ptx: str, reg: str) -> bool:
    """Every instruction that writes ``reg`` sets it to 0 (production's K coordinate is a loop-carried register
    that starts at 0 and steps by 128)."""
    writes = re.findall(rf"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*\s+{re.escape(reg)},[^;]*;)", ptx, flags=re.M)
    return bool(writes) and all(re.fullmatch(rf"mov\.[bu]32\s+{re.escape(reg)},\s*0;", w) for w in writes)


@pytest.mark.parametrize("probe", [False, True], ids=["probe_off", "probe_on"])
@pytest.mark.parametrize("diag", [1, 2, 3, 4, 5])
def test_diag_mode_compiles(diag, probe):
    base = _compile("dense", diag=0, probe=probe)
    r = _compile("dense", diag=diag, probe=probe)
    sass, ptx = r["sass"], r["ptx"]
    # clean: no local memory, no spills, MMAs asynchronous, same shared memory
    assert r["local"] == 0 and r["stack"] == 0, (r["local"], r["stack"])
    assert sass_count(sass, "LDL") == 0 and sass_count(sass, "STL") == 0
    assert r["shared"] == base["shared"] <= 227 * 1024
    log = ptxas_log(ptx)
    assert "C7514" not in log and "C7515" not in log, log
    assert "spill" not in log or "0 bytes spill stores" in log, log
    assert "warning" not in log.lower(), log
    # the MMA, wait, barrier and TMA structure of production (modes 2/4: + the producer's full arrive)
    assert sass_count(sass, "QGMMA") == sass_count(base["sass"], "QGMMA") == 16
    assert re.findall(r"WARPGROUP\.DEPBAR\S*\s+\S+\s+\S+", sass) == re.findall(r"WARPGROUP\.DEPBAR\S*\s+\S+\s+\S+",
                                                                               base["sass"])
    ops, ops0 = _key_ops(sass), _key_ops(base["sass"])
    if diag in (2, 4):
        extra = [i for i, o in enumerate(ops) if o.startswith("SYNCS.ARRIVE")]
        assert len(extra) == len([o for o in ops0 if o.startswith("SYNCS.ARRIVE")]) + 1
        assert any(ops[:i] + ops[i + 1:] == ops0 for i in extra), "expected production + one arrive"
    elif diag != 5:      # mode 5 computes its scales in registers: other instruction mix around the promotion
        assert ops == ops0
    # the producer's loads: two TMA copies per stage, into the full barrier
    loads, loads0 = _TMA_LOAD.findall(ptx), _TMA_LOAD.findall(base["ptx"])
    assert len(loads) == len(loads0) == 2, (loads, loads0)
    assert not any(_is_zero(base["ptx"], k) for k, _ in loads0)          # production walks K
    assert all(_is_zero(ptx, k) for k, _ in loads) == (diag == 1)        # mode 1 loads at K = 0
    full_bar = loads[0][1]
    arrives = re.findall(r"mbarrier\.arrive\.shared::cta\.b64\s+_,\s*\[(%r\d+)\];", ptx)
    arrives0 = re.findall(r"mbarrier\.arrive\.shared::cta\.b64\s+_,\s*\[(%r\d+)\];", base["ptx"])
    assert (full_bar in arrives) == (diag in (2, 4)) and full_bar not in arrives0
    assert len(arrives) == len(arrives0) + (diag in (2, 4))
    assert re.search(rf"mbarrier\.arrive\.expect_tx\.shared\.b64\s+_,\s*\[{full_bar}\],\s*32768;", ptx)
    # modes 3/4: no scale loads and no promotion FFMAs (one fold of the last two MMA results per tile)
    if diag in (3, 4):
        assert sass_count(sass, "LDG") == 0 and sass_count(sass, "FFMA") == 0
        assert sass_count(sass, "FADD") <= 2 * 64, sass_count(sass, "FADD")
    elif diag == 5:      # the promotion FFMAs stay, the scale loads go
        assert sass_count(sass, "LDG") == 0
        assert sass_count(sass, "FFMA") >= 4 * 64, sass_count(sass, "FFMA")
    else:
        assert sass_count(sass, "LDG") == sass_count(base["sass"], "LDG") > 0
        assert sass_count(sass, "FFMA") == sass_count(base["sass"], "FFMA") >= 4 * 64


def test_diag8_drops_only_the_tma_store():
    """DIAG 8 (no global store): the production kernel less its TMA store (the tile still goes to shared memory)."""
    base = _compile("dense", diag=0)
    r = _compile("dense", diag=8)
    assert r["local"] == 0 and r["stack"] == 0 and sass_count(r["sass"], "STL") == 0
    assert sass_count(base["sass"], "UTMASTG") == 1 and sass_count(r["sass"], "UTMASTG") == 0
    assert sass_count(r["sass"], "STSM") == sass_count(base["sass"], "STSM") > 0
    assert sass_count(r["sass"], "QGMMA") == sass_count(base["sass"], "QGMMA")
    assert sass_count(r["sass"], "FFMA") == sass_count(base["sass"], "FFMA")
    assert "C7514" not in ptxas_log(r["ptx"])


def test_diag_rejected_outside_dense():
    with pytest.raises(RuntimeError, match="DIAG"):
        _compile("masked", diag=2)


# ------------------------------------------------------------------------------------------------
# The wide path's PROBE / DIAG 3 and the split tile (benchmarks/gluon_probe.py --variants default,wide,split)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", _PRODUCTION)
def test_production_unchanged_by_wide_probe_and_split(which, pre_split_dir, monkeypatch):
    """Production configs (flags off, named or not) compile to the SASS of the kernel at _PRE_SPLIT_COMMIT and
    to the recorded digest."""
    import triton
    plain = _compile(which)
    named = _compile(which, diag=0)
    assert named["sass"] == plain["sass"]
    if pre_split_dir is not None:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([pre_split_dir, _ROOT, os.environ.get("PYTHONPATH", "")]))
        ref = _compile(which, module="gemm_gluon_pre_split")
        assert plain["sass"] == ref["sass"], f"{which}: SASS differs from the kernel at {_PRE_SPLIT_COMMIT[:8]}"
        assert plain["shared"] == ref["shared"] and plain["regs"] == ref["regs"]
    want = _RECORDED.get(triton.__version__, {}).get(which)
    if want is not None:
        assert _digest(plain["sass"]) == want, (which, _digest(plain["sass"]), want)


def _clean(r):
    assert r["local"] == 0 and r["stack"] == 0, (r["local"], r["stack"])
    assert sass_count(r["sass"], "LDL") == 0 and sass_count(r["sass"], "STL") == 0
    log = ptxas_log(r["ptx"])
    assert "C7514" not in log and "C7515" not in log, log
    assert "spill" not in log or "0 bytes spill stores" in log, log
    assert "warning" not in log.lower(), log
    # each consumer warpgroup gets the consumer's register budget (see test_gemm_gluon_aot's wide test)
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+232;", r["ptx"])


_CLOCK_SASS = re.compile(r"SR_CLOCK|SR_GLOBALTIMER|CLOCKLO|CLOCKHI")


def test_split_compiles():
    """The split 128x128 tile: 2 x 4 QGMMA 64x128x32 per K-slice (one per warpgroup partition), one B box a stage
    (32 KB stages: A 2 x 8 KB + B 16 KB), two [64, 128] epilogue buffers, promotion FFMAs and scale loads."""
    cfg = gg.split_config()
    assert cfg.split and not gg.wide_config().split and (cfg.block_m, cfg.block_n, cfg.num_warps) == (128, 128, 4)
    assert cfg.stages == gg.pick_config("dense", 4096, 4096, 7168, tma_store=True).stages == 5
    r = _compile("split")
    _clean(r)
    sass, ptx = r["sass"], r["ptx"]
    assert sass_count(sass, "QGMMA") == 8 and "QGMMA.64x128x32" in sass
    assert not _CLOCK_SASS.search(sass)
    assert sass_count(sass, "FFMA") >= 64 and sass_count(sass, "LDG") > 0
    assert cfg.stages * 256 * 128 + 2 * 64 * 128 * 2 <= r["shared"] <= 227 * 1024, r["shared"]
    # one stage = 2 A boxes (8 KB) + 1 B box (16 KB) into its full barrier; 3 TMA loads in the producer
    assert re.search(r"mbarrier\.arrive\.expect_tx\.shared\.b64\s+_,\s*\[%r\d+\],\s*32768;", ptx)
    assert len(_TMA_LOAD.findall(ptx)) == 3, _TMA_LOAD.findall(ptx)
    # empty barriers take one arrive per consumer warpgroup: init count 2
    assert re.search(r"mbarrier\.init\.shared(::cta)?\.b64\s+\[%r\d+\],\s*2;", ptx)


@pytest.mark.parametrize("which", ["wide", "split"])
@pytest.mark.parametrize("probe,diag", [(True, 0), (False, 3), (True, 3)],
                         ids=["probe", "diag3", "probe_diag3"])
def test_wide_split_diagnostics_compile(which, probe, diag):
    """PROBE and DIAG 3 on the wide path: clean compile, the production QGMMA / MMA-wait / barrier structure
    kept (the probe's explicit partition bar.sync before each full wait replaces membar's, see _consumer_wide),
    DIAG 3 without scale loads and promotion FFMAs, the probe's stamps present."""
    base = _compile(which)
    r = _compile(which, diag=diag, probe=probe)
    _clean(r)
    sass = r["sass"]
    assert r["shared"] == base["shared"]
    assert sass_count(sass, "QGMMA") == sass_count(base["sass"], "QGMMA") == (16 if which == "wide" else 8)
    depbar = re.findall(r"WARPGROUP\.DEPBAR\S*\s+\S+\s+\S+", sass)
    assert depbar == re.findall(r"WARPGROUP\.DEPBAR\S*\s+\S+\s+\S+", base["sass"])
    # (BAR.SYNC: the probe's explicit partition barrier before each full wait replaces the one membar puts there)
    for op in ("SYNCS.ARRIVE", "UTMALDG", "UTMASTG", "BAR.SYNC"):
        assert sass_count(sass, op) == sass_count(base["sass"], op), op
    if diag == 3:
        assert sass_count(sass, "LDG") == 0 and sass_count(sass, "FFMA") == 0
        assert sass_count(sass, "FADD") <= 2 * 64, sass_count(sass, "FADD")     # one fold a tile a partition
    else:
        assert sass_count(sass, "LDG") == sass_count(base["sass"], "LDG") > 0
        assert sass_count(sass, "FFMA") == sass_count(base["sass"], "FFMA") >= 64
    if probe:
        ptx = r["ptx"]
        # both consumer partitions carry the header code (only warpgroup 0's writer stores it)
        assert ptx.count("%clock64") >= 10 and ptx.count("%globaltimer") == 4
        assert sass_count(sass, "STG") >= 10 and len(_CLOCK_SASS.findall(sass)) >= 10
        # stamps: per consumer partition 7 events a slice (wide: + EV_C_HALF) + 5 header, the producer 3 + 1
        want = 2 * (7 + (which == "wide") + 5) + 4
        assert ptx.count("st.global.b64") >= want, (ptx.count("st.global.b64"), want)
    else:
        assert not _CLOCK_SASS.search(sass) and sass_count(sass, "STG") == 0


def test_split_and_probe_rejected_where_unsupported():
    with pytest.raises(RuntimeError, match="DIAG"):
        _compile("wide", diag=2)
    assert not any(gg.pick_config("dense", 4096, n, k, tma_store=True, wide_n=w).split
                   for n, k in ((4096, 7168), (2112, 7168), (7168, 2048)) for w in (False, True))
