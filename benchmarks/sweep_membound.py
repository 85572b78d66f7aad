"""Launch-configuration sweep of the memory-bound kernels (casts, pre-dispatch, paged MQA) and the MQA
prefill tiles, in one process on one GPU, with a same-run copy ceiling.

    PYTHONPATH=. python3 benchmarks/sweep_membound.py --out $OUT [--only quant,pre,paged,prefill]

Every configuration's output is compared byte for byte with the default configuration's (quant,
pre-dispatch) or with the default's logits (MQA, max abs difference) before it is timed; a config whose
output differs is reported as WRONG and not timed.  Times: CUDA-graph replays with the L2 flushed
(``fp8gemm.bench.core.time_us``).  GB/s count the bytes a perfect kernel moves (input read once, every
output written once).  Writes ``sweep_membound.json`` and prints one line per configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from fp8gemm import attention, runtime
from fp8gemm import reference as R
from fp8gemm.bench import core as bench_core
from fp8gemm.bench.core import time_us
from fp8gemm.bench.suite_moe_act import pre_dispatch_operands
from fp8gemm.kernels import moe_act as KM
from fp8gemm.kernels import mqa as KMQ
from fp8gemm.kernels import quant as KQ
from fp8gemm.kernels import quant_gluon as KQG

FP8 = torch.float8_e4m3fn
ROWS: list[dict] = []
# Gluon per-channel tiles (block_n, vec, tpw_r, wpc_r, warps); the Triton ones are the (BLOCK_N, warps) pairs
PER_CHANNEL_GLUON = [(64, 8, 4, 4, 4), (64, 8, 8, 2, 4), (64, 8, 4, 8, 8), (32, 8, 8, 4, 4), (128, 8, 4, 4, 8),
                     (64, 8, 4, 2, 2), (128, 8, 2, 4, 4), (64, 8, 16, 1, 4)]


def copy_ceiling() -> float:
    """GB/s (read + write) of a 1 GiB device-to-device copy in this process."""
    a = torch.empty(1 << 29, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    us = time_us(lambda: b.copy_(a))
    gbs = 2 * a.numel() * 2 / us / 1e3
    print(f"copy 1 GiB: {us:.1f} us, {gbs:.0f} GB/s", flush=True)
    ROWS.append(dict(kind="copy", config="1GiB", us=us, gbs=gbs))
    return gbs


def _snapshot(ts):
    return [t.view(torch.uint8).clone() if t.dtype != torch.float32 else t.clone() for t in ts]


def _same(a, b) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def sweep(kind: str, name: str, nbytes: float, launch, outputs, configs, ceiling: float, compare=None):
    """``launch(config)`` writes ``outputs``; config None is the default and the reference."""
    for t in outputs:
        t.view(torch.uint8).fill_(0xFF)
    launch(None)
    torch.cuda.synchronize()
    want = _snapshot(outputs)
    for cfg in [None] + configs:
        tag = "default" if cfg is None else str(list(cfg) if isinstance(cfg, tuple) else cfg)
        try:
            for t in outputs:
                t.view(torch.uint8).fill_(0xA5)
            launch(cfg)
            torch.cuda.synchronize()
            ok = compare(want, outputs) if compare else _same(want, outputs)
            if not ok:
                print(f"{kind:8s} {name:40s} {tag:28s} WRONG", flush=True)
                ROWS.append(dict(kind=kind, name=name, config=tag, wrong=True))
                continue
            us = time_us(lambda: launch(cfg))
        except Exception as e:  # a config that does not compile (smem, registers) is reported, not fatal
            print(f"{kind:8s} {name:40s} {tag:28s} FAILED {type(e).__name__}: {str(e)[:80]}", flush=True)
            ROWS.append(dict(kind=kind, name=name, config=tag, error=str(e)[:200]))
            continue
        gbs = nbytes / us / 1e3
        print(f"{kind:8s} {name:40s} {tag:28s} {us:8.1f} us {gbs:7.0f} GB/s {100 * gbs / ceiling:5.1f}% copy",
              flush=True)
        ROWS.append(dict(kind=kind, name=name, config=tag, us=us, gbs=gbs, frac_copy=gbs / ceiling))


def quant_sweeps(ceiling):
    m, k = 8192, 7168
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(m, k, device="cuda", dtype=FP8)
    sf_tok = torch.empty(m, k // 128, device="cuda", dtype=torch.float32)
    sf_blk = torch.empty(m // 128, k // 128, device="cuda", dtype=torch.float32)
    by_tok = x.numel() * 2 + q.numel() + sf_tok.numel() * 4
    by_blk = x.numel() * 2 + q.numel() + sf_blk.numel() * 4
    sweep("quant", f"per_block {m}x{k}", by_blk,
          lambda c: KQ.launch_per_block(x, q, sf_blk, 128, False, False, config=c), (q, sf_blk),
          [(1, 4), (1, 8), (2, 8), (1, 4, 1), (1, 4, 2), (1, 8, 1), (1, 8, 2), (2, 8, 1), (2, 8, 2), (2, 4, 1),
           (2, 4, 2), (1, 16, 1)], ceiling)
    sweep("quant", f"per_token {m}x{k}", by_tok,
          lambda c: KQ.launch_per_token(x, q, sf_tok, 128, False, False, config=c), (q, sf_tok),
          [(16, 4, 4), (16, 4, 4, 2), (8, 4, 4, 4), (16, 4, 8, 2), (32, 4, 8, 2), (4, 4, 4, 8), (4, 4, 4, 6)],
          ceiling)
    sf_ch = torch.empty(m // 128, k, device="cuda", dtype=torch.float32)
    sweep("quant", f"per_channel {m}x{k}", x.numel() * 2 + q.numel() + sf_ch.numel() * 4,
          lambda c: KQ.launch_per_channel(x, q, sf_ch, 128, False, False, config=c), (q, sf_ch),
          [(64, 4), (128, 8), (64, 2)] + [KQG.PerChannelConfig(*c) for c in PER_CHANNEL_GLUON], ceiling)
    q4 = torch.empty(m, k // 2, device="cuda", dtype=torch.uint8)
    sf4 = torch.empty(m, k // 32, device="cuda", dtype=torch.uint8)
    sweep("quant", f"per_token_fp4 {m}x{k}", x.numel() * 2 + q4.numel() + sf4.numel(),
          lambda c: KQ.launch_per_token_fp4(x, q4, sf4, 32, True, config=c), (q4, sf4),
          [(8, 16, 4), (16, 16, 8), (4, 16, 4), (8, 8, 4)], ceiling)


def pre_dispatch_sweeps(ceiling):
    n, cap, hidden = 4096, 4608, 7168
    for fp4, gs in ((False, 128), (True, 32)):
        x, idx, w, bufs, nbytes = pre_dispatch_operands(n, cap, gs, fp4, code_dtype=torch.uint8)
        configs = ([(16, 4, 4), (8, 4, 4), (4, 4, 4), (16, 4, 8), (32, 4, 8), (8, 8, 8), (16, 8, 8), (32, 2, 8),
                    (16, 4, 4, 2), (4, 4, 4, 8)] if not fp4
                   else [(8, 16, 4), (8, 16, 4, 2), (4, 16, 4, 4), (16, 16, 8, 2), (8, 8, 4, 4)])
        sweep("pre", f"pre_dispatch {'fp4/32' if fp4 else 'fp8/128'} {n}x{hidden} cap{cap}", nbytes,
              lambda c, bufs=bufs, fp4=fp4, gs=gs: KM.launch_pre_dispatch(
                  x, idx, w, *bufs, n, gs, fp4, False, True, False, config=c),
              bufs, configs, ceiling)
    # The same cast without routing or padding at the same size: what the size alone costs.
    q = torch.empty(n, hidden, device="cuda", dtype=FP8)
    sf = torch.empty(n, hidden // 128, device="cuda", dtype=torch.float32)
    sweep("pre", f"per_token {n}x{hidden} (size reference)", x.numel() * 2 + q.numel() + sf.numel() * 4,
          lambda c: KQ.launch_per_token(x, q, sf, 128, False, False, config=c), (q, sf), [(8, 4, 4)], ceiling)


def _logits_close(want, got) -> bool:
    a, b = want[0], got[0]
    fin = torch.isfinite(a)
    if not torch.equal(fin, torch.isfinite(b)):
        return False
    return bool(((a[fin] - b[fin]).abs().max() <= 1e-3 * a[fin].abs().max().clamp(min=1)).item())


def paged_sweeps(ceiling):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fp8gemm.bench.suite_mqa import _paged_setup, BLOCK_KV
    import fp8gemm
    P = KMQ.PagedConfig
    for batch, next_n, h, d, avg in ((256, 1, 64, 128, 16384), (256, 1, 64, 128, 65536), (1024, 2, 64, 128, 8192)):
        q, cache, w, lens, ctx2, table, max_len = _paged_setup(batch, next_n, h, d, avg, seed=batch + next_n)
        sum_lens = int(lens.sum())
        nbytes = (q.numel() + w.numel() * 4 + ctx2.numel() * 4 + sum_lens * (d + 4) + (sum_lens // BLOCK_KV) * 4
                  + sum_lens * next_n * 4)
        meta = fp8gemm.get_paged_mqa_logits_metadata(ctx2, BLOCK_KV, runtime.get_num_sms())
        holder = [None]

        def launch(cfg, q=q, cache=cache, w=w, ctx2=ctx2, table=table, meta=meta, max_len=max_len):
            holder[0] = attention._run_paged(q, cache, w, ctx2, table, meta, max_len, False, cfg)
            return holder[0]

        launch(None)
        # clean_logits=False leaves positions past each row's context unwritten: compare the valid ones.
        valid = R.paged_mqa_logits_valid_mask(ctx2, next_n, max_len)
        out_ref = torch.where(valid, holder[0], 0.0)

        def compare(_want, _outs, out_ref=out_ref, valid=valid):
            return _logits_close([out_ref], [torch.where(valid, holder[0], 0.0)])
        configs = [P(64, 2, 4, 4), P(64, 3, 4, 4), P(64, 3, 4, 5), P(64, 4, 4, 5), P(64, 4, 4, 6),
                   P(128, 2, 4, 4), P(128, 2, 8, 4), P(32, 4, 4, 6)]
        sweep("paged", f"paged B{batch} N{next_n} L{avg}", nbytes, launch, [], configs, ceiling, compare)


def prefill_sweeps(ceiling):
    for sq, sk, h, d in ((8192, 8192, 64, 128), (8192, 8192, 32, 64)):
        gen = torch.Generator(device="cuda").manual_seed(sq * 7 + h)
        q = torch.randn(sq, h, d, device="cuda", generator=gen).to(FP8)
        kv, sf = R.quantize_kv_per_token(torch.randn(sk, d, device="cuda", generator=gen))
        w = torch.randn(sq, h, device="cuda", generator=gen)
        for causal in (True, False):
            ks = torch.zeros(sq, dtype=torch.int32, device="cuda")
            ke = (torch.arange(sq, dtype=torch.int32, device="cuda") + (sk - sq)) if causal else \
                torch.full((sq,), sk, dtype=torch.int32, device="cuda")
            pairs = int((ke.clamp(0, sk) - ks).clamp(min=0).sum())
            flops = 2.0 * pairs * h * d
            holder = [None]

            def launch(cfg, q=q, kv=kv, sf=sf, w=w, ks=ks, ke=ke):
                holder[0] = attention._run_prefill(q, kv, sf, w, ks, ke, True, 0, cfg)
                return holder[0]
            launch(None)
            out_ref = holder[0].clone()
            dflt = KMQ.prefill_config(h, d)
            rep = dataclasses.replace
            half = rep(dflt, block_q=dflt.block_q // 2)
            variants = os.environ.get("PREFILL_VARIANTS", "all")
            if variants == "regs":
                # N = 128 with the register cap that lets 4 programs share an SM (DeepGEMM's 4 x 64x128)
                cfgs = [None, half, rep(half, maxnreg=128), rep(half, maxnreg=128, num_stages=4),
                        rep(half, maxnreg=128, num_stages=2), rep(half, maxnreg=168), None]
            else:
                cfgs = [None, rep(dflt, interior=False), rep(dflt, num_warps=8), rep(dflt, num_stages=4), half, None]
            for cfg in cfgs:
                tag = "default" if cfg is None else (f"{cfg.block_q},{cfg.block_k},{cfg.num_warps},{cfg.num_stages}"
                                                     + ("" if cfg.interior else ",masked")
                                                     + ("" if cfg.maxnreg is None else f",r{cfg.maxnreg}"))
                try:
                    launch(cfg)
                    torch.cuda.synchronize()
                    if not _logits_close([out_ref], [holder[0]]):
                        print(f"prefill  SQ{sq} SK{sk} H{h} D{d} {'causal' if causal else 'full'} {tag} WRONG")
                        continue
                    us = time_us(lambda: launch(cfg))
                except Exception as e:
                    print(f"prefill  {tag} FAILED {type(e).__name__}: {str(e)[:80]}", flush=True)
                    continue
                tf = flops / us / 1e6
                print(f"prefill  SQ{sq} SK{sk} H{h} D{d} {'causal' if causal else 'full':6s} {tag:16s} {us:8.1f} us "
                      f"{tf:6.0f} TFLOPS", flush=True)
                ROWS.append(dict(kind="prefill", name=f"SQ{sq} SK{sk} H{h} D{d} {'causal' if causal else 'full'}",
                                 config=tag, us=us, tflops=tf))
            # The default without the -inf fill (clean_logits=False; DeepGEMM runs its fill as a second kernel):
            # what the fill costs inside ours.  Checked on the finite positions of the reference output.
            out_nc = attention._run_prefill(q, kv, sf, w, ks, ke, False, 0, None)
            fin = torch.isfinite(out_ref)
            if not torch.allclose(out_nc[fin], out_ref[fin], rtol=1e-3, atol=1e-3):
                print(f"prefill  SQ{sq} SK{sk} H{h} D{d} no-fill WRONG")
                continue
            us = time_us(lambda: attention._run_prefill(q, kv, sf, w, ks, ke, False, 0, None))
            tf = flops / us / 1e6
            print(f"prefill  SQ{sq} SK{sk} H{h} D{d} {'causal' if causal else 'full':6s} {'default,no-fill':16s} "
                  f"{us:8.1f} us {tf:6.0f} TFLOPS", flush=True)
            ROWS.append(dict(kind="prefill", name=f"SQ{sq} SK{sk} H{h} D{d} {'causal' if causal else 'full'}",
                             config="default,no-fill", us=us, tflops=tf))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results")
    ap.add_argument("--only", default="quant,pre,paged,prefill")
    ap.add_argument("--flush", default="write", choices=("write", "read"),
                    help="how the L2 is evicted before each timed call (fp8gemm.bench.core.FLUSH_MODE)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bench_core.FLUSH_MODE = args.flush
    print(torch.cuda.get_device_name(), f"(L2 flush: {args.flush})", flush=True)
    ceiling = copy_ceiling()
    t0 = time.time()
    for part in args.only.split(","):
        {"quant": quant_sweeps, "pre": pre_dispatch_sweeps, "paged": paged_sweeps, "prefill": prefill_sweeps}[part](ceiling)
        print(f"-- {part} done at {time.time() - t0:.0f} s", flush=True)
        with open(os.path.join(args.out, "sweep_membound.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_gbs=ceiling, flush=args.flush, rows=ROWS), f,
                      indent=1)


if __name__ == "__main__":
    main()
