"""Benchmark of the expert-parallel MoE layer (DeepSeek-V3 shape) with Single Batch Overlap on vs off.

Run under torchrun on one host (NVLink); results (JSON, timeline PNG) go to the folder given::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 benchmarks/bench_moe_ep.py results/moe_ep

Per tokens-per-rank T: the layer with overlap on and off, the layer with the combine skipped
(exposed combine = on - skip; each iteration followed by ``comm.barrier()``, whose time alone is subtracted,
since dispatches without a combine between them must be separated), dispatch alone (all SMs, as in the layer;
the same barrier), combine alone (send + wait +
reduce; on the communication SMs, as in the overlapped layer, and on all SMs) and the local reduce
alone (CUDA-graph replays, slowest rank); their bandwidth in bytes per rank -- those that cross NVLink
(rows to / from another rank) and all bytes written -- against the copy-engine peer-to-peer bandwidth
measured in the same run.  Prints the table (and what it counts) last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _timed(fn, iters, warmup=3):
    """ms per call of ``fn`` captured in a CUDA graph (eager if capture fails), slowest rank."""
    import torch.distributed as dist
    graph = None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graph = g
        run = g.replay
    except Exception as e:      # noqa: BLE001
        print(f"[bench] graph capture failed ({e!r}); timing eager", flush=True)
        torch.cuda.synchronize()
        run = fn
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    ms = torch.tensor([start.elapsed_time(end) / iters], device="cuda")
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    del graph
    return float(ms), run is not fn


def _p2p_bandwidth(rank, world, nbytes=256 << 20):
    """Copy-engine write bandwidth to the next rank through a symmetric buffer (GB/s, rank 0's view)."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device="cuda")
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
    peer = hdl.get_buffer((rank + 1) % world, (nbytes,), torch.uint8)
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    for _ in range(3):
        peer.copy_(src)
    torch.cuda.synchronize()
    dist.barrier()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        peer.copy_(src)
    e.record()
    torch.cuda.synchronize()
    dist.barrier()
    gbs = nbytes * 10 / (s.elapsed_time(e) * 1e-3) / 1e9
    del peer, buf
    return gbs


class _AllPeersCopy:
    """Copy-engine bandwidth of the EP kernels' traffic pattern at their size: every rank writes ``per`` bytes
    to each of its W - 1 peers at once (one stream a peer), through one symmetric buffer allocated for the
    largest size.  GB/s = (W - 1) * per / the slowest rank's time, best of ``reps`` timed rounds of 5 copies."""

    def __init__(self, rank, world, max_per):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        self.rank, self.world, self.max_per = rank, world, max_per
        self.buf = symm_mem.empty(world * max_per, dtype=torch.uint8, device="cuda")
        hdl = symm_mem.rendezvous(self.buf, dist.group.WORLD.group_name)
        self.peers = [hdl.get_buffer(p, (world * max_per,), torch.uint8) for p in range(world) if p != rank]
        self.src = torch.empty(max_per, dtype=torch.uint8, device="cuda").random_()
        self.streams = [torch.cuda.Stream() for _ in self.peers]

    def gbps(self, per: int, reps: int = 3) -> float:
        import torch.distributed as dist
        per = max(16, min(self.max_per, per // 16 * 16))
        lo = self.rank * self.max_per
        best = float("inf")
        for rep in range(reps + 1):                      # the first round warms up
            dist.barrier()
            torch.cuda.synchronize()
            main = torch.cuda.current_stream()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for peer, st in zip(self.peers, self.streams):
                st.wait_stream(main)
                with torch.cuda.stream(st):
                    for _ in range(5):
                        peer[lo:lo + per].copy_(self.src[:per])
            for st in self.streams:
                main.wait_stream(st)
            e.record()
            torch.cuda.synchronize()
            t = torch.tensor([s.elapsed_time(e)], device="cuda")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if rep:
                best = min(best, float(t) / 5)
        return len(self.peers) * per / (best * 1e-3) / 1e9


def _write_png(path, lanes, spans, width=1200, lane_h=40):
    """Timeline: one lane per stream, one coloured bar per stage (matplotlib if present)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(12, 1 + 0.6 * len(lanes)))
        colors = plt.cm.tab10.colors
        for i, (lane, name, t0, t1) in enumerate(spans):
            y = lanes.index(lane)
            ax.barh(y, t1 - t0, left=t0, color=colors[i % 10], edgecolor="black")
            ax.text(t0 + (t1 - t0) / 2, y, name, ha="center", va="center", fontsize=7)
        ax.set_yticks(range(len(lanes)), lanes)
        ax.set_xlabel("µs from layer start (rank 0)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    except ImportError:
        pass
    import struct
    import zlib
    tmax = max(t1 for *_, t1 in spans) or 1.0
    h = lane_h * len(lanes)
    img = [[(255, 255, 255)] * width for _ in range(h)]
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127)]
    for i, (lane, _, t0, t1) in enumerate(spans):
        y0 = lanes.index(lane) * lane_h
        x0, x1 = int(t0 / tmax * (width - 1)), max(int(t0 / tmax * (width - 1)) + 1, int(t1 / tmax * (width - 1)))
        for y in range(y0 + 4, y0 + lane_h - 4):
            for x in range(x0, x1):
                img[y][x] = palette[i % len(palette)]
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in img)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _combine_trace(layer, comm, x, idx, w, iters):
    """Per-item stamps of the overlapped combine under CUDA-graph replay (the last replay's): a list of
    ``[launch, local expert, m-block, part, ready µs, done µs]``, times from the earliest ready stamp.
    ``launch`` is "head" (communication SMs, during the GEMM) or "tail" (every SM, after it).  Then the
    receive side on the same clock (``EPCommunicator.recv_trace``): rows ``["recv", -1, -1, -1, start, end]`` for
    the arrival wait and ``["reduce", -1, -1, -1, start, end]`` for the weighted reduce."""
    import math

    layer.forward(x, idx, w, overlap=True)                       # block_m of this batch
    torch.cuda.synchronize()
    bm = layer.last_block_m
    nb = math.ceil(comm.max_m / bm)
    L = comm.num_local_experts
    comm.combine_trace = torch.zeros(L * nb * max(1, layer.total_sms), 2, dtype=torch.int64, device=comm.device)
    comm.recv_trace = torch.zeros(4, dtype=torch.int64, device=comm.device)
    try:
        _timed(lambda: layer.forward(x, idx, w, overlap=True, check=False), iters)
        stamps = comm.combine_trace.cpu()
        recv = comm.recv_trace.tolist()
    finally:
        comm.combine_trace = None
        comm.recv_trace = None
    em = layer.expected_m(x.shape[0])
    head, tail = layer._combine_launches(bm, 0, em)
    launches = [("head", head)] + ([("tail", tail)] if tail is not None else [])
    out = []
    for name, kw in launches:
        g_lo, g_hi = kw.get("experts", (0, L))
        parts, base, lg = kw.get("parts", 1), kw.get("trace_base", 0), g_hi - g_lo
        for v in range(lg * nb * parts):
            ready, done = stamps[base + v].tolist()
            if ready == 0:
                continue                                         # an empty unit: no stamps
            u, s = divmod(v, parts)
            i, gl = divmod(u, lg)
            out.append([name, g_lo + gl, i, s, ready, done])
    out += [["recv", -1, -1, -1, recv[0], recv[1]], ["reduce", -1, -1, -1, recv[2], recv[3]]]
    t0 = min(r[4] for r in out[:-2]) if len(out) > 2 else min(recv)
    return [r[:4] + [(r[4] - t0) / 1e3, (r[5] - t0) / 1e3] for r in out]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--tokens", default="8,16,32,64,128,256")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--comm-sms", type=int, default=None)
    p.add_argument("--combine-tile", default=None,
                   help="A/B: ROWS,BLOCK_H of the combine sender's tile (default: EPCommunicator._combine_tiles)")
    p.add_argument("--tail-experts", type=int, default=None,
                   help="A/B: local experts whose combine is sent after the L2 GEMM on every SM (MoELayer; 0 = off)")
    p.add_argument("--a2-scales", choices=("mn", "row"), default="mn",
                   help="A/B: the layout of the L2 GEMM's A scales (the layer allocates them MN-major, so that the "
                        "Gluon GEMM takes them through shared memory; 'row' swaps in a row-major buffer)")
    p.add_argument("--combine-payload", choices=("bf16", "fp8"), default="bf16",
                   help="the combine's rows as BF16 (default) or as the FP8 combine payload (EPCommunicator)")
    p.add_argument("--dispatch-payload", choices=("fp8", "fp4"), default="fp8",
                   help="the dispatched tokens as FP8 (default) or FP4 (E2M1 + UE8M0 bytes a 32 columns; EPCommunicator)")
    p.add_argument("--sbo-form", choices=("warp", "consumer", "consumer-regs"), default="warp",
                   help="A/B: how the L2 GEMM signals its blocks: a separate signal warp and TMA stores (default, "
                        "gemm_gluon.SIGNAL_WARP), the consumer's own release atomic with TMA stores, or with register "
                        "stores (the kernel before session 11)")
    p.add_argument("--trace", action="store_true",
                   help="after the timings, stamp every combine work item (global timer after its counter wait "
                        "and after its stores) over CUDA-graph replays of the overlapped layer at the largest T; "
                        "rank 0's stamps go to the JSON as 'combine_trace'")
    args = p.parse_args()
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(k, v)

    import torch.distributed as dist

    from fp8gemm import per_block_cast_to_fp8
    from fp8gemm.moe.ep import EPCommunicator, combine_reduce_bf16
    from fp8gemm.moe.layer import MoELayer

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", local)
    os.makedirs(args.out_dir, exist_ok=True)
    tokens_list = [int(t) for t in args.tokens.split(",")]
    E, Hd, I, K = args.experts, args.hidden, args.inter, args.topk
    L = E // world
    t_setup = time.time()
    w13q = torch.empty(L, 2 * I, Hd, dtype=torch.float8_e4m3fn, device=dev)
    w13s = torch.empty(L, 2 * I // 128, Hd // 128, device=dev)
    w2q = torch.empty(L, Hd, I, dtype=torch.float8_e4m3fn, device=dev)
    w2s = torch.empty(L, Hd // 128, I // 128, device=dev)
    for e in range(L):
        w13q[e], w13s[e] = per_block_cast_to_fp8((torch.randn(2 * I, Hd, device=dev) / Hd ** 0.5).bfloat16())
        w2q[e], w2s[e] = per_block_cast_to_fp8((torch.randn(Hd, I, device=dev) / I ** 0.5).bfloat16())
    p2p = _p2p_bandwidth(rank, world)
    # the same pattern as the EP kernels at their size (each rank to every peer at once): a second reference
    max_rows = max(int(t) for t in args.tokens.split(",")) * args.topk
    at_size, a2a = None, float("nan")
    if world > 1:
        try:
            # the link's all-to-all rate when the size does not limit it: 64 MiB to every peer, every rank at once
            big = _AllPeersCopy(rank, world, 64 << 20)
            a2a = big.gbps(64 << 20)
            del big
            at_size = _AllPeersCopy(rank, world, -(-max_rows * 2 * args.hidden // 16) * 16)
        except Exception as e:  # noqa: BLE001 - a reference that cannot be set up is reported, not fatal
            print(f"[bench] rank {rank}: no at-size copy-engine reference ({type(e).__name__}: {e})", flush=True)
    from fp8gemm.kernels import gemm_gluon
    gemm_gluon.SIGNAL_WARP = args.sbo_form == "warp"
    gemm_gluon.SIGNAL_TMA_STORE = args.sbo_form != "consumer-regs"
    if args.combine_tile:
        tile = tuple(int(x) for x in args.combine_tile.split(","))
        EPCommunicator._combine_tiles = lambda self, rows: tile
    comm = EPCommunicator(dist.group.WORLD, num_experts=E, max_tokens_per_rank=max(tokens_list), topk=K, hidden=Hd,
                          combine_payload=args.combine_payload, dispatch_payload=args.dispatch_payload)
    layer = MoELayer(comm, (w13q, w13s), (w2q, w2s), num_comm_sms=args.comm_sms, tail_experts=args.tail_experts)
    if args.a2_scales == "row":
        layer.a2_sf = torch.empty(layer.a2_sf.shape, dtype=torch.float32, device=dev)
    if rank == 0:
        print(f"[bench] setup {time.time() - t_setup:.1f}s, p2p copy-engine {p2p:.0f} GB/s, "
              f"gemm SMs {layer.num_gemm_sms}, comm SMs {layer.num_comm_sms}, tail experts {layer.tail_experts}, "
              f"L2 A scales {args.a2_scales}, combine payload {args.combine_payload}, "
              f"dispatch payload {args.dispatch_payload}, SBO signals: {args.sbo_form}",
              flush=True)

    rows = []
    gen = torch.Generator(device=dev).manual_seed(1234 + rank)
    for T in tokens_list:
        x = torch.randn(T, Hd, device=dev, generator=gen).bfloat16()
        idx = torch.argsort(torch.rand(T, E, device=dev, generator=gen), dim=1)[:, :K].contiguous()
        w = torch.softmax(torch.randn(T, K, device=dev, generator=gen), dim=1)
        y_on = layer.forward(x, idx, w, overlap=True)
        y_off = layer.forward(x, idx, w, overlap=False)
        torch.cuda.synchronize()
        same = float((y_on.float() - y_off.float()).abs().max())
        if same != 0.0 and rank == 0:
            # both orders reduce the same received rows in the same k order: any difference is a bug
            print(f"[bench] T={T}: MISMATCH overlap on vs off, max |diff| {same:.3g}", flush=True)
        r = {"tokens": T}
        r["on_ms"], graphed = _timed(lambda: layer.forward(x, idx, w, overlap=True, check=False), args.iters)
        r["off_ms"], _ = _timed(lambda: layer.forward(x, idx, w, overlap=False, check=False), args.iters)
        # Loops that dispatch without a combine between iterations need comm.barrier() there (the call-order
        # contract in fp8gemm/moe/ep.py); its own time, measured alone, is subtracted.
        r["barrier_ms"], _ = _timed(comm.barrier, args.iters)
        r["skip_ms"] = _timed(lambda: (layer.forward(x, idx, w, overlap=True, check=False, skip_combine=True),
                                       comm.barrier()), args.iters)[0] - r["barrier_ms"]
        xq, xsf = layer._cast_tokens(x)
        r["dispatch_ms"] = _timed(lambda: (comm.dispatch(xq, xsf, idx), comm.barrier()), args.iters)[0] \
            - r["barrier_ms"]
        layer.forward(x, idx, w, overlap=False)          # routing state of this batch for the combine alone
        torch.cuda.synchronize()
        # the combine on the communication SMs (what the overlapped layer gives it) and on all SMs
        # (with the FP8 payload the L2 GEMM wrote it: out2 holds the codes, out2_sf the scale bytes)
        r["combine_ms"], _ = _timed(lambda: comm.combine(layer.out2, idx, w, num_sms=layer.num_comm_sms,
                                                         expert_out_sf=layer.out2_sf), args.iters)
        r["combine_all_sms_ms"], _ = _timed(lambda: comm.combine(layer.out2, idx, w, expert_out_sf=layer.out2_sf),
                                            args.iters)
        y_red = torch.empty(T, Hd, dtype=torch.bfloat16, device=dev)
        if args.combine_payload == "fp8":
            from fp8gemm.kernels.moe_act import launch_combine_reduce
            r["reduce_ms"], _ = _timed(lambda: launch_combine_reduce(comm.combine_recv_codes[:T], comm.combine_recv_sf[:T],
                                                                     w, idx, y_red, False, num_experts=E), args.iters)
        else:
            r["reduce_ms"], _ = _timed(lambda: combine_reduce_bf16(comm.combine_recv_buf, idx, w, y_red, E),
                                       args.iters)
        comm.check()
        # Bytes (per rank, averaged over the ranks; times are the slowest rank's):
        # dispatch: every valid (token, k) row = FP8 row + FP32 scales + int32 routing word, written into
        #   its owner's masked buffer; "nvl" counts the rows whose owner is another rank (they cross NVLink).
        # combine: every row this rank's experts received goes back as a BF16 row (FP8 payload: codes + one
        #   scale byte per 128 columns); "nvl" the rows whose
        #   source is another rank.  The local reduce (reads T x topk BF16 rows) is not counted.
        owner = idx // L
        d_rows, d_remote = int((idx >= 0).sum()), int(((idx >= 0) & (owner != rank)).sum())
        mm = comm.masked_m.long()
        live = torch.arange(comm.max_m, device=dev)[None, :] < mm[:, None]
        src = comm.recv_src_info.long() // (comm.max_tokens * K)
        c_rows, c_remote = int(live.sum()), int((live & (src != rank)).sum())
        cnt = torch.tensor([d_rows, d_remote, c_rows, c_remote], dtype=torch.float64, device=dev)
        dist.all_reduce(cnt)
        d_rows, d_remote, c_rows, c_remote = (cnt / world).tolist()
        row_bytes = (Hd // 2 if args.dispatch_payload == "fp4" else Hd) + 4 * (Hd // 128) + 4
        r["dispatch_total_MB"], r["dispatch_nvl_MB"] = d_rows * row_bytes / 1e6, d_remote * row_bytes / 1e6
        c_row_bytes = Hd + Hd // 128 if args.combine_payload == "fp8" else 2 * Hd
        r["combine_total_MB"], r["combine_nvl_MB"] = c_rows * c_row_bytes / 1e6, c_remote * c_row_bytes / 1e6
        r["dispatch_GBps"] = r["dispatch_total_MB"] / r["dispatch_ms"]
        r["dispatch_peer_GBps"] = r["dispatch_nvl_MB"] / r["dispatch_ms"]
        r["combine_GBps"] = r["combine_total_MB"] / r["combine_ms"]
        r["combine_peer_GBps"] = r["combine_nvl_MB"] / r["combine_ms"]
        r["combine_all_sms_peer_GBps"] = r["combine_nvl_MB"] / r["combine_all_sms_ms"]
        r["dispatch_pct_p2p"] = r["dispatch_peer_GBps"] / p2p * 100
        r["combine_pct_p2p"] = r["combine_peer_GBps"] / p2p * 100
        r["combine_all_sms_pct_p2p"] = r["combine_all_sms_peer_GBps"] / p2p * 100
        if at_size is not None:
            # copy-engine rate of each kernel's own cross-rank bytes sent to all peers at once
            for key in ("dispatch", "combine"):
                ce = at_size.gbps(int(r[f"{key}_nvl_MB"] * 1e6 / (world - 1)))
                r[f"{key}_ce_at_size_GBps"] = ce
                r[f"{key}_pct_ce_at_size"] = r[f"{key}_peer_GBps"] / ce * 100
            r["combine_all_sms_pct_ce_at_size"] = r["combine_all_sms_peer_GBps"] / r["combine_ce_at_size_GBps"] * 100
            for key in ("dispatch", "combine", "combine_all_sms"):
                r[f"{key}_pct_a2a"] = r[f"{key}_peer_GBps"] / a2a * 100
        r["gain_pct"] = (r["off_ms"] / r["on_ms"] - 1) * 100
        r["exposed_combine_pct"] = max(0.0, r["on_ms"] - r["skip_ms"]) / r["combine_ms"] * 100
        r["on_vs_off_maxabs"] = same
        r["graph"] = graphed
        rows.append(r)
        if rank == 0:
            print(f"[bench] T={T}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})}",
                  flush=True)

    # Timeline (rank 0, eager, overlap on, the largest T)
    T = tokens_list[-1]
    x = torch.randn(T, Hd, device=dev, generator=gen).bfloat16()
    idx = torch.argsort(torch.rand(T, E, device=dev, generator=gen), dim=1)[:, :K].contiguous()
    w = torch.softmax(torch.randn(T, K, device=dev, generator=gen), dim=1)
    trace = _combine_trace(layer, comm, x, idx, w, args.iters) if args.trace else None
    if trace and rank == 0:
        sends = [r for r in trace if r[0] in ("head", "tail")]
        tail = [r[4] for r in sends if r[0] == "tail"]
        span = {r[0]: (r[4], r[5]) for r in trace if r[0] in ("recv", "reduce")}
        print(f"[bench] trace T={T} (µs from the first ready block, rank 0): last head block ready "
              f"{max((r[4] for r in sends if r[0] == 'head'), default=float('nan')):.1f}, tail ready "
              f"{min(tail, default=float('nan')):.1f}, sends done {max((r[5] for r in sends), default=float('nan')):.1f}, "
              f"arrival wait {span['recv'][0]:.1f} -> {span['recv'][1]:.1f}, "
              f"reduce {span['reduce'][0]:.1f} -> {span['reduce'][1]:.1f}", flush=True)
    layer.forward(x, idx, w, overlap=True)
    torch.cuda.synchronize()
    dist.barrier()
    ev = {}
    layer.forward(x, idx, w, overlap=True, events=ev)
    torch.cuda.synchronize()
    t = {k: ev["start"].elapsed_time(v) * 1e3 for k, v in ev.items()}
    spans = [("main", "quant", t["start"], t["quant"]), ("main", "dispatch", t["quant"], t["dispatch"]),
             ("main", "L1+SwiGLU", t["dispatch"], t["l1_swiglu"]), ("main", "L2 (SBO)", t["l1_swiglu"], t["l2"]),
             ("comm", "combine send", t["combine_send_start"], t["combine_send"]),
             ("main", "combine recv+reduce", max(t["l2"], t["combine_send"]), t["combine"])]
    if rank == 0:
        _write_png(os.path.join(args.out_dir, "moe_ep_timeline.png"), ["main", "comm"], spans)
        card = torch.cuda.get_device_name()
        with open(os.path.join(args.out_dir, "moe_ep.json"), "w") as f:
            json.dump({"card": card, "gpus": world, "experts": E, "hidden": Hd, "inter": I, "topk": K,
                       "p2p_copy_GBps": p2p, "gemm_sms": layer.num_gemm_sms, "comm_sms": layer.num_comm_sms,
                       "combine_tile": args.combine_tile or "default", "tail_experts": layer.tail_experts,
                       "combine_payload": args.combine_payload, "dispatch_payload": args.dispatch_payload,
                       "all_to_all_copy_GBps_64MiB": a2a,
                       "combine_trace": trace, "rows": rows, "timeline_us": spans}, f, indent=1)
        print(f"\nMoE EP layer, {card} x{world}, E={E} H={Hd} I={I} top-{K}, p2p {p2p:.0f} GB/s, "
              f"SMs gemm/comm {layer.num_gemm_sms}/{layer.num_comm_sms}, combine payload {args.combine_payload}, "
              f"dispatch payload {args.dispatch_payload}")
        print("bytes per rank (mean over ranks), time of the slowest rank; nvl = bytes that cross NVLink (rows "
              "to / from another rank), total = all rows written (local ones too); dispatch row = FP8 row + FP32 "
              "scales (FP4: codes + scale bytes) + int32 routing word, combine row = BF16 row or FP8 payload (the local reduce is not counted); "
              f"%p2p = nvl GB/s / the copy-engine P2P bandwidth measured in this run ({p2p:.0f} GB/s); dispatch "
              f"on all SMs ({comm.num_sms}), combine (send + wait + reduce) on the {layer.num_comm_sms} "
              "communication SMs and on all SMs")
        print(f"{'T':>5} {'on us':>8} {'off us':>8} {'gain%':>6} {'skip us':>8} {'expos%':>7} | {'disp us':>7} "
              f"{'nvl MB':>6} {'tot MB':>6} {'nvl GB/s':>8} {'tot GB/s':>8} {'%p2p':>5} | {'comb us':>7} "
              f"{'nvl MB':>6} {'tot MB':>6} {'nvl GB/s':>8} {'tot GB/s':>8} {'%p2p':>5} | {'all-SM us':>9} "
              f"{'%p2p':>5} {'reduce us':>9} {'barrier us':>10}")
        for r in rows:
            print(f"{r['tokens']:>5} {r['on_ms'] * 1e3:>8.1f} {r['off_ms'] * 1e3:>8.1f} {r['gain_pct']:>6.1f} "
                  f"{r['skip_ms'] * 1e3:>8.1f} {r['exposed_combine_pct']:>7.1f} | {r['dispatch_ms'] * 1e3:>7.1f} "
                  f"{r['dispatch_nvl_MB']:>6.2f} {r['dispatch_total_MB']:>6.2f} {r['dispatch_peer_GBps']:>8.1f} "
                  f"{r['dispatch_GBps']:>8.1f} {r['dispatch_pct_p2p']:>5.1f} | {r['combine_ms'] * 1e3:>7.1f} "
                  f"{r['combine_nvl_MB']:>6.2f} {r['combine_total_MB']:>6.2f} {r['combine_peer_GBps']:>8.1f} "
                  f"{r['combine_GBps']:>8.1f} {r['combine_pct_p2p']:>5.1f} | {r['combine_all_sms_ms'] * 1e3:>9.1f} "
                  f"{r['combine_all_sms_pct_p2p']:>5.1f} {r['reduce_ms'] * 1e3:>9.1f} "
                  f"{r['barrier_ms'] * 1e3:>10.1f}", flush=True)
        if at_size is not None:
            print("against the copy engine moving the same cross-rank bytes to all peers at once (one stream a "
                  "peer, this run): CE GB/s and the kernel's % of it; %a2a = the kernel's nvl GB/s against the "
                  f"copy engine's all-to-all at 64 MiB a peer, every rank at once ({a2a:.0f} GB/s)")
            print(f"{'T':>5} | {'disp CE GB/s':>12} {'%':>5} {'%a2a':>5} | {'comb CE GB/s':>12} {'% (comm SMs)':>12} "
                  f"{'% (all SMs)':>11} {'%a2a comm':>9} {'%a2a all':>8}")
            for r in rows:
                print(f"{r['tokens']:>5} | {r['dispatch_ce_at_size_GBps']:>12.1f} {r['dispatch_pct_ce_at_size']:>5.1f} "
                      f"{r['dispatch_pct_a2a']:>5.1f} | {r['combine_ce_at_size_GBps']:>12.1f} "
                      f"{r['combine_pct_ce_at_size']:>12.1f} {r['combine_all_sms_pct_ce_at_size']:>11.1f} "
                      f"{r['combine_pct_a2a']:>9.1f} {r['combine_all_sms_pct_a2a']:>8.1f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
