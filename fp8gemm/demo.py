"""The demo behind ``python -m fp8gemm demo``: every public kernel once, checked against the reference.

On a GPU it uses realistic DeepSeek-V3 shapes; without one it runs the same kernels through Triton's
interpreter on small shapes.  Prints one line per operation (where it ran, which backend, the error
against :mod:`fp8gemm.reference`, pass/fail) and exits non-zero if any check fails.
"""
from __future__ import annotations

import math
import time

import torch

import fp8gemm
from fp8gemm import reference as R
from fp8gemm import runtime
from fp8gemm.testing import calc_diff, check_signal


def _fp8(*shape, device):
    return torch.randn(*shape, device=device).to(torch.float8_e4m3fn)


def _sc(*shape, device):
    return torch.rand(*shape, device=device) + 0.5


def _checks(device, big: bool):
    m, n, k = (4096, 7168, 2048) if big else (96, 160, 384)

    def dense():
        a, b = _fp8(m, k, device=device), _fp8(n, k, device=device)
        sfa, sfb = _sc(m, k // 128, device=device), _sc(math.ceil(n / 128), k // 128, device=device)
        d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
        fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
        return f"{m}x{n}x{k}", calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb)), 1e-3

    def decode():
        # one token: the split-K swap-A/B kernel (fp8gemm.kernels.gemm_skinny) on every backend
        nn, kk = (2112, 7168) if big else (160, 1024)
        a, b = _fp8(1, kk, device=device), _fp8(nn, kk, device=device)
        sfa, sfb = _sc(1, kk // 128, device=device), _sc(math.ceil(nn / 128), kk // 128, device=device)
        d = torch.full((1, nn), float("nan"), dtype=torch.bfloat16, device=device)
        fp8gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)
        return f"1x{nn}x{kk} (decode)", calc_diff(d, R.fp8_gemm_nt(a, sfa, b, sfb)), 1e-3

    def masked():
        g, max_m, nn, kk = (8, 256, 4096, 7168) if big else (3, 64, 128, 256)
        masked_m = torch.tensor([max_m // 2, 0, max_m - 3] + [7] * (g - 3), dtype=torch.int32, device=device)
        a, b = _fp8(g, max_m, kk, device=device), _fp8(g, nn, kk, device=device)
        sfa, sfb = _sc(g, max_m, kk // 128, device=device), _sc(g, nn // 128, kk // 128, device=device)
        d = torch.full((g, max_m, nn), float("nan"), dtype=torch.bfloat16, device=device)
        signal = fp8gemm.alloc_signal(g, max_m, device)
        block_m, threshold = fp8gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, 16,
                                                                  enable_overlap=True, signal=signal)
        check_signal(signal, masked_m, max_m, nn, block_m, threshold)
        ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, torch.zeros_like(d))
        rows = [(i, int(c)) for i, c in enumerate(masked_m.tolist())]
        for i, c in rows:
            if not d[i, c:].isnan().all():
                return "rows past masked_m written", 1.0, 1e-3
        got = torch.cat([d[i, :c] for i, c in rows])
        want = torch.cat([ref[i, :c] for i, c in rows])
        return f"G{g} max_m{max_m} n{nn} k{kk} +signals", calc_diff(got, want), 1e-3

    def contiguous():
        g, nn, kk = (4, 4096, 7168) if big else (2, 96, 256)
        per = 1024 if big else 100
        ids = []
        for e in range(g):
            ids += [e] * per + [-1] * ((-per) % 128)
        mi = torch.tensor(ids, dtype=torch.int32, device=device)
        mm = len(ids)
        a, b = _fp8(mm, kk, device=device), _fp8(g, nn, kk, device=device)
        sfa, sfb = _sc(mm, kk // 128, device=device), _sc(g, math.ceil(nn / 128), kk // 128, device=device)
        d = torch.full((mm, nn), float("nan"), dtype=torch.bfloat16, device=device)
        fp8gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, mi)
        ok = mi >= 0
        if not d[~ok].isnan().all():
            return "padding rows written", 1.0, 1e-3
        ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, mi, torch.zeros_like(d))
        return f"G{g} rows{mm} n{nn} k{kk}", calc_diff(d[ok], ref[ok]), 1e-3

    checks = [("fp8_gemm_nt", dense), ("fp8_gemm_nt", decode), ("m_grouped_fp8_gemm_nt_masked", masked),
              ("m_grouped_fp8_gemm_nt_contiguous", contiguous)]
    if hasattr(fp8gemm, "per_token_cast_to_fp8"):
        def quant():
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            q, s = fp8gemm.per_token_cast_to_fp8(x)
            rq, rs = R.per_token_cast_to_fp8(x)
            mismatched = int((q.view(torch.uint8) != rq.view(torch.uint8)).sum()) + int((s != rs).sum())
            return f"{m}x{k} bf16 (mismatched bytes)", float(mismatched), 0.0
        checks.append(("per_token_cast_to_fp8", quant))
    def mqa():
        sq, skv, h, dd = (1024, 4096, 64, 128) if big else (24, 80, 16, 32)
        q = torch.randn(sq, h, dd, device=device).to(torch.float8_e4m3fn)
        kv = torch.randn(skv, dd, device=device).to(torch.float8_e4m3fn)
        kv_sf = torch.rand(skv, device=device) + 0.5
        w = torch.randn(sq, h, device=device)
        ke = torch.randint(1, skv + 1, (sq,), device=device, dtype=torch.int32)
        ks = (ke - torch.randint(0, skv // 2, (sq,), device=device, dtype=torch.int32)).clamp(min=0)
        out = fp8gemm.fp8_mqa_logits(q, (kv, kv_sf), w, ks, ke)
        ref = R.fp8_mqa_logits(q, kv, kv_sf, w, ks, ke)
        finite = torch.isfinite(ref)
        if not torch.equal(finite, torch.isfinite(out)):
            return "the -inf pattern differs", 1.0, 1e-3
        return f"SQ{sq} SK{skv} H{h} D{dd} ragged", calc_diff(out[finite], ref[finite]), 1e-3

    def pre_dispatch():
        t, hidden, topk, cap = (512, 7168, 8, 640) if big else (5, 256, 2, 8)
        x = torch.randn(t, hidden, device=device, dtype=torch.bfloat16)
        idx = torch.randint(0, 64, (t, topk), device=device)
        wts = torch.rand(t, topk, device=device)
        buf_x = torch.empty(cap, hidden, dtype=torch.float8_e4m3fn, device=device)
        buf_sf = torch.empty(cap, hidden // 128, dtype=torch.uint8, device=device)
        buf_idx = torch.empty(cap, topk, dtype=idx.dtype, device=device)
        buf_w = torch.empty(cap, topk, dtype=torch.float32, device=device)
        fp8gemm.mega_moe_pre_dispatch(x, idx, wts, buf_x, buf_sf, buf_idx, buf_w, t, 128, False)
        q, sfb = R.per_token_cast_to_fp8(x, use_ue8m0=True)
        bad = int((buf_x[:t].view(torch.uint8) != q.view(torch.uint8)).sum())
        bad += int((buf_sf[:t] != R.to_ue8m0_bytes(sfb)).sum())
        bad += int((buf_idx[t:] != -1).sum()) + int((buf_x[t:].view(torch.uint8) != 0).sum())
        return f"{t} tokens, hidden {hidden}, top-{topk} (mismatched bytes)", float(bad), 0.0

    checks += [("fp8_mqa_logits", mqa), ("mega_moe_pre_dispatch", pre_dispatch)]
    return checks


def run_demo(argv: list[str]) -> int:
    gpu = torch.cuda.is_available() and not runtime.interpreting()
    device = torch.device("cuda" if gpu else "cpu")
    where = torch.cuda.get_device_name() if gpu else "CPU, Triton interpreter (TRITON_INTERPRET=1)"
    backend = runtime.backend()
    if gpu and runtime.is_sm90(device) and backend != "triton":
        backend += " (Gluon where supported)"
    print(f"fp8gemm {fp8gemm.__version__}: running on {where}; backend {backend}; SMs {fp8gemm.get_num_sms()}")
    torch.manual_seed(0)
    failures = 0
    for name, fn in _checks(device, big=gpu):
        t0 = time.perf_counter()
        try:
            shape, err, tol = fn()
            ok = err <= tol
        except Exception as exc:  # report and keep going: the summary must show every operation
            shape, err, ok = f"error: {exc!r}", float("nan"), False
        failures += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {name:34} {shape:36} err {err:.2e}  ({time.perf_counter() - t0:.1f} s)")
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0
