"""Programmatic dependent launch (PDL) between the FP4 convert and the Gluon GEMM (issue #6), without a GPU.

* sm_90a AOT: ``PDL_WAIT`` off generates the committed GEMM byte for byte (SASS digests recorded before the
  flag existed, triton 3.6.0); on, every partition executes ``griddepcontrol.wait`` (SASS ``ACQBULK``), the
  producer issues only its weight (B) prefetch before it, and the pipeline is otherwise intact (same QGMMA,
  shared memory, no spills, MMAs asynchronous).  The convert's side (``PDL_TRIGGER``: SASS ``PREEXIT``
  first, or nothing) is tested beside its other compile checks in test_fp4_convert.py.
* The dispatcher: only the "fp4-gluon" route asks for PDL, both kernels together, and ``fp8gemm.set_pdl(False)``
  turns it off; in the interpreter the convert never gets the trigger.
"""
from __future__ import annotations

import functools
import hashlib
import re

import pytest
import torch

from fp8gemm import runtime
from fp8gemm.kernels import fp4_convert as FC
from fp8gemm.kernels import gemm_gluon as gg
from fp8gemm.testing import compile_sm90_in_subprocess, ptxas_log, sass_count

FP8 = torch.float8_e4m3fn
_DIV16 = ["sfa_ptr", "sfb_ptr", "d_ptr", "c_ptr", "N", "K", "s_dm"]

# sha256[:16] of cuobjdump -sass, recorded at the commit before PDL_WAIT / PDL_TRIGGER existed (triton 3.6.0).
_SASS_BEFORE_PDL = {"3.6.0": {
    "masked": "f5570d6537275196",        # the 6-group decode route's GEMM: 64x128, 8 stages, BF16 masked stores
    "contiguous": "6203e9777274bc5c",    # 128x128, 5 stages
}}


def _digest(sass: str) -> str:
    return hashlib.sha256(sass.encode()).hexdigest()[:16]


def _want(name: str):
    import triton
    return _SASS_BEFORE_PDL.get(triton.__version__, {}).get(name)


def _gemm_signature(mode, bm, bn, tma_store):
    from triton.runtime.jit import mangle_type
    a = torch.empty(256, 512, dtype=FP8)
    d = torch.empty(256, 256, dtype=torch.bfloat16)
    sig = {"a_desc": mangle_type(gg._desc2d(a, 256, (bm, 128), "fp8")),
           "b_desc": mangle_type(gg._desc2d(a, 256, (bn, 128), "fp8")),
           "d_ptr": "*bf16", "c_ptr": "*bf16", "sfa_ptr": "*fp32", "sfb_ptr": "*fp32", "masked_m_ptr": "*i32",
           "m_indices_ptr": "*i32", "signal_ptr": "*i32"}
    if tma_store:
        sig["d_desc"] = mangle_type(gg._desc2d(d, 256, (bm, bn), "bf16"))
    sig.update({name: "i32" for name in ("M", "N", "K", "G", "s_dg", "s_dm", "s_cg", "s_cm", "s_ag", "s_am", "s_ak",
                                         "s_bg", "s_bn", "s_bk")})
    return sig


# The configs of the FP4 route (masked: a 6-group decode tile; contiguous), a dense TMA-store
# kernel (the production 128x128 tile) and the opt-in wide tile, with their partition counts.
_GEMMS = {"masked": 2, "contiguous": 2, "dense": 2, "wide": 3}


@functools.lru_cache(maxsize=None)
def _gemm(which: str, pdl: bool | None):
    if which == "wide":
        cfg, mode, tma_store = gg.wide_config(), "dense", True
        sig = _gemm_signature("dense", 64, 128, True)
    else:
        mode, tma_store = which, which == "dense"
        # masked: the 64x128 / 8-stage tile the digest was recorded with (pick_config now gives these decode
        # rows 64x64 tiles; the PDL code is the same for both widths)
        cfg = {"masked": gg.GluonConfig(64, 128, 8, 4),
               "contiguous": gg.pick_config("contiguous", 4096, 4096, 2048, groups=8),
               "dense": gg.pick_config("dense", 4096, 4096, 7168, tma_store=True)}[which]
        sig = _gemm_signature(mode, cfg.block_m, cfg.block_n, tma_store)
    c = dict(MODE=gg._MODES[mode], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, STAGES=cfg.stages,
             TMA_STORE=tma_store, HAS_C=False, HAS_SIGNAL=False, SB_SCALAR=(128 % cfg.block_n == 0),
             K_ROTATE=False, PRODUCER_REGS=cfg.producer_regs)
    if cfg.wide_n:
        c["WIDE_N"] = True
    if not tma_store:
        c["d_desc"] = None
    if pdl is not None:
        c["PDL_WAIT"] = pdl
    return compile_sm90_in_subprocess("fp8gemm.kernels.gemm_gluon", "fp8_gemm_ws_kernel", sig, c,
                                      num_warps=cfg.num_warps, gluon=True, maxnreg=cfg.maxnreg,
                                      divisible_by_16=_DIV16)


_GDC_SASS = re.compile(r"\b(ACQBULK|PREEXIT)\b")


# =====================================================================================
# The GEMM: PDL_WAIT off is the committed kernel, on adds the waits and the B prefetch
# =====================================================================================

@pytest.mark.parametrize("which", ["masked", "contiguous"])
def test_gemm_pdl_off_is_the_committed_kernel(which):
    default, off = _gemm(which, None), _gemm(which, False)
    assert off["sass"] == default["sass"]
    assert not _GDC_SASS.search(default["sass"]) and "griddepcontrol" not in default["ptx"]
    want = _want(which)
    if want is not None:
        assert _digest(default["sass"]) == want, (
            f"{which} GEMM SASS changed ({_digest(default['sass'])} != {want}) with PDL_WAIT off")


@pytest.mark.parametrize("which", list(_GEMMS))
def test_gemm_pdl_wait_in_every_partition(which):
    off, on = _gemm(which, False), _gemm(which, True)
    partitions = _GEMMS[which]
    sass, ptx = on["sass"], on["ptx"]
    # griddepcontrol.wait is ACQBULK on sm_90a; LLVM may duplicate a partition's wait onto two paths.
    assert partitions <= sass_count(sass, "ACQBULK") <= 2 * partitions, sass_count(sass, "ACQBULK")
    assert sass_count(sass, "ACQBULK") == ptx.count("griddepcontrol.wait;")
    assert "PREEXIT" not in sass and "launch_dependents" not in ptx
    for op in ("QGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "UTMALDG"):
        if op == "UTMALDG":     # + the prefetch's B load(s)
            assert sass_count(sass, op) > sass_count(off["sass"], op), op
        else:
            assert sass_count(sass, op) == sass_count(off["sass"], op), op
    assert on["shared"] == off["shared"] <= 227 * 1024
    assert on["local"] == 0 and on["stack"] == 0 and sass_count(sass, "LDL") == 0 and sass_count(sass, "STL") == 0
    log = ptxas_log(ptx)
    assert "C7514" not in log and "C7515" not in log, log
    assert "spill" not in log or "0 bytes spill stores" in log, log


_LOC = re.compile(r"^\s*\.loc\s+\d+\s+\d+\s+\d+\s*//\s*(.*)$")


def _sites(ptx: str, needle: str) -> list[tuple[int, ...]]:
    """For each PTX line holding ``needle``: the gemm_gluon.py lines of the ``.loc`` before it, innermost
    first (the inlined-at chain: the function it is in, then its callers)."""
    out, chain = [], ()
    for line in ptx.splitlines():
        m = _LOC.match(line)
        if m:
            chain = tuple(int(x) for x in re.findall(r"gemm_gluon\.py:(\d+)", m.group(1)))
        elif needle in line:
            out.append(chain)
    return out


def _source_lines(fn) -> range:
    import inspect
    src, start = inspect.getsourcelines(fn.fn)
    return range(start, start + len(src))


def _wait_calls(fn) -> set[int]:
    import inspect
    src, start = inspect.getsourcelines(fn.fn)
    return {start + i for i, line in enumerate(src) if "_grid_dependency_wait()" in line}


@pytest.mark.parametrize("which", list(_GEMMS))
def test_gemm_pdl_wait_sites_and_b_prefetch(which):
    """By source attribution (``.loc``): the waits are the producer's and the consumer's (wide: both consumer
    warpgroups share one call site), the producer's prefetch issues only B boxes with their stages' expect,
    and the main loop's stage load issues A and B."""
    ptx = _gemm(which, True)["ptx"]
    consumer = gg._consumer_wide if which == "wide" else gg._consumer
    want = _wait_calls(gg._producer) | _wait_calls(consumer)
    assert len(want) == 2
    callers = {chain[1] for chain in _sites(ptx, "griddepcontrol.wait;")}
    assert callers == want, (callers, want)
    pre, stage = _source_lines(gg._prefetch_b), _source_lines(gg._load_stage)
    tma = _sites(ptx, "cp.async.bulk.tensor")
    b_boxes = 2 if which == "wide" else 1
    assert sum(1 for c in tma if c and c[0] in pre) == b_boxes
    assert sum(1 for c in tma if c and c[0] in stage) == 2 * b_boxes
    assert any(c and c[0] in pre for c in _sites(ptx, "mbarrier.arrive.expect_tx"))


# =====================================================================================
# The dispatcher: PDL on the fp4-gluon route only, both halves together
# =====================================================================================

class _Recorder:
    def __init__(self):
        self.gemm = []
        self.convert = []


@pytest.fixture
def recorded_fp4_route(monkeypatch):
    """SM90 as far as the dispatcher can tell, the Gluon launch replaced by the reference (records ``pdl``),
    the real convert kernel (records ``pdl_trigger``)."""
    from fp8gemm import reference as R
    rec = _Recorder()
    real_convert = FC.launch_fp4_to_fp8

    def convert(*args, **kw):
        rec.convert.append(kw.get("pdl_trigger", False))
        return real_convert(*args, **kw)

    def launch(mode, a, sfa, b, sfb, d, *, masked_m=None, m_indices=None, pdl=False, **kw):
        rec.gemm.append((mode, pdl))
        out = R.m_grouped_fp8_gemm_nt_masked(a.cpu(), sfa.cpu(), b.cpu(), sfb.cpu(), masked_m.cpu(), d.cpu())
        d.copy_(out)
        return 64, 128

    monkeypatch.setattr(runtime, "is_sm90", lambda device: True)
    monkeypatch.setattr(gg, "supports", lambda mode, a, sfa, b, sfb, d, c=None:
                        a.dtype == FP8 and sfa.dtype == torch.float32 and a.shape[-1] % 128 == 0)
    monkeypatch.setattr(gg, "launch", launch)
    monkeypatch.setattr(gg, "plan", lambda *a, **kw: (64, 128))
    monkeypatch.setattr(FC, "launch_fp4_to_fp8", convert)
    monkeypatch.delenv("FP8GEMM_BACKEND", raising=False)
    return rec


def _masked_fp4_call(device):
    import fp8gemm
    g, max_m, n, k = 2, 24, 64, 256
    codes = torch.randint(0, 256, (g, max_m, k // 2), dtype=torch.uint8, device=device)
    sbytes = torch.randint(124, 131, (g, max_m, k // 32), dtype=torch.uint8, device=device)
    b = torch.randn(g, n, k, device=device).to(FP8)
    sfb = torch.rand(g, 1, k // 128, device=device) + 0.5
    masked_m = torch.tensor([17, 5], dtype=torch.int32, device=device)
    d = torch.full((g, max_m, n), float("nan"), dtype=torch.bfloat16, device=device)
    fp8gemm.m_grouped_fp8_gemm_nt_masked((codes, sbytes), (b, sfb), d, masked_m, 12)
    return d


def test_dispatch_fp4_route_uses_pdl(recorded_fp4_route, device, monkeypatch):
    assert runtime.get_pdl() is True
    torch.manual_seed(1)
    d_on = _masked_fp4_call(device)
    assert recorded_fp4_route.convert == [True] and recorded_fp4_route.gemm == [("masked", True)]
    monkeypatch.setattr(runtime, "_pdl", False)          # fp8gemm.set_pdl(False), undone after the test
    torch.manual_seed(1)
    d_off = _masked_fp4_call(device)
    assert recorded_fp4_route.convert == [True, False] and recorded_fp4_route.gemm[1] == ("masked", False)
    assert torch.equal(d_on.cpu().view(torch.int16), d_off.cpu().view(torch.int16))   # same bits either way
    assert not d_on[0, :17].isnan().any() and d_on[0, 17:].isnan().all() and d_on[1, 5:].isnan().all()


def test_dispatch_fp8_route_never_uses_pdl(recorded_fp4_route, device):
    import fp8gemm
    a = torch.randn(2, 24, 256, device=device).to(FP8)
    sfa = torch.rand(2, 24, 2, device=device) + 0.5
    b = torch.randn(2, 64, 256, device=device).to(FP8)
    sfb = torch.rand(2, 1, 2, device=device) + 0.5
    d = torch.empty(2, 24, 64, dtype=torch.bfloat16, device=device)
    fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, torch.tensor([3, 24], dtype=torch.int32,
                                                                              device=device), 12)
    assert recorded_fp4_route.gemm == [("masked", False)] and recorded_fp4_route.convert == []


@pytest.mark.skipif(not runtime.interpreting(), reason="the interpreter's launch (CPU machines)")
def test_interpreter_never_gets_the_trigger(monkeypatch):
    """``pdl_trigger=True`` under the interpreter: the kernel runs without the inline assembly (same bytes)."""
    seen = {}
    real = FC.fp4_to_fp8_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.update(kw)
                return real[grid](*args, **kw)
            return run
    monkeypatch.setattr(FC, "fp4_to_fp8_kernel", Spy())
    codes = torch.randint(0, 256, (40, 128), dtype=torch.uint8)
    sbytes = torch.randint(124, 131, (40, 8), dtype=torch.uint8)
    q, sf = FC.empty_fp8_operand(codes, 256)
    FC.launch_fp4_to_fp8(codes, sbytes, q, sf, pdl_trigger=True)
    assert seen["PDL_TRIGGER"] is False and seen["SOFT"] is True
    want_q, want_sf = FC.fp4_to_fp8_reference(codes, sbytes)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(sf, want_sf)
