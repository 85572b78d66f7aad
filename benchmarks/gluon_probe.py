"""Cycle probe of the Gluon FP8 GEMM main loop: where do the ~920 cycles per 128-K slice go?

    PYTHONPATH=. python3 benchmarks/gluon_probe.py --out DIR          # < 2 min on one H100/H200

Launches ``fp8_gemm_ws_kernel`` with ``PROBE=True`` (the production config that ``launch`` picks: 128x128
tiles, 5 stages, 2 consumer warpgroups + 1 TMA producer warp) on 4096x4096x7168, 4096x2112x7168 and
4096x7168x2048.  Each program stamps ``%clock64`` (per-SM cycle counter, all warps of a program read the
same counter) for its first 32 K-slices, one thread per warpgroup / producer warp:

    consumer warpgroup (rows WG0, WG1), slice s:
        pre_bar   before the partition bar.sync that precedes the full-barrier wait
        pre_wait  after that bar.sync                         (pre_wait - pre_bar = warpgroup skew)
        full      after mbarrier.wait(full[s])                (full - pre_wait  = waiting for TMA data)
        issued    after the 4 QGMMA + commit of slice s
        mma_done  after warpgroup_mma_wait(1) for slice s    (issued after slice s+1 was issued)
        arrived   after mbarrier.arrive(empty[s])            (includes the arrive's partition bar.sync)
        promoted  after acc += part * sfa * sfb (64 FFMA)
    producer warp, slice s: pre_wait, empty (after mbarrier.wait(empty[s])), issued (after both TMA loads)

Before any number is read, the probe kernel's output is checked against ``fp8gemm.reference``
(calc_diff < 1e-3, no NaN), and so is the production kernel's.  Also timed: production vs probe kernel
(CUDA events, interleaved), so the probe's own cost is known; the SM clock is read three ways
(in-kernel %clock64 / %globaltimer, nvidia-smi sampled while the kernel loops, torch.cuda.clock_rate).

Output: per shape a table of per-event medians (cycles, p10-p90 over programs x steady slices), an
ASCII timeline of a few slices of program 0, a verdict list; ``DIR/gluon_probe.json`` (stats, program
0's raw stamps), ``DIR/gluon_probe_raw.pt`` (every stamp), ``DIR/gluon_probe.log`` (this output).

Diagnostic modes (``--diag 0,1,2,3,4``; ~1.5 min on one H100 for the three shapes): the kernel's ``DIAG``
constexpr removes one suspect of the slice period at a time (outputs are garbage in modes 1-4 and are not
checked; mode 0 is the production kernel and is checked):

    0  production
    1  L2-resident operands: every K-slice loaded from K coordinate 0 (same TMA/smem bytes, no DRAM traffic)
    2  no refill: each stage filled once, then the producer only arrives on the full barrier (no TMA, no
       smem writes, no L2/DRAM traffic; the MMAs read stale stages)
    3  no promotion: MMAs, waits and stage releases as usual, no scale loads and no promotion FFMAs
    4  2 + 3: the MMA + barrier loop alone

Per shape and mode: the probe's steady-state medians (period, MMA-done period, waits; PROBE on) and the time
with PROBE off (CUDA-graph replay, L2 flushed, ``fp8gemm.bench.core.time_us``; the probe runs follow the
timing loop right away, so both see the same clock), one table with mode 0 first, then interpretation
lines; ``DIR/gluon_probe_diag.json`` and ``DIR/gluon_probe_diag.log``.

    PYTHONPATH=. python3 benchmarks/gluon_probe.py --diag 0,1,2,3,4 --out DIR

Kernel variants (``--variants default,wide,split``; default: ``default`` only; with variants other than the
default and no ``--diag``, ``--diag 0,3``): the same per-mode rows for

    default  the production 128x128 kernel (one 8-warp consumer partition, scratch X/Y, the MMA of slice k issued
             before slice k-1 is promoted, warpgroup_mma_wait(1))
    wide     the opt-in 128x256 tile (gemm_gluon.wide_config: two one-warpgroup partitions, one scratch each,
             per slice MMA(left), wait(0), promote left, MMA(right), wait(0), release, promote right)
    split    the opt-in 128x128 tile of gemm_gluon.split_config (two one-warpgroup 64x128 partitions, one
             scratch each, per slice wait full -> MMA -> wait(0) -> release -> promote: DeepGEMM's order)

The wide/split kernels take DIAG 0 and 3 only (other modes are skipped for them).  Their probe stamps are per
K-slice with the default's event meanings (see gemm_gluon.EV_C_HALF): ``issued``/``mma_done`` belong to the
slice's last MMA (wide: the right half's), ``mmaW`` is then that MMA's whole wait(0) (nothing queued behind it),
``half`` (wide) = full -> left half's MMA, wait and promotion.  ``norm`` = period per 128x128x128 of the tile
(wide: period / 2; ideal 512 for all).  ~2 min on one H100 for --variants default,wide,split --diag 0,3:

    PYTHONPATH=. python3 benchmarks/gluon_probe.py --variants default,wide,split --diag 0,3 --out DIR
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SHAPES = [(4096, 4096, 7168), (4096, 2112, 7168), (4096, 7168, 2048)]
TENSOR_CYCLES_128 = 512      # 2*128*128*128 FLOP / 8192 FP8 FLOP per clock per SM (H100/H200 dense)
C_EVENTS = ["pre_bar", "pre_wait", "full", "issued", "mma_done", "arrived", "promoted"]
VARIANTS = ("default", "wide", "split")
WIDE_MODES = (0, 3)          # the DIAG modes the wide/split kernels take
P_EVENTS = ["pre_wait", "empty", "issued"]

_LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    _LOG.append(s)


# ------------------------------------------------------------------------------------------------
# launch
# ------------------------------------------------------------------------------------------------

def make_inputs(m, n, k, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(m, k, device="cuda", generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda", generator=g).to(torch.float8_e4m3fn)
    sfa = torch.rand(m, k // 128, device="cuda", generator=g) + 0.5
    sfb = torch.rand(math.ceil(n / 128), k // 128, device="cuda", generator=g) + 0.5
    d = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    return a, sfa, b, sfb, d


def production_config(gg, a, b, d, num_sms):
    cfg = gg._config_for("dense", a, b, d, None, None, 256, num_sms)
    assert not cfg.wide_n and (cfg.block_m, cfg.block_n) == (128, 128), cfg
    return cfg


def variant_config(gg, variant, a, b, d, num_sms):
    """The config a variant runs with: ``default`` = what ``launch`` picks (128x128), ``wide`` =
    ``wide_config()`` (128x256), ``split`` = ``split_config()`` (128x128, the default's stages)."""
    if variant == "default":
        return production_config(gg, a, b, d, num_sms)
    cfg = gg.wide_config() if variant == "wide" else gg.split_config()
    assert cfg.wide_n and cfg.block_n == (256 if variant == "wide" else 128), cfg
    return cfg


def launch_probe(gg, a, sfa, b, sfb, d, cfg, probe, num_sms, diag=None):
    """The same kernel launch as ``gemm_gluon.launch`` does for a dense BF16 TMA-store call, with
    ``PROBE=True`` and the probe buffer (``launch`` itself is left untouched); ``probe=None``: PROBE off.
    ``diag``: the kernel's ``DIAG`` mode (None: not passed, the production kernel)."""
    import triton
    m, k = a.shape
    n = b.shape[0]
    bm, bn = cfg.block_m, cfg.block_n
    # wide/split (cfg.wide_n): 64-row A boxes (one per consumer warpgroup), 128-wide B and D boxes, as launch does
    box_m, box_n = (bm // 2, 128) if cfg.wide_n else (bm, bn)
    a_desc = gg._desc2d(a, m, (box_m, gg.BLOCK_K), "fp8")
    b_desc = gg._desc2d(b, n, (box_n, gg.BLOCK_K), "fp8")
    d_desc = gg._desc2d(d, m, (box_m, box_n), "bf16")
    grid = (max(1, min(num_sms, triton.cdiv(m, bm) * triton.cdiv(n, bn))),)
    assert probe is None or (probe.numel() >= grid[0] * gg.PROBE_CTA_STRIDE and probe.dtype.itemsize == 8)
    sd, sa, sb = gg._s3(d), gg._s3(sfa), gg._s3(sfb)
    gg.fp8_gemm_ws_kernel[grid](
        a_desc, b_desc, d_desc, d, d, sfa, sfb, sfa, sfa, sfa, m, n, k, 1,
        sd[0], sd[1], 0, 0, sa[0], sa[1], sa[2], sb[0], sb[1], sb[2],
        MODE=0, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=cfg.group_m, STAGES=cfg.stages, TMA_STORE=True, HAS_C=False,
        HAS_SIGNAL=False, SB_SCALAR=(128 % bn == 0), K_ROTATE=cfg.k_rotate and not cfg.wide_n,
        PRODUCER_REGS=cfg.producer_regs, WIDE_N=cfg.wide_n, PROBE=probe is not None, probe_ptr=probe, num_warps=cfg.num_warps, maxnreg=cfg.maxnreg,
        **({} if diag is None else {"DIAG": diag}))
    return grid[0]


# ------------------------------------------------------------------------------------------------
# clocks
# ------------------------------------------------------------------------------------------------

class SmiSampler:
    """nvidia-smi sampled every 50 ms in the background (SM clock, max clock, power, temperature,
    throttle reasons) while the kernels run."""
    FIELDS = ["clocks.sm", "clocks.max.sm", "power.draw", "temperature.gpu", "clocks_throttle_reasons.active"]

    def __init__(self):
        self.rows, self.proc, self.fields, self.error = [], None, None, None

    def start(self):
        for fields in (self.FIELDS, self.FIELDS[:4], self.FIELDS[:1]):
            try:
                p = subprocess.run(["nvidia-smi", "--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits",
                                    "-i", self._index()], capture_output=True, text=True, timeout=20)
            except Exception as e:  # noqa: BLE001
                self.error = repr(e)
                return self
            if p.returncode == 0:
                self.fields = fields
                break
        if self.fields is None:
            self.error = "nvidia-smi query failed"
            return self
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=" + ",".join(self.fields),
                                      "--format=csv,noheader,nounits", "-i", self._index(), "-lms", "50"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _index():
        vis = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        first = vis.split(",")[0].strip() if vis else ""
        return first if first else "0"

    def _read(self):
        for line in self.proc.stdout:
            self.rows.append([x.strip() for x in line.split(",")])

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        return self

    def summary(self):
        if not self.rows:
            return {"error": self.error or "no samples"}
        out = {"samples": len(self.rows), "fields": self.fields}
        for i, f in enumerate(self.fields):
            vals = []
            for r in self.rows:
                try:
                    vals.append(float(r[i]) if not r[i].startswith("0x") else int(r[i], 16))
                except (ValueError, IndexError):
                    pass
            if vals:
                vals.sort()
                out[f] = {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1]}
        return out


def torch_clock_rate():
    import torch
    try:
        return float(torch.cuda.clock_rate(torch.cuda.current_device()))
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({type(e).__name__})"


# ------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------

def pct(vals, q):
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def stat(vals):
    return {"median": pct(vals, 0.5), "p10": pct(vals, 0.1), "p90": pct(vals, 0.9), "n": len(vals)} if vals else \
        {"median": None, "p10": None, "p90": None, "n": 0}


def analyse(raw, gg, num_k, stages, tiles_per_cta, variant="default"):
    """raw: int64 [programs, ROWS, SLICES, EVENTS] (lists).  Returns per-metric lists over programs x steady
    slices and per-program summaries.  ``variant`` wide/split (one partition per warpgroup, wait(0)): ``mma_wait``
    is the wait(0) of the slice's last MMA (issued -> done; nothing queued behind it), ``left_half`` (wide) the
    left half's MMA + wait + promotion."""
    serial = variant != "default"
    S_MAX = gg.PROBE_SLICES
    EC = dict(pre_bar=gg.EV_C_PRE_BAR, pre_wait=gg.EV_C_PRE_WAIT, full=gg.EV_C_FULL, issued=gg.EV_C_ISSUED,
              mma_done=gg.EV_C_MMA_DONE, arrived=gg.EV_C_ARRIVED, promoted=gg.EV_C_PROMOTED)
    EP = dict(pre_wait=gg.EV_P_PRE_WAIT, empty=gg.EV_P_EMPTY, issued=gg.EV_P_ISSUED)
    metrics = {k: [] for k in [
        "bar_before_full", "full_wait", "mma_issue", "mma_wait", "issue_to_done", "arrive", "promote", "left_half",
        "promote_to_next_bar", "period", "done_period", "wg_skew_abs",
        "p_empty_wait", "p_tma_issue", "p_interval", "p_lead", "load_latency_waited", "p_wake_after_free"]}
    queued = [0, 0]     # slices whose successor was issued >= 20 cycles before they completed / all
    per_cta = []
    for c, cta in enumerate(raw):
        hdr = cta[3][0]
        n_sl = min(S_MAX, tiles_per_cta[c] * num_k)
        wg = [cta[0], cta[1]]
        pr = cta[2]

        def C(w, s, e):
            return wg[w][s][EC[e]] if 0 <= s < n_sl else 0

        def P(s, e):
            return pr[s][EP[e]] if 0 <= s < n_sl else 0

        def steady(s):
            p = s % num_k
            return s >= stages + 2 and 2 <= p <= num_k - 3 and s + 2 < n_sl

        periods = []
        for s in range(n_sl):
            if not steady(s):
                continue
            for w in (0, 1):
                ev = {e: C(w, s, e) for e in EC}
                nx = {e: C(w, s + 1, e) for e in EC}
                n2 = C(w, s + 2, "pre_bar")
                if not all(ev.values()) or not all(nx.values()) or not n2:
                    continue
                m = metrics
                m["bar_before_full"].append(ev["pre_wait"] - ev["pre_bar"])
                m["full_wait"].append(ev["full"] - ev["pre_wait"])
                m["mma_issue"].append(ev["issued"] - ev["full"])
                m["mma_wait"].append(ev["mma_done"] - (ev["issued"] if serial else nx["issued"]))
                half = wg[w][s][gg.EV_C_HALF] if variant == "wide" else 0
                if half:
                    m["left_half"].append(half - ev["full"])
                m["issue_to_done"].append(ev["mma_done"] - ev["issued"])
                m["arrive"].append(ev["arrived"] - ev["mma_done"])
                m["promote"].append(ev["promoted"] - ev["arrived"])
                m["promote_to_next_bar"].append(n2 - ev["promoted"])
                m["period"].append(nx["pre_bar"] - ev["pre_bar"])
                m["done_period"].append(nx["mma_done"] - ev["mma_done"])
                periods.append(nx["pre_bar"] - ev["pre_bar"])
                queued[1] += 1
                if not serial and ev["mma_done"] - nx["issued"] >= 20:
                    queued[0] += 1
            if C(0, s, "pre_bar") and C(1, s, "pre_bar"):
                metrics["wg_skew_abs"].append(abs(C(1, s, "pre_bar") - C(0, s, "pre_bar")))
            pe = {e: P(s, e) for e in EP}
            if all(pe.values()) and P(s + 1, "issued"):
                metrics["p_empty_wait"].append(pe["empty"] - pe["pre_wait"])
                metrics["p_tma_issue"].append(pe["issued"] - pe["empty"])
                metrics["p_interval"].append(P(s + 1, "issued") - pe["issued"])
                need = min(x for x in (C(0, s, "pre_wait"), C(1, s, "pre_wait")) if x) if (C(0, s, "pre_wait") or C(1, s, "pre_wait")) else 0
                if need:
                    metrics["p_lead"].append(need - pe["issued"])
                for w in (0, 1):
                    if C(w, s, "full") and C(w, s, "full") - C(w, s, "pre_wait") >= 64:
                        metrics["load_latency_waited"].append(C(w, s, "full") - pe["issued"])
                        break
                freed = max(C(0, s - stages, "arrived"), C(1, s - stages, "arrived"))
                if freed and pe["empty"] - pe["pre_wait"] >= 64:
                    metrics["p_wake_after_free"].append(pe["empty"] - freed)
        clk0, ns0, clk1, ns1, smid, pclk0 = (hdr[gg.PROBE_HDR_CLK0], hdr[gg.PROBE_HDR_NS0], hdr[gg.PROBE_HDR_CLK1],
                                             hdr[gg.PROBE_HDR_NS1], hdr[gg.PROBE_HDR_SMID], hdr[gg.PROBE_HDR_PCLK0])
        first_full = C(0, 0, "full")
        per_cta.append(dict(
            cta=c, smid=smid, tiles=tiles_per_cta[c],
            cycles=(clk1 - clk0) if clk0 and clk1 else None,
            ns=(ns1 - ns0) if ns0 and ns1 else None,
            ghz=((clk1 - clk0) / (ns1 - ns0)) if clk0 and clk1 and ns1 > ns0 else None,
            first_data_cycles=(first_full - clk0) if first_full and clk0 else None,
            producer_start_minus_consumer=(pclk0 - clk0) if pclk0 and clk0 else None,
            median_period=pct(periods, 0.5)))
    return metrics, per_cta, queued


def analyse_runs(raws, gg, num_k, stages, tiles_per_cta, variant="default"):
    """:func:`analyse` over several probe runs (CPU tensors [programs, ROWS, SLICES, EVENTS]): the metric lists
    pooled, the per-program summaries of each run, the queued counts summed."""
    metrics, per_cta_all, queued = None, [], [0, 0]
    for raw in raws:
        mt, pc, q = analyse(raw.tolist(), gg, num_k, stages, tiles_per_cta, variant)
        if metrics is None:
            metrics = mt
        else:
            for key in metrics:
                metrics[key].extend(mt[key])
        per_cta_all.append(pc)
        queued = [queued[0] + q[0], queued[1] + q[1]]
    return metrics, per_cta_all, queued


def timeline(cta, gg, s0, nslices=3, width=120):
    """ASCII timeline of program ``cta`` from WG0's pre_bar of slice s0 over ``nslices`` slice periods."""
    EC = dict(pre_bar=gg.EV_C_PRE_BAR, pre_wait=gg.EV_C_PRE_WAIT, full=gg.EV_C_FULL, issued=gg.EV_C_ISSUED,
              mma_done=gg.EV_C_MMA_DONE, arrived=gg.EV_C_ARRIVED, promoted=gg.EV_C_PROMOTED)
    EP = dict(pre_wait=gg.EV_P_PRE_WAIT, empty=gg.EV_P_EMPTY, issued=gg.EV_P_ISSUED)
    S = len(cta[0])

    def C(w, s, e):
        return cta[w][s][EC[e]] if 0 <= s < S else 0

    def P(s, e):
        return cta[2][s][EP[e]] if 0 <= s < S else 0

    t0 = C(0, s0, "pre_bar")
    t1 = C(0, s0 + nslices, "pre_bar")
    if not t0 or not t1 or t1 <= t0:
        return [f"(no timeline: slices {s0}..{s0 + nslices} of this program were not all recorded)"]
    scale = max(1, math.ceil((t1 - t0) / width))
    rows = {"WG0": [" "] * width, "WG1": [" "] * width, "mma0": [" "] * width, "mma1": [" "] * width,
            "prod": [" "] * width}

    def paint(row, a, b, ch):
        if not a or not b or b <= a:
            return
        i0 = max(0, (a - t0) // scale)
        i1 = min(width, max(i0 + 1, (b - t0 + scale - 1) // scale))
        for i in range(int(i0), int(i1)):
            if i < width:
                rows[row][i] = ch

    for s in range(max(0, s0 - 4), min(S, s0 + nslices + 2)):
        for w, name in ((0, "WG0"), (1, "WG1")):
            paint(name, C(w, s, "pre_bar"), C(w, s, "pre_wait"), "b")
            paint(name, C(w, s, "pre_wait"), C(w, s, "full"), "F")
            paint(name, C(w, s, "full"), C(w, s, "issued"), "I")
            paint(name, C(w, s + 1, "issued"), C(w, s, "mma_done"), "m")
            paint(name, C(w, s, "mma_done"), C(w, s, "arrived"), "a")
            paint(name, C(w, s, "arrived"), C(w, s, "promoted"), "P")
            paint(name, C(w, s, "promoted"), C(w, s + 2, "pre_bar"), ".")
        for s_ in (s,):
            # slice s in flight (issued .. observed done); the older slice wins where two overlap
            for w, name in ((0, "mma0"), (1, "mma1")):
                a, b = C(w, s_, "issued"), C(w, s_, "mma_done")
                if a and b and b > a:
                    i0 = max(0, (a - t0) // scale)
                    i1 = min(width, (b - t0 + scale - 1) // scale)
                    for i in range(int(i0), int(i1)):
                        if rows[name][i] == " ":
                            rows[name][i] = str(s_ % 10)
        paint("prod", P(s, "pre_wait"), P(s, "empty"), "e")
        paint("prod", P(s, "empty"), P(s, "issued"), "T")
        paint("prod", P(s, "issued"), P(s + 1, "pre_wait"), ".")
    # producer row: also show which slice it is loading ahead
    ruler = [" "] * width
    for s in range(s0, s0 + nslices + 1):
        i = (C(0, s, "pre_bar") - t0) // scale
        if 0 <= i < width:
            label = f"|s{s}"
            for j, ch in enumerate(label):
                if i + j < width:
                    ruler[int(i + j)] = ch
    out = [f"program 0, slices {s0}..{s0 + nslices - 1}, {scale} cycles per character, t0 = WG0 pre_bar of slice {s0}",
           "       " + "".join(ruler)]
    for name in ("WG0", "mma0", "WG1", "mma1", "prod"):
        out.append(f"{name:>5}  " + "".join(rows[name]))
    out.append("legend: b = partition bar.sync before the full wait, F = full-barrier wait (TMA data not there), "
               "I = MMA issue, m = blocked in warpgroup_mma_wait, a = empty arrive (with its bar.sync), "
               "P = promotion FFMAs, . = other (scale loads, loop); mma0/1: digit = slice whose MMA is in flight "
               "(issued, not yet seen done; the older one shown); prod: e = empty-barrier wait, T = TMA issue")
    # exact stamps of one slice
    out.append(f"stamps of slice {s0 + 1} (cycles from t0):")
    s = s0 + 1
    for w in (0, 1):
        out.append(f"  WG{w}: " + ", ".join(f"{e}={C(w, s, e) - t0}" for e in EC if C(w, s, e)))
    out.append("  prod: " + ", ".join(f"{e}={P(s, e) - t0}" for e in EP if P(s, e)))
    return out


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

DESCR = [
    ("period", "slice period per warpgroup (pre_bar[s+1]-pre_bar[s]); ideal 512 = tensor time of 128x128x128"),
    ("done_period", "MMA completion interval (mma_done[s+1]-mma_done[s])"),
    ("bar_before_full", "partition bar.sync before the full wait (= wait for the other warpgroup)"),
    ("full_wait", "full-barrier wait after the bar.sync (TMA data of slice s not yet in smem)"),
    ("mma_issue", "full -> 4 QGMMA + commit issued (wide: full -> the right half's MMA issued)"),
    ("mma_wait", "blocked in warpgroup_mma_wait(1) for slice s (slice s+1 already queued)"),
    ("issue_to_done", "slice s issued -> seen complete (includes issuing s+1)"),
    ("arrive", "empty arrive incl. its partition bar.sync"),
    ("promote", "promotion: 64 FFMA (+ waiting for the scale loads)"),
    ("left_half", "wide only: full -> the left half's MMA issued, waited (wait 0) and promoted"),
    ("promote_to_next_bar", "promoted[s] -> pre_bar[s+2] (scale-load issue, loop overhead)"),
    ("wg_skew_abs", "|WG1 - WG0| arrival at the pre-wait bar.sync"),
    ("p_empty_wait", "producer: empty-barrier wait (ring full, waiting for the consumer)"),
    ("p_tma_issue", "producer: expect + 2 TMA issues"),
    ("p_interval", "producer: TMA issue interval"),
    ("p_lead", "consumer needs slice s (pre_wait) - producer issued its TMA"),
    ("load_latency_waited", "TMA issue -> consumer sees full, on slices where the consumer waited >= 64 cycles"),
    ("p_wake_after_free", "consumer's empty arrive (s-STAGES) -> producer past its wait, when it waited"),
]


def run_shape(gg, m, n, k, num_sms, reps, out):
    import torch

    from fp8gemm import reference as R
    from fp8gemm.testing import calc_diff
    a, sfa, b, sfb, d = make_inputs(m, n, k)
    cfg = production_config(gg, a, b, d, num_sms)
    num_k = k // 128
    ref = R.fp8_gemm_nt(a, sfa, b, sfb, None, out_dtype=torch.bfloat16)
    # production kernel: correctness
    gg.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms)
    torch.cuda.synchronize()
    prod_diff, prod_nan = calc_diff(d, ref), int(d.isnan().sum())
    # probe kernel: correctness and stamps
    grid = triton_cdiv(m, 128) * triton_cdiv(n, 128)
    grid = max(1, min(num_sms, grid))
    probe = torch.zeros(grid * gg.PROBE_CTA_STRIDE, dtype=torch.int64, device="cuda")
    tiles = triton_cdiv(m, 128) * triton_cdiv(n, 128)
    tiles_per_cta = [len(range(c, tiles, grid)) for c in range(grid)]
    raws = []
    probe_diff = probe_nan = None
    for r in range(reps + 1):
        d.fill_(float("nan"))
        probe.zero_()
        launch_probe(gg, a, sfa, b, sfb, d, cfg, probe, num_sms)
        torch.cuda.synchronize()
        if r == 0:
            probe_diff, probe_nan = calc_diff(d, ref), int(d.isnan().sum())
            continue          # the first (compiling) run is not used for the stamps
        raws.append(probe.view(grid, gg.PROBE_ROWS, gg.PROBE_SLICES, gg.PROBE_EVENTS).cpu())
    ok = prod_nan == 0 and prod_diff < 1e-3 and probe_nan == 0 and probe_diff < 1e-3
    log(f"\n=== {m}x{n}x{k}: config {cfg.block_m}x{cfg.block_n}, {cfg.stages} stages, {cfg.num_warps} consumer warps, "
        f"grid {grid}, {tiles} tiles ({min(tiles_per_cta)}-{max(tiles_per_cta)} per program), {num_k} K-slices per tile")
    log(f"correctness: production diff {prod_diff:.2e} nan {prod_nan}; probe diff {probe_diff:.2e} nan {probe_nan} "
        f"-> {'OK' if ok else 'FAILED'}")

    # timings (CUDA events, interleaved): production vs probe kernel
    def timed(fn, iters=10):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        for _ in range(iters):
            fn()
        en.record()
        torch.cuda.synchronize()
        return st.elapsed_time(en) * 1000.0 / iters
    prod_fn = lambda: gg.launch("dense", a, sfa, b, sfb, d, num_sms=num_sms)      # noqa: E731
    probe_fn = lambda: launch_probe(gg, a, sfa, b, sfb, d, cfg, probe, num_sms)   # noqa: E731
    tp, tq = [], []
    smi = SmiSampler().start()
    t0 = time.time()
    # >= 0.8 s of back-to-back launches and >= 5 nvidia-smi samples (it takes a moment to start), <= 4 s
    while len(tp) < 3 or (time.time() < t0 + 4 and (time.time() < t0 + 0.8 or
                                                    (smi.proc is not None and len(smi.rows) < 5))):
        tp.append(timed(prod_fn))
        tq.append(timed(probe_fn))
    smi.stop()
    t_prod, t_probe = pct(tp, 0.5), pct(tq, 0.5)
    flops = 2.0 * m * n * k
    log(f"time per launch (CUDA events, back-to-back, median of {len(tp)} x 10): production {t_prod:.1f} us "
        f"({flops / t_prod / 1e6:.0f} TFLOPS), probe {t_probe:.1f} us (probe overhead {100 * (t_probe / t_prod - 1):+.1f}%)")
    smi_sum = smi.summary()

    # analysis over the reps
    metrics, per_cta_all, queued = analyse_runs(raws, gg, num_k, cfg.stages, tiles_per_cta)
    pc_last = per_cta_all[-1]
    ghz = [p["ghz"] for pcs in per_cta_all for p in pcs if p["ghz"]]
    cyc = [p["cycles"] for p in pc_last if p["cycles"]]
    ghz_med = pct(ghz, 0.5)
    log(f"SM clock: in-kernel %clock64/%globaltimer {ghz_med:.3f} GHz (programs p10-p90 "
        f"{pct(ghz, 0.1):.3f}-{pct(ghz, 0.9):.3f}); nvidia-smi clocks.sm during the loop "
        f"{smi_sum.get('clocks.sm', smi_sum)} MHz, max {smi_sum.get('clocks.max.sm', {}).get('max', '?')} MHz, "
        f"power {smi_sum.get('power.draw', {}).get('median', '?')} W, throttle reasons "
        f"{smi_sum.get('clocks_throttle_reasons.active', {}).get('max', '?')}; torch.cuda.clock_rate "
        f"{torch_clock_rate()} MHz" if ghz_med else f"SM clock: in-kernel unavailable; nvidia-smi {smi_sum}")
    if cyc and ghz_med:
        log(f"program time: median {pct(cyc, 0.5)} cycles, max {max(cyc)} cycles = {max(cyc) / ghz_med / 1000:.1f} us "
            f"at {ghz_med:.3f} GHz (probe launch measured {t_probe:.1f} us); "
            f"slices per program {max(tiles_per_cta) * num_k} -> {max(cyc) / (max(tiles_per_cta) * num_k):.0f} "
            f"cycles per slice incl. prologue/epilogue")

    log(f"per-event deltas, cycles: median [p10-p90] over {len(raws)} runs x {grid} programs x 2 warpgroups x steady "
        f"slices (past the first {cfg.stages + 2}, not the first/last 2 of a tile)")
    stats = {}
    for key, text in DESCR:
        st_ = stat(metrics[key])
        stats[key] = st_
        if st_["n"]:
            log(f"  {key:>20} {st_['median']:>7} [{st_['p10']:>6}-{st_['p90']:<6}] n={st_['n']:<6} {text}")
        else:
            log(f"  {key:>20}       - (no samples) {text}")
    qfrac = queued[0] / max(1, queued[1])
    log(f"  slices whose successor MMA was already queued when they completed (mma_wait >= 20): {100 * qfrac:.0f}%")
    per = stats["period"]["median"]
    if per:
        log(f"  tensor-core efficiency in steady state: {TENSOR_CYCLES_128} / {per} = {100 * TENSOR_CYCLES_128 / per:.0f}%")

    tl = timeline(raws[-1][0].tolist(), gg, s0=min(cfg.stages + 4, max(0, min(num_k, gg.PROBE_SLICES) - 5)))
    for line in tl:
        log("  " + line)
    verdict = verdicts(stats, qfrac, ghz_med, smi_sum, cfg)
    log("verdict:")
    for v in verdict:
        log("  - " + v)
    out["raw"][f"{m}x{n}x{k}"] = raws[-1]
    return dict(shape=[m, n, k], config=dict(block_m=cfg.block_m, block_n=cfg.block_n, stages=cfg.stages,
                                              num_warps=cfg.num_warps, maxnreg=cfg.maxnreg),
                grid=grid, tiles=tiles, num_k=num_k, correct=ok, prod_diff=prod_diff, probe_diff=probe_diff,
                us_production=t_prod, us_probe=t_probe, sm_ghz_in_kernel=ghz_med, nvidia_smi=smi_sum,
                torch_clock_rate_mhz=torch_clock_rate(), stats=stats, mma_queued_fraction=qfrac,
                per_program=pc_last, timeline=tl, verdict=verdict,
                program0_raw=raws[-1][0].tolist())


def verdicts(st, qfrac, ghz, smi, cfg):
    """Which candidate the numbers point at (thresholds in cycles; see the module docstring)."""
    g = lambda k: st[k]["median"] or 0       # noqa: E731
    per = g("period")
    out = []
    if not per:
        return ["no steady-state samples"]
    budget = per - TENSOR_CYCLES_128
    out.append(f"period {per} cycles = {TENSOR_CYCLES_128} tensor + {budget} lost per slice")
    if qfrac > 0.9 and g("mma_wait") > 50:
        out.append(f"MMA-BOUND: the next slice's MMA is queued {100 * qfrac:.0f}% of the time and the warpgroups sit "
                   f"{g('mma_wait')} cycles in warpgroup_mma_wait -> the tensor pipe itself runs a slice in "
                   f"~{g('done_period')} cycles, not 512: operand delivery to the tensor cores (smem reads of A and B "
                   "per m64n128 wgmma + TMA writes) -> larger N per wgmma (m64n256: A read once per 256 columns), "
                   "A from registers, or 2-CTA TMA multicast to cut smem fill traffic; the issue side is not the limit")
    if g("full_wait") > 100:
        lat = st["load_latency_waited"]["median"]
        if g("p_empty_wait") > 100:
            out.append(f"RING TOO SHALLOW: consumer waits {g('full_wait')} cycles for data AND producer waits "
                       f"{g('p_empty_wait')} for a free stage -> TMA latency ({lat}) > {cfg.stages} stages x period: "
                       "more stages (smaller epilogue buffer / BK 64 stages), free the stage earlier")
        else:
            out.append(f"LOAD-BOUND: consumer waits {g('full_wait')} cycles for data while the producer is not blocked "
                       f"(lead {g('p_lead')}, TMA latency when waited {lat}) -> L2/TMA latency or bandwidth: TMA multicast "
                       "of B/A over a 2-CTA cluster, better L2 rasterisation, deeper ring")
    if g("bar_before_full") > 60 or g("wg_skew_abs") > 60:
        out.append(f"BARRIER: {g('bar_before_full')} cycles in the partition bar.sync before the full wait "
                   f"(warpgroup skew {g('wg_skew_abs')}) -> remove the membar bar.sync (per-warpgroup waits / one "
                   "partition per warpgroup) so one warpgroup's lag does not stall the other")
    if g("arrive") > 60:
        out.append(f"ARRIVE: {g('arrive')} cycles in the empty arrive (its bar.sync) -> arrive per warpgroup "
                   "(empty count 2) or per warp without the partition barrier")
    if g("promote") > 200:
        out.append(f"PROMOTION: {g('promote')} cycles for 64 FFMA (floor ~130 with 2 warps per SMSP) -> scale loads "
                   "late or FFMA issue contention: load scales earlier/into smem via TMA, fold sfa*sfb once per slice")
    if g("promote") + g("arrive") + g("bar_before_full") + g("full_wait") + g("mma_issue") + g("promote_to_next_bar") \
            > TENSOR_CYCLES_128 and g("mma_wait") < 50:
        out.append("ISSUE-BOUND: the non-MMA work between two MMA issues of a warpgroup exceeds the 512-cycle MMA "
                   "time of the other slice in flight -> shorten that path (see the largest entries above) or keep "
                   "two slices queued (wait(2) with three scratch accumulators is out of registers)")
    if g("p_tma_issue") > 200 or (g("p_interval") > per * 1.1 and g("p_empty_wait") < 50):
        out.append(f"PRODUCER: TMA issue {g('p_tma_issue')} / interval {g('p_interval')} cycles -> producer warp slow")
    mx = (smi.get("clocks.max.sm") or {}).get("max")
    if ghz and mx and ghz * 1000 < 0.9 * mx:
        out.append(f"CLOCK: SM ran at {ghz * 1000:.0f} MHz vs max {mx:.0f} -> throttling (power/thermal) costs "
                   f"{100 * (1 - ghz * 1000 / mx):.0f}% of wall time independent of the cycle counts")
    if len(out) == 1:
        out.append("no single dominant stall above the thresholds: see the table and the timeline")
    return out

# ------------------------------------------------------------------------------------------------
# diagnostic modes (--diag): the kernel's DIAG constexpr removes one suspect at a time
# ------------------------------------------------------------------------------------------------

DIAG_NAMES = {0: "production", 1: "L2-resident", 2: "no refill", 3: "no promotion", 4: "MMA only",
              5: "no scale loads", 8: "no global store"}
_MUCH, _SAME = 0.90, 0.95      # period ratio vs mode 0: below _MUCH = "much lower", above _SAME = "about equal"


def run_diag_shape(gg, m, n, k, modes, num_sms, reps, variant="default"):
    """Every DIAG mode of ``modes`` on one shape: PROBE-off time (graph replay, ``time_us``), then ``reps`` probe
    runs right after it (same clock state); mode 0 also checked against the reference (probe on and off).
    ``variant`` (:data:`VARIANTS`): the kernel; wide/split run only the modes of :data:`WIDE_MODES`."""
    import torch

    from fp8gemm import reference as R
    from fp8gemm.bench.core import time_us
    from fp8gemm.testing import calc_diff
    a, sfa, b, sfb, d = make_inputs(m, n, k)
    cfg = variant_config(gg, variant, a, b, d, num_sms)
    if variant != "default":
        skipped = [x for x in modes if x not in WIDE_MODES]
        modes = [x for x in modes if x in WIDE_MODES]
        if skipped:
            log(f"  ({variant}: DIAG modes {skipped} skipped, the wide/split kernels take {WIDE_MODES})")
    num_k = k // 128
    tiles = triton_cdiv(m, cfg.block_m) * triton_cdiv(n, cfg.block_n)
    grid = max(1, min(num_sms, tiles))
    tiles_per_cta = [len(range(c, tiles, grid)) for c in range(grid)]
    probe = torch.zeros(grid * gg.PROBE_CTA_STRIDE, dtype=torch.int64, device="cuda")
    flops = 2.0 * m * n * k
    shape = f"{m}x{n}x{k}"
    log(f"\n=== {shape} (diag, {variant}): config {cfg.block_m}x{cfg.block_n}, {cfg.stages} stages, grid {grid}, {tiles} tiles "
        f"({min(tiles_per_cta)}-{max(tiles_per_cta)} per program), {num_k} K-slices per tile")
    correct = None
    rows = []
    for mode in modes:
        t0 = time.time()
        run = lambda: launch_probe(gg, a, sfa, b, sfb, d, cfg, None, num_sms, diag=mode)         # noqa: E731
        run_probe = lambda: launch_probe(gg, a, sfa, b, sfb, d, cfg, probe, num_sms, diag=mode)  # noqa: E731
        check = None
        if mode == 0:
            ref = R.fp8_gemm_nt(a, sfa, b, sfb, None, out_dtype=torch.bfloat16)
            check = {}
            for name, fn in (("probe_off", run), ("probe_on", run_probe)):
                d.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                check[name] = dict(diff=calc_diff(d, ref), nan=int(d.isnan().sum()))
            correct = all(c["nan"] == 0 and c["diff"] < 1e-3 for c in check.values())
            del ref
        else:
            run_probe()          # compile both variants before anything is timed
            run()
            torch.cuda.synchronize()
        us = time_us(run)
        # the probe runs follow the timing loop at once: the SM clock is the one the timing saw
        raws_dev = []
        for _ in range(reps):
            probe.zero_()
            run_probe()
            raws_dev.append(probe.clone())
        torch.cuda.synchronize()
        raws = [r.view(grid, gg.PROBE_ROWS, gg.PROBE_SLICES, gg.PROBE_EVENTS).cpu() for r in raws_dev]
        metrics, per_cta_all, queued = analyse_runs(raws, gg, num_k, cfg.stages, tiles_per_cta, variant)
        stats = {key: stat(metrics[key]) for key, _ in DESCR}
        ghz = [p["ghz"] for pcs in per_cta_all for p in pcs if p["ghz"]]
        cps = [p["cycles"] / (p["tiles"] * num_k) for pcs in per_cta_all for p in pcs if p["cycles"] and p["tiles"]]
        row = dict(mode=mode, name=DIAG_NAMES.get(mode, str(mode)), us=us, tflops=flops / us / 1e6,
                   sm_ghz_in_kernel=pct(ghz, 0.5), cycles_per_slice_whole_program=pct(cps, 0.5),
                   mma_queued_fraction=queued[0] / max(1, queued[1]), stats=stats, check=check,
                   wall_s=time.time() - t0)
        rows.append(row)
        sm = {k_: v["median"] for k_, v in stats.items()}
        log(f"  mode {mode} ({row['name']}): {us:.1f} us {row['tflops']:.0f} TFLOPS (PROBE off); probe: period "
            f"{sm['period']} MMA-done period {sm['done_period']} cycles, {row['sm_ghz_in_kernel'] or 0:.3f} GHz"
            + (f"; correctness {check} -> {'OK' if correct else 'FAILED'}" if check else "")
            + f"  [{row['wall_s']:.1f} s]")
    return dict(shape=[m, n, k], variant=variant,
                config=dict(block_m=cfg.block_m, block_n=cfg.block_n, stages=cfg.stages, num_warps=cfg.num_warps,
                            maxnreg=cfg.maxnreg, wide_n=cfg.wide_n),
                grid=grid, tiles=tiles, num_k=num_k, correct=correct, modes=rows,
                hints=diag_hints({r["mode"]: r for r in rows}))


def _med(row, key):
    return row["stats"][key]["median"] if row and row["stats"][key]["median"] is not None else None


DIAG_MEANING = [
    f"periods are cycles (clock-independent; the us also move with the SM clock); ideal {TENSOR_CYCLES_128}; "
    f"'MUCH LOWER' < {_MUCH:.2f}x, 'about equal' > {_SAME:.2f}x of mode 0's period",
    "mode 1 (L2-resident) << mode 0: DRAM traffic (d) is a limit; about equal: DRAM is not",
    "mode 2 (no refill) << mode 0: operand delivery (TMA, L2->SM bandwidth (a), TMA writes into shared memory (b)) is "
    "the limit; about equal: the limit is inside the SM (wgmma operand reads / tensor pipe, or promotion)",
    "mode 1 about equal but mode 2 << mode 0: L2->SM bandwidth or the smem fill, not DRAM (these modes cannot split "
    "(a) from (b)-writes)",
    "mode 3 (no promotion) << mode 0: the promotion FFMAs / scale loads / issue contention (c) cost time; about "
    "equal: they hide behind the queued MMA",
    f"mode 4 (MMA only) near {TENSOR_CYCLES_128}: the tensor pipe runs at rate once delivery and promotion are gone "
    "(the loss is the causes above, possibly overlapping: 4 << 0 while 2 and 3 alone are not = two costs that hide "
    "behind each other); still near mode 0: the wgmma itself is the limit (its shared-memory operand reads, A + B "
    "twice per 128x128 slice with two m64n128 warpgroups) -> fewer smem bytes per FLOP (N=256 per wgmma, multicast)",
    "mode 5 (no scale loads: the promotion FFMAs with scales made in registers) near mode 3: the scales' global "
    "loads are the cost (load them through TMA/shared memory); near mode 0: the FFMAs running beside the MMAs are",
]


def diag_hints(by_mode):
    """Per mode this run's period against mode 0 (see DIAG_MEANING for what each means), then the reading."""
    r0 = by_mode.get(0)
    p0 = _med(r0, "period")
    ratio, word = {}, {}
    for mode, row in by_mode.items():
        p = _med(row, "period")
        if mode and p and p0:
            ratio[mode] = p / p0
            word[mode] = ("MUCH LOWER" if ratio[mode] < _MUCH else "about equal" if ratio[mode] > _SAME
                          else "somewhat lower") if ratio[mode] <= 1.05 else "HIGHER"
    out = []
    for mode in sorted(by_mode):
        if not mode:
            continue
        row = by_mode[mode]
        if mode in ratio:
            out.append(f"mode {mode} ({row['name']}): period {_med(row, 'period')} vs {p0} cycles = {ratio[mode]:.2f}x, "
                       f"{word[mode]} (MMA-done period {_med(row, 'done_period')} vs {_med(r0, 'done_period')})")
        else:
            out.append(f"mode {mode} ({row['name']}): n/a (needs mode 0 and steady-state samples)")
    if 4 in ratio:
        out.append(f"mode 4 recovers {p0 - _med(by_mode[4], 'period')} of the {p0 - TENSOR_CYCLES_128} cycles "
                   "lost per slice in mode 0")
    # combined reading: every finding that the numbers show
    w = word.get
    found = []
    if w(1) == "MUCH LOWER":
        found.append("DRAM (d): L2-resident operands run much faster -> better L2 reuse (rasterisation, larger tiles)")
    if w(2) == "MUCH LOWER" and w(1) in ("about equal", "somewhat lower"):
        found.append("delivery into the SM, not DRAM: L2->SM bandwidth (a) or the TMA writes into shared memory (b); "
                     "these modes cannot separate the two -> fewer L2->SM bytes per FLOP (256-wide tiles, multicast)")
    elif w(2) == "MUCH LOWER":
        found.append("operand delivery (TMA/L2/DRAM): no refill runs much faster")
    if w(3) == "MUCH LOWER":
        found.append("promotion / issue (c): fold the scales, fewer FFMA per slice, promote off the MMA path")
    if w(4) == "MUCH LOWER" and w(2) != "MUCH LOWER" and w(3) != "MUCH LOWER":
        found.append("only removing delivery AND promotion together helps: each alone hides behind the other "
                     "(two costs of similar size)")
    if w(4) in ("about equal", "HIGHER"):
        found.append("the MMA + barrier loop alone runs at mode 0's period: the wgmma's shared-memory operand reads "
                     "(b, read side) / the m64n128 shape, not delivery, DRAM or promotion")
    if found:
        out.extend("reading: " + f for f in found)
    elif word:
        out.append("reading: no mode removes much of the loss alone; compare modes 2, 3 and 4 for additive parts")
    return out


def _norm(r):
    """Periods per 128x128x128 of the tile: the wide tile's slice is 128x256x128."""
    return 128.0 / r["config"]["block_n"] if "config" in r else 1.0


def print_diag_table(results):
    log("\ndiag summary (cycles: medians over programs x steady slices; us/TFLOPS with PROBE off, graph replay):")
    log(f"{'shape':>15} {'variant':>7} {'mode':>4} {'name':>12} {'ok':>3} {'GHz':>5} {'period':>6} {'norm':>5} "
        f"{'mmaDone':>7} {'cyc/sl':>6} {'bar':>4} {'full':>5} {'issue':>5} {'mmaW':>5} {'arrive':>6} {'promo':>5} "
        f"{'half':>5} {'pEmpty':>6} {'queued':>6} {'us':>7} {'TFLOPS':>6} {'vs0':>5} {'vsDef':>5}")
    us_def0 = {}
    for r in results:
        if r.get("variant", "default") == "default" and "modes" in r:
            us_def0[tuple(r["shape"])] = next((row["us"] for row in r["modes"] if row["mode"] == 0), None)
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        variant = r.get("variant", "default")
        if "modes" not in r:
            log(f"{shape:>15} {variant:>7} ERR {r.get('error', '')}")
            continue
        us0 = next((row["us"] for row in r["modes"] if row["mode"] == 0), None)
        usd = us_def0.get(tuple(r["shape"]))
        f = _norm(r)
        for row in r["modes"]:
            s = {k_: (v["median"] if v["median"] is not None else -1) for k_, v in row["stats"].items()}
            ok = "-" if row["check"] is None else ("ok" if r["correct"] else "BAD")
            cps = row["cycles_per_slice_whole_program"]
            norm = s["period"] * f if s["period"] > 0 else -1
            log(f"{shape:>15} {variant:>7} {row['mode']:>4} {row['name']:>12} {ok:>3} "
                f"{row['sm_ghz_in_kernel'] or 0:>5.3f} {s['period']:>6} {norm:>5.0f} {s['done_period']:>7} "
                f"{cps or 0:>6.0f} {s['bar_before_full']:>4} {s['full_wait']:>5} {s['mma_issue']:>5} "
                f"{s['mma_wait']:>5} {s['arrive']:>6} {s['promote']:>5} {s['left_half']:>5} {s['p_empty_wait']:>6} "
                f"{100 * row['mma_queued_fraction']:>5.0f}% {row['us']:>7.1f} {row['tflops']:>6.0f} "
                f"{(us0 / row['us']) if us0 else 0:>5.2f} {(usd / row['us']) if usd else 0:>5.2f}")
    log("columns: period = consumer slice period (one K-slice of the tile), norm = period per 128x128x128 (wide: "
        f"period / 2; ideal {TENSOR_CYCLES_128} for every variant), mmaDone = MMA completion period (wide/split: of "
        "the slice's last MMA), cyc/sl = whole program cycles / slices (incl. prologue/epilogue; not normalised), "
        "bar/full = partition bar.sync / full-barrier wait before an MMA, issue = full -> MMA issued (wide: the "
        "right half's), mmaW = default: time blocked in warpgroup_mma_wait(1) with the next MMA queued; wide/split: "
        "the last MMA's wait(0) (issued -> done), promo = one 64-FFMA promotion (after the empty arrive), half = wide: "
        "the left half (MMA + wait + promotion), pEmpty = producer's wait for a free stage, queued = default: slices "
        "whose successor MMA was queued, vs0 = this variant's mode-0 us / this us, vsDef = default mode-0 us / this us")
    log("\nhow to read the modes:")
    for h in DIAG_MEANING:
        log("  * " + h)
    for r in results:
        if "hints" in r:
            log(f"{'x'.join(map(str, r['shape']))} ({r.get('variant', 'default')}):")
            for h in r["hints"]:
                log("  - " + h)
    lines = variant_hints(results)
    if lines:
        log("\nvariants (hypothesis: a warpgroup promoting while its OWN next MMA is in flight (default) slows the "
            "MMAs; DeepGEMM's order (MMA, wait(0), release, promote while the OTHER warpgroup's MMA runs: split) "
            "hides the FFMAs):")
        for h in lines:
            log("  - " + h)


def variant_hints(results):
    """Per shape: each variant's normalised mode-0 period against the default's and against its own mode 3."""
    by = {}
    for r in results:
        if "modes" in r:
            by.setdefault(tuple(r["shape"]), {})[r.get("variant", "default")] = r
    out = []
    for shape, vs in by.items():
        name = "x".join(map(str, shape))

        def per(v, mode):
            r = vs.get(v)
            row = next((x for x in r["modes"] if x["mode"] == mode), None) if r else None
            p = _med(row, "period") if row else None
            return p * _norm(r) if p else None

        def us(v, mode):
            r = vs.get(v)
            row = next((x for x in r["modes"] if x["mode"] == mode), None) if r else None
            return row["us"] if row else None

        d0 = per("default", 0)
        for v in ("split", "wide"):
            p0, p3 = per(v, 0), per(v, 3)
            if not p0:
                continue
            txt = f"{name} {v}: mode-0 period {p0:.0f} per 128^3"
            if d0:
                txt += f" vs default {d0:.0f} ({p0 / d0:.2f}x)"
            if p3:
                txt += f", its own mode 3 {p3:.0f} ({p0 / p3:.2f}x)"
            if us(v, 0) and us("default", 0):
                txt += f"; {us(v, 0):.1f} us vs default {us('default', 0):.1f} us"
            if p3 and p0 <= 1.05 * p3:
                txt += " -> its promotion is hidden (mode 0 ~ mode 3)"
                if v == "split":
                    txt += ": DeepGEMM's order hides the FFMAs -> CONFIRMED for the 128x128 tile"
            elif p3:
                txt += " -> its promotion still costs cycles"
                if v == "split" and d0 and p0 >= 0.95 * d0:
                    txt += "; no better than the default: the order alone does NOT hide the FFMAs -> REFUTED"
                elif v == "split" and d0:
                    txt += "; better than the default: the order helps partly"
            out.append(txt)
    return out


def main_diag(args, gg, props, num_sms):
    modes = sorted({int(x) for x in args.diag.split(",") if x.strip()}, key=lambda x: (x != 0, x))
    bad = [x for x in modes if x not in gg.DIAG_MODES]
    if bad:
        sys.exit(f"--diag: unknown modes {bad} (known: {gg.DIAG_MODES})")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    badv = [v for v in variants if v not in VARIANTS]
    if badv or not variants:
        sys.exit(f"--variants: unknown {badv} (known: {VARIANTS})")
    t_start = time.time()
    results = []
    failed = False
    path = os.path.join(args.out, "gluon_probe_diag.json")
    for spec in args.shapes.split(","):
        m, n, k = (int(x) for x in spec.lower().split("x"))
        for variant in variants:
            try:
                res = run_diag_shape(gg, m, n, k, modes, num_sms, args.reps, variant)
                failed |= res["correct"] is False
                results.append(res)
            except Exception as e:  # noqa: BLE001
                import traceback
                log(f"=== {spec} ({variant}): FAILED {type(e).__name__}: {e}")
                log(traceback.format_exc())
                failed = True
                results.append(dict(shape=[m, n, k], variant=variant, error=repr(e)))
            with open(path, "w") as f:
                json.dump(dict(device=props.name, num_sms=num_sms, modes={m_: DIAG_NAMES.get(m_) for m_ in modes},
                               variants=variants, tensor_cycles_per_slice=TENSOR_CYCLES_128, how_to_read=DIAG_MEANING,
                               results=results, variant_reading=variant_hints(results)), f, indent=1)
    print_diag_table(results)
    log(f"total {time.time() - t_start:.0f} s; mode 0 {'correct' if not failed else 'CHECK FAILED'}; "
        f"JSON: {path}")
    with open(os.path.join(args.out, "gluon_probe_diag.log"), "w") as f:
        f.write("\n".join(_LOG) + "\n")
    sys.exit(1 if failed else 0)


def triton_cdiv(a, b):
    return (a + b - 1) // b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gluon_probe_out"))
    ap.add_argument("--shapes", default=",".join(f"{m}x{n}x{k}" for m, n, k in SHAPES),
                    help="comma-separated MxNxK (dense, 128x128 production config)")
    ap.add_argument("--reps", type=int, default=3, help="probe runs pooled into the statistics")
    ap.add_argument("--diag", default=None,
                    help="comma-separated DIAG modes (0-4, e.g. 0,1,2,3,4): compare the kernel's diagnostic modes "
                         "(probe stats + PROBE-off time per mode) instead of the full probe report")
    ap.add_argument("--variants", default="default",
                    help="comma-separated kernels for the --diag table: default (production 128x128), wide "
                         "(wide_config, 128x256), split (split_config, 128x128 in DeepGEMM's order); wide/split run "
                         "modes 0 and 3 only; without --diag, variants other than default imply --diag 0,3")
    args = ap.parse_args()
    if not args.diag and args.variants.replace(" ", "") != "default":
        args.diag = "0,3"
    os.makedirs(args.out, exist_ok=True)

    import torch

    from fp8gemm.kernels import gemm_gluon as gg
    if not gg.HAS_GLUON or not torch.cuda.is_available():
        sys.exit("needs triton with Gluon and a CUDA device")
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    log(f"device {props.name}, {num_sms} SMs, torch {torch.__version__}, triton {__import__('triton').__version__}")
    if args.diag:
        main_diag(args, gg, props, num_sms)
        return
    t_start = time.time()
    out = {"raw": {}}
    results = []
    failed = False
    for spec in args.shapes.split(","):
        m, n, k = (int(x) for x in spec.lower().split("x"))
        try:
            res = run_shape(gg, m, n, k, num_sms, args.reps, out)
            failed |= not res["correct"]
            results.append(res)
        except Exception as e:  # noqa: BLE001
            import traceback
            log(f"=== {spec}: FAILED {type(e).__name__}: {e}")
            log(traceback.format_exc())
            failed = True
            results.append(dict(shape=[m, n, k], error=repr(e)))
        with open(os.path.join(args.out, "gluon_probe.json"), "w") as f:
            json.dump(dict(device=props.name, num_sms=num_sms, results=results,
                           event_layout=dict(consumer=C_EVENTS, producer=P_EVENTS, slices=gg.PROBE_SLICES,
                                             rows=["WG0", "WG1", "producer", "header"])), f, indent=1)
    torch.save(out["raw"], os.path.join(args.out, "gluon_probe_raw.pt"))
    log("\nsummary (cycles, medians):")
    log(f"{'shape':>16} {'ok':>3} {'us':>7} {'probe+%':>7} {'GHz':>6} {'period':>6} {'bar':>5} {'full':>5} "
        f"{'issue':>5} {'mmaW':>5} {'arrive':>6} {'promo':>5} {'pEmpty':>6} {'lat':>5}")
    for r in results:
        if "stats" not in r:
            log(f"{'x'.join(map(str, r['shape'])):>16} ERR")
            continue
        s = {k_: (v["median"] if v["median"] is not None else -1) for k_, v in r["stats"].items()}
        log(f"{'x'.join(map(str, r['shape'])):>16} {'ok' if r['correct'] else 'BAD':>3} {r['us_production']:>7.1f} "
            f"{100 * (r['us_probe'] / r['us_production'] - 1):>+7.1f} {r['sm_ghz_in_kernel'] or 0:>6.3f} "
            f"{s['period']:>6} {s['bar_before_full']:>5} {s['full_wait']:>5} {s['mma_issue']:>5} {s['mma_wait']:>5} "
            f"{s['arrive']:>6} {s['promote']:>5} {s['p_empty_wait']:>6} {s['load_latency_waited']:>5}")
    log(f"total {time.time() - t_start:.0f} s; {'ALL CORRECT' if not failed else 'SOME CHECK FAILED'}")
    with open(os.path.join(args.out, "gluon_probe.log"), "w") as f:
        f.write("\n".join(_LOG) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
