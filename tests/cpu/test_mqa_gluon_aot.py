"""CPU tests of the warp-specialised Gluon MQA-logits prefill (fp8gemm.kernels.mqa_gluon): it imports without
a GPU, declines what it does not cover, FP8GEMM_BACKEND picks the kernel, and it compiles ahead of time for
sm_90a with QGMMA, no local memory, no ptxas serialisation of its asynchronous MMAs (C7514/C7515), and the
overlap it exists for visible in the SASS: the next tile's QGMMA group is issued before the epilogue (FMNMX
of the ReLU) of the previous one, which waits with ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` (one MMA still in flight).
"""
from __future__ import annotations

import re

import pytest
import torch

import fp8gemm
from fp8gemm.kernels import mqa_gluon as mg
from fp8gemm.testing import compile_sm90_in_subprocess, ptxas_log, sass_count

FP8 = torch.float8_e4m3fn


def _inputs(seq_len, seq_len_kv, h, d, device="cpu"):
    q = torch.zeros(seq_len, h, d, device=device).to(FP8)
    kv = torch.zeros(seq_len_kv, d, device=device).to(FP8)
    sf = torch.ones(seq_len_kv, device=device)
    w = torch.zeros(seq_len, h, device=device)
    ks = torch.zeros(seq_len, dtype=torch.int32, device=device)
    ke = torch.full((seq_len,), seq_len_kv, dtype=torch.int32, device=device)
    return q, kv, sf, w, ks, ke


def test_supports_declines_cpu_and_uncovered_forms():
    q, kv, sf, w, ks, ke = _inputs(8, 64, 64, 128)
    assert mg.supports(q, kv, sf, w, ks, ke, True, 0) is False          # CPU tensors
    assert mg.supports(q, kv, sf, w, ks, ke, True, 64) is False         # compressed form
    assert mg.supports(None, None, None, None, None, None, True, 0) is False


def test_config_fits():
    for h in mg.NUM_HEADS:
        for d in mg.HEAD_DIMS:
            cfg = mg.config(h, d)
            assert cfg.block_q * h == 2 * mg.HALF_N
            assert cfg.stages >= 4
            smem = 4 * mg.HALF_N * d + cfg.stages * mg.BLOCK_KV * d
            assert smem <= 220 * 1024
            # 4 + 4 consumer warps and the producer warpgroup's share at launch
            assert cfg.maxnreg * 12 * 32 <= 65536


def test_backend_env_routes_prefill(monkeypatch):
    """FP8GEMM_BACKEND=triton keeps the Triton kernel; =gluon refuses a call the Gluon kernel does not cover
    (H16 D32 is not covered on any machine)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, kv, sf, w, ks, ke = _inputs(4, 64, 16, 32, device=dev)
    monkeypatch.setenv("FP8GEMM_BACKEND", "gluon")
    with pytest.raises(RuntimeError, match="FP8GEMM_BACKEND=gluon"):
        fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke)
    monkeypatch.setenv("FP8GEMM_BACKEND", "triton")
    out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke)
    assert out.shape == (4, 64) and bool((out == 0).all())


def test_backend_routes_prefill_to_the_gluon_launch(monkeypatch):
    """The routing itself, with a spy in place of the Gluon launch (the outputs of the two kernels are often
    bit-equal, so comparing values cannot show which one ran): FP8GEMM_BACKEND=gluon calls it once with the
    call's clean_logits and returns what it wrote; auto and triton never call it."""
    q, kv, sf, w, ks, ke = _inputs(4, 64, 64, 128)
    calls = []

    def spy(q, kv, sf, w, ks, ke, out, clean, num_sms, cfg=None):
        calls.append(clean)
        out.fill_(7.0)
    monkeypatch.setattr(mg, "supports", lambda *args: True)
    monkeypatch.setattr(mg, "launch", spy)
    monkeypatch.setenv("FP8GEMM_BACKEND", "gluon")
    out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke, clean_logits=False)
    assert calls == [False] and out.shape == (4, 64) and bool((out == 7.0).all())
    for backend in ("auto", "triton"):
        calls.clear()
        monkeypatch.setenv("FP8GEMM_BACKEND", backend)
        out = fp8gemm.fp8_mqa_logits(q, (kv, sf), w, ks, ke)
        assert calls == [] and not bool((out == 7.0).any()), backend


if not mg.HAS_GLUON:  # pragma: no cover
    pytest.skip("triton without Gluon", allow_module_level=True)


def _compile(h, d, clean):
    from triton.runtime.jit import mangle_type
    cfg = mg.config(h, d)
    q = torch.empty(256 * h, d, dtype=FP8, device="cpu")
    sig = {"q_desc": mangle_type(mg._desc2d(q, 256 * h, (mg.HALF_N, d))),
           "kv_desc": mangle_type(mg._desc2d(q, 256, (mg.BLOCK_KV, d))),
           "kvs_ptr": "*fp32", "w_ptr": "*fp32", "ks_ptr": "*i32", "ke_ptr": "*i32", "out_ptr": "*fp32",
           "seq_len": "i32", "seq_len_kv": "i32", "stride_w": "i32", "stride_out": "i32"}
    constexprs = dict(H=h, BLOCK_Q=cfg.block_q, STAGES=cfg.stages, CLEAN=clean, PRODUCER_REGS=cfg.producer_regs)
    r = compile_sm90_in_subprocess("fp8gemm.kernels.mqa_gluon", "mqa_logits_ws_kernel", sig, constexprs,
                                   num_warps=cfg.num_warps, gluon=True, maxnreg=cfg.maxnreg,
                                   divisible_by_16=["kvs_ptr", "w_ptr", "ks_ptr", "ke_ptr", "out_ptr",
                                                    "stride_w", "stride_out"])
    return cfg, r


def _opcodes(sass: str) -> list[str]:
    """The SASS instructions in program order, predicate stripped (``QGMMA.64x128x32...``, ``FMNMX``, ...)."""
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", line)
        if m:
            ops.append(m.group(2) + m.group(3))
    return ops


def _qgmma_groups(ops: list[str]) -> list[tuple[int, int]]:
    """Runs of QGMMA (instructions between them that are neither a wait nor the epilogue's FMNMX allowed)."""
    runs, start, last = [], None, None
    for k, op in enumerate(ops):
        if op.startswith("QGMMA"):
            if start is None:
                start = k
            last = k
        elif start is not None and op.startswith(("WARPGROUP.DEPBAR", "FMNMX", "SHFL", "STG", "BRA")):
            runs.append((start, last))
            start = None
    if start is not None:
        runs.append((start, last))
    return runs


def _check_overlap(ops: list[str]) -> tuple[int, int, int]:
    """(QGMMA groups, groups whose first following warpgroup wait is ``gsb0, 0x0`` with no epilogue FMNMX
    before the next group, groups whose first wait is ``gsb0, 0x1`` followed by FMNMX before the next group)."""
    runs = _qgmma_groups(ops)
    serial = overlapped = 0
    for (s, e), nxt in zip(runs, runs[1:] + [(len(ops), len(ops))]):
        waits = [k for k in range(e + 1, nxt[0]) if ops[k].startswith("WARPGROUP.DEPBAR")]
        if not waits:
            continue
        w = waits[0]
        fmnmx_after = any(op.startswith("FMNMX") for op in ops[w + 1:nxt[0]])
        if re.search(r"gsb0,\s*0x0", ops[w]) and not fmnmx_after:
            serial += 1
        if re.search(r"gsb0,\s*0x1", ops[w]) and fmnmx_after:
            overlapped += 1
    return len(runs), serial, overlapped


VARIANTS = [(64, 128, True), (32, 64, False), (64, 64, True), (32, 128, False)]


@pytest.mark.parametrize("h,d,clean", VARIANTS)
def test_aot_sm90a(tmp_path, h, d, clean):
    cfg, r = _compile(h, d, clean)
    sass = r["sass"]
    per_tile = d // 32                                   # QGMMA.64x128x32 per KV tile and warpgroup
    assert sass_count(sass, "QGMMA") >= 2 * 4 * per_tile, "expected the MMAs of both consumer warpgroups"
    assert "QGMMA.64x128x32.F32.E4M3.E4M3" in sass
    assert r["local"] == 0 and r["stack"] == 0, (r["local"], r["stack"])
    assert sass_count(sass, "LDL") == 0 and sass_count(sass, "STL") == 0
    assert r["shared"] >= 4 * mg.HALF_N * d + cfg.stages * mg.BLOCK_KV * d
    assert r["shared"] <= 227 * 1024
    # the worker consumer warpgroup gets the consumer register budget (the producer warp gives its share)
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+232;", r["ptx"])
    # ptxas keeps the MMAs asynchronous (C7514/C7515 would mean a wait after every issue)
    log = ptxas_log(r["ptx"])
    assert "C7514" not in log and "C7515" not in log, log
    assert "0 bytes spill stores" in log, log
    # the overlap: epilogue FMNMX after a wait that leaves the next tile's MMA in flight, and not every
    # QGMMA group followed at once by a full wait
    ops = _opcodes(sass)
    groups, serial, overlapped = _check_overlap(ops)
    assert overlapped >= 2, (groups, serial, overlapped)          # the X and Y epilogues of the main loop
    assert serial < groups, (groups, serial, overlapped)
    assert any(re.search(r"WARPGROUP\.DEPBAR\.LE gsb0,\s*0x1", op) for op in ops)
