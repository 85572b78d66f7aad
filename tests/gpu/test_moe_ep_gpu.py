"""Expert-parallel MoE layer on several GPUs, against a single-process PyTorch reference.

Run directly under torchrun (every rank runs every case; rank 0 prints the summary, exit code 1 on
any failure)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 tests/gpu/test_moe_ep_gpu.py

or through pytest (``-m gpu``), which launches torchrun on 2 GPUs (and on 4 where there are 4).

Cases, for the symm backend (masked layout with overlap on and off, contiguous layout) and the NCCL
backend (masked and contiguous): random routing, every token to one expert (most experts receive
nothing), tokens whose experts all live on another rank, tokens without any expert; counts
(``masked_m``, ``cumulative_local_expert_recv_stats``) exact; for the contiguous layout also
``m_indices`` (each local expert's rows in one aligned segment, -1 on every other row); output
``calc_diff < 1e-3`` against :func:`fp8gemm.reference.moe_layer_reference` (same weights,
every expert in one process).  Also: CUDA-graph capture and replay of the symm layer (both layouts),
a rank that deliberately skips its dispatch send, or its contiguous count exchange (its peers raise
a RuntimeError naming it within the timeout), and the FP8 combine payload (output bitwise equal to the
reference reduce of the payload of the layer's own expert outputs; ``calc_diff < 2e-3`` against the
whole-layer reference with that payload), and the FP4 dispatch payload (masked and contiguous).
"""
import os
import subprocess
import sys
import time

import pytest
import torch

if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

H, I, TOPK = 1024, 256, 4
EXPERTS_PER_RANK = 4
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _routing(kind, world, tokens, num_experts, gen, device):
    L = num_experts // world
    idxs = []
    for r in range(world):
        if kind == "random":
            idx = torch.stack([torch.randperm(num_experts, generator=gen)[:TOPK] for _ in range(tokens)])
        elif kind == "one_expert":
            idx = torch.full((tokens, TOPK), -1, dtype=torch.int64)
            idx[:, 0] = num_experts - 1
        elif kind == "remote":
            other = (r + 1) % world
            idx = torch.stack([other * L + torch.randperm(L, generator=gen)[:TOPK] for _ in range(tokens)])
        elif kind == "sparse":          # a third of the tokens route nowhere, half the experts get nothing
            # (fewer even experts than TOPK, as with one rank's 4 experts: the rest of the row routes nowhere)
            idx = torch.full((tokens, TOPK), -1, dtype=torch.int64)
            for t in range(tokens):
                picks = torch.randperm(num_experts // 2, generator=gen)[:TOPK] * 2
                idx[t, :picks.numel()] = picks
            idx[::3] = -1
        else:
            raise AssertionError(kind)
        idxs.append(idx.to(device))
    return idxs


def _case(kind, world, tokens, num_experts, gen, device):
    """Every rank's routing, BF16 tokens and routing weights for one case (all ranks draw all of them from the
    same generator, so each knows the others' inputs for the reference)."""
    idxs = _routing(kind, world, tokens, num_experts, gen, device)
    xs = [torch.randn(tokens, H, generator=gen).bfloat16().to(device) for _ in range(world)]
    ws = [torch.rand(tokens, TOPK, generator=gen).to(device) for _ in range(world)]
    return idxs, xs, ws


def _worker() -> int:
    import torch.distributed as dist

    from fp8gemm import testing
    from fp8gemm import reference as RL
    from fp8gemm.testing import make_moe_weights
    from fp8gemm.moe.ep import EPCommunicator
    from fp8gemm.moe.layer import MoELayer

    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", local)
    num_experts = EXPERTS_PER_RANK * world
    L = EXPERTS_PER_RANK
    w13, w2 = make_moe_weights(num_experts, H, I, seed=3, device=dev)
    loc13 = (w13[0][rank * L:(rank + 1) * L].contiguous(), w13[1][rank * L:(rank + 1) * L].contiguous())
    loc2 = (w2[0][rank * L:(rank + 1) * L].contiguous(), w2[1][rank * L:(rank + 1) * L].contiguous())
    failures, lines = [], []

    def record(name, ok, detail=""):
        lines.append(f"[rank {rank}] {'PASS' if ok else 'FAIL'} {name} {detail}")
        if not ok:
            failures.append(name)

    def contiguous_layout_ok(comm, counts):
        """m_indices: local expert le on rows [start, start + count), -1 elsewhere; aligned starts."""
        a, starts, want = comm.alignment, comm.segment_starts.tolist(), torch.full((comm.contig_rows,), -1,
                                                                                    dtype=torch.int32)
        pos = 0
        for le, n in enumerate(counts.tolist()):
            if starts[le] != pos:
                return False
            want[pos:pos + n] = le
            pos += -(-n // a) * a
        return torch.equal(comm.m_indices.cpu(), want)

    max_tokens = 96
    for backend in ("symm", "nccl"):
        comm = EPCommunicator(dist.group.WORLD, num_experts=num_experts, max_tokens_per_rank=max_tokens, topk=TOPK,
                              hidden=H, backend=backend, timeout_s=5.0, contiguous=True)
        # one tail expert: the overlapped combine runs as its two launches, as it does by default from
        # eight local experts on (MoELayer.tail_experts), including under CUDA-graph capture below
        layer = MoELayer(comm, loc13, loc2, tail_experts=1)
        stats = torch.zeros(L, dtype=torch.int32, device=dev)
        gen = torch.Generator().manual_seed(17)
        for kind in ("random", "one_expert", "remote", "sparse"):
            for tokens in (1, 33, 96):
                modes = [("masked", True), ("masked", False)] if backend == "symm" else [("masked", False)]
                for layout, overlap in modes + [("contiguous", False)]:
                    idxs, xs, ws = _case(kind, world, tokens, num_experts, gen, dev)
                    name = f"{backend} {layout} {kind} T={tokens} overlap={overlap}"
                    try:
                        y = layer.forward(xs[rank], idxs[rank], ws[rank], overlap=overlap, layout=layout)
                        torch.cuda.synchronize()
                        ref = RL.moe_layer_reference(xs[rank], idxs[rank], ws[rank], w13, w2)
                        counts = RL.dispatch_counts_reference([i.cpu() for i in idxs], num_experts, world)[rank]
                        stats += counts.to(dev)
                        diff = testing.calc_diff(y, ref)
                        ok = (diff < 1e-3 and torch.equal(comm.masked_m.cpu(), counts)
                              and torch.equal(comm.cumulative_local_expert_recv_stats, stats)
                              and (layout == "masked" or contiguous_layout_ok(comm, counts)))
                        record(name, ok, f"diff={diff:.2e} masked_m={comm.masked_m.tolist()} want={counts.tolist()}")
                    except Exception as e:      # noqa: BLE001
                        record(name, False, repr(e))
                    dist.barrier()
        if backend == "symm":
            # CUDA graph: capture once, replay with fresh inputs copied into the static buffers
            tokens = 64
            gen = torch.Generator().manual_seed(5)
            sx = torch.zeros(tokens, H, dtype=torch.bfloat16, device=dev)
            si = torch.zeros(tokens, TOPK, dtype=torch.int64, device=dev)
            sw = torch.zeros(tokens, TOPK, device=dev)
            idxs = _routing("random", world, tokens, num_experts, gen, dev)
            si.copy_(idxs[rank])
            try:
                for layout, overlap in (("masked", True), ("masked", False), ("contiguous", False)):
                    sx.normal_()
                    layer.forward(sx, si, sw, overlap=overlap, layout=layout)          # warm-up (compiles)
                    torch.cuda.synchronize()
                    dist.barrier()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        sy = layer.forward(sx, si, sw, overlap=overlap, check=False, layout=layout)
                    for rep in range(3):
                        idxs, xs, ws = _case("random", world, tokens, num_experts, gen, dev)
                        sx.copy_(xs[rank])
                        si.copy_(idxs[rank])
                        sw.copy_(ws[rank])
                        dist.barrier()
                        g.replay()
                        torch.cuda.synchronize()
                        comm.check()
                        ref = RL.moe_layer_reference(xs[rank], idxs[rank], ws[rank], w13, w2)
                        diff = testing.calc_diff(sy, ref)
                        record(f"symm graph {layout} overlap={overlap} replay {rep}", diff < 1e-3, f"diff={diff:.2e}")
                    dist.barrier()
            except Exception as e:      # noqa: BLE001
                record("symm graph", False, repr(e))
            dist.barrier()
            # Back-to-back dispatches separated only by comm.barrier(): the inputs are made first, so the
            # launches queue without host pauses and a fast rank could run ahead; every count must be exact.
            # (Without the barrier this need not fail: the race depends on timing. It checks that the barrier
            # keeps the counts right and never hangs or errs, not that it is needed.)
            from fp8gemm import per_token_cast_to_fp8
            gen = torch.Generator().manual_seed(23)
            batches = []
            for _ in range(12):
                idxs = _routing("random", world, 48, num_experts, gen, dev)
                xq, xsf = per_token_cast_to_fp8(torch.randn(48, H, generator=gen).bfloat16().to(dev))
                want = RL.dispatch_counts_reference([i.cpu() for i in idxs], num_experts, world)[rank]
                batches.append((xq, xsf, idxs[rank], want))
            try:
                torch.cuda.synchronize()
                dist.barrier()
                snaps = []
                for xq, xsf, idx, _ in batches:
                    comm.dispatch(xq, xsf, idx)
                    snaps.append(comm.masked_m.clone())
                    comm.barrier()
                torch.cuda.synchronize()
                comm.check()
                bad = [k for k, (snap, b) in enumerate(zip(snaps, batches)) if not torch.equal(snap.cpu(), b[3])]
                record("symm back-to-back dispatches with barrier", not bad, f"wrong counts in calls {bad}")
            except Exception as e:      # noqa: BLE001
                record("symm back-to-back dispatches with barrier", False, repr(e))
            dist.barrier()
        del layer, comm

    # The FP8 combine payload (symm; the L2 GEMM writes it): the output must be, bit for bit, the reference
    # reduce of the payload this very layer's GEMMs wrote (gathered from every rank by their routing words), and
    # within the stated error of the whole-layer reference with the same payload.
    comm = EPCommunicator(dist.group.WORLD, num_experts=num_experts, max_tokens_per_rank=max_tokens, topk=TOPK,
                          hidden=H, timeout_s=5.0, combine_payload="fp8")
    layer = MoELayer(comm, loc13, loc2, tail_experts=1)
    gen = torch.Generator().manual_seed(29)

    def own_payload(layer, comm, tokens):
        """(codes, scale bytes) [tokens, TOPK, ...]: the FP8 payload of this rank's rows as the L2 GEMM of every
        rank wrote it (the GEMM casts; layer.l2_writes_payload)."""
        assert layer.l2_writes_payload
        codes = [torch.empty_like(layer.out2.view(torch.uint8)) for _ in range(world)]
        sfs = [torch.empty_like(layer.out2_sf) for _ in range(world)]
        infos = [torch.empty_like(comm.recv_src_info) for _ in range(world)]
        counts = [torch.empty_like(comm.masked_m) for _ in range(world)]
        dist.all_gather(codes, layer.out2.view(torch.uint8).contiguous())
        dist.all_gather(sfs, layer.out2_sf.contiguous())
        dist.all_gather(infos, comm.recv_src_info.contiguous())
        dist.all_gather(counts, comm.masked_m.contiguous())
        q = torch.zeros(tokens, TOPK, H, dtype=torch.uint8, device=dev)
        sf = torch.full((tokens, TOPK, H // 128), 127, dtype=torch.uint8, device=dev)
        for r in range(world):
            for le in range(L):
                m = int(counts[r][le])
                words = infos[r][le, :m].long()
                src, rest = words // (max_tokens * TOPK), words % (max_tokens * TOPK)
                sel = src == rank
                t_, k_ = rest[sel] // TOPK, rest[sel] % TOPK
                q[t_, k_] = codes[r][le, :m][sel]
                sf[t_, k_] = sfs[r][le, :m][sel]
        return q.view(torch.float8_e4m3fn), sf

    for kind in ("random", "remote", "sparse"):
        for tokens in (1, 96):
            for overlap in (True, False):
                idxs, xs, ws = _case(kind, world, tokens, num_experts, gen, dev)
                name = f"symm fp8 combine {kind} T={tokens} overlap={overlap}"
                try:
                    y = layer.forward(xs[rank], idxs[rank], ws[rank], overlap=overlap)
                    torch.cuda.synchronize()
                    q, sf = own_payload(layer, comm, tokens)
                    idx = idxs[rank]
                    exact = RL.combine_reduce(q, sf, ws[rank], torch.where((idx >= 0) & (idx < num_experts), idx, -1))
                    ref = RL.moe_layer_reference(xs[rank], idxs[rank], ws[rank], w13, w2, combine_payload="fp8")
                    diff = testing.calc_diff(y, ref)
                    same = torch.equal(y.view(torch.int16), exact.view(torch.int16))
                    record(name, same and diff < 2e-3, f"bitwise={same} diff={diff:.2e}")
                except Exception as e:      # noqa: BLE001
                    record(name, False, repr(e))
                dist.barrier()
    del layer, comm

    # The FP4 dispatch payload (symm): masked (overlap on and off) and contiguous, against the reference with the
    # same payload.
    comm = EPCommunicator(dist.group.WORLD, num_experts=num_experts, max_tokens_per_rank=max_tokens, topk=TOPK,
                          hidden=H, timeout_s=5.0, contiguous=True, dispatch_payload="fp4")
    layer = MoELayer(comm, loc13, loc2, tail_experts=1)
    gen = torch.Generator().manual_seed(31)
    for kind in ("random", "remote", "sparse"):
        for tokens in (1, 96):
            for layout, overlap in (("masked", True), ("masked", False), ("contiguous", False)):
                idxs, xs, ws = _case(kind, world, tokens, num_experts, gen, dev)
                name = f"symm fp4 dispatch {layout} {kind} T={tokens} overlap={overlap}"
                try:
                    y = layer.forward(xs[rank], idxs[rank], ws[rank], overlap=overlap, layout=layout)
                    torch.cuda.synchronize()
                    ref = RL.moe_layer_reference(xs[rank], idxs[rank], ws[rank], w13, w2, dispatch_payload="fp4")
                    counts = RL.dispatch_counts_reference([i.cpu() for i in idxs], num_experts, world)[rank]
                    diff = testing.calc_diff(y, ref)
                    record(name, diff < 1e-3 and torch.equal(comm.masked_m.cpu(), counts), f"diff={diff:.2e}")
                except Exception as e:      # noqa: BLE001
                    record(name, False, repr(e))
                dist.barrier()
    del layer, comm

    # A rank that skips its dispatch send: every other rank must raise within the timeout.
    comm = EPCommunicator(dist.group.WORLD, num_experts=num_experts, max_tokens_per_rank=16, topk=TOPK, hidden=H,
                          timeout_s=2.0)
    gen = torch.Generator().manual_seed(9)
    idxs = _routing("random", world, 16, num_experts, gen, dev)
    from fp8gemm import per_token_cast_to_fp8
    xq, xsf = per_token_cast_to_fp8(torch.randn(16, H, device=dev).bfloat16())
    dist.barrier()
    t0 = time.time()
    if rank != world - 1:
        comm.dispatch_send(xq, xsf, idxs[rank])
    comm.dispatch_recv()
    torch.cuda.synchronize()
    elapsed = time.time() - t0
    if rank != world - 1:
        try:
            comm.check()
            record("skipped send -> RuntimeError", False, "no error raised")
        except RuntimeError as e:
            ok = f"rank {world - 1}" in str(e) and elapsed < 2.0 * world + 5
            record("skipped send -> RuntimeError", ok, f"{elapsed:.1f}s: {e}")
    dist.barrier()
    del comm

    # Contiguous form: a rank that skips its count exchange (and its rows): the others time out naming it.
    comm = EPCommunicator(dist.group.WORLD, num_experts=num_experts, max_tokens_per_rank=16, topk=TOPK, hidden=H,
                          timeout_s=2.0, contiguous=True)
    dist.barrier()
    t0 = time.time()
    if rank != world - 1:
        comm.dispatch_contiguous(xq, xsf, idxs[rank])
        torch.cuda.synchronize()
        elapsed = time.time() - t0
        try:
            comm.check()
            record("contiguous skipped counts -> RuntimeError", False, "no error raised")
        except RuntimeError as e:
            ok = f"token counts of rank {world - 1}" in str(e) and elapsed < 2.0 * world + 5
            record("contiguous skipped counts -> RuntimeError", ok, f"{elapsed:.1f}s: {e}")
    dist.barrier()

    for line in lines:
        print(line, flush=True)
    bad = torch.tensor([len(failures)], device=dev)
    dist.all_reduce(bad)
    if rank == 0:
        print(f"moe_ep_gpu: world={world} card={torch.cuda.get_device_name()} "
              f"{'ALL PASS' if int(bad) == 0 else f'{int(bad)} FAILURES'}", flush=True)
    dist.destroy_process_group()
    return 0 if int(bad) == 0 else 1


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("nproc", [2, 4])
def test_moe_ep_torchrun(nproc):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    env = dict(os.environ, **ENV)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]


if __name__ == "__main__":
    sys.exit(_worker())
