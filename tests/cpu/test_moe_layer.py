"""Expert-parallel MoE layer on the CPU: the SwiGLU + FP8 kernel, the symmetric-memory protocol in a
simulated world (every rank in this process, regions are plain tensors, kernels in the interpreter),
routing metadata, bounded waits, and the NCCL (all_to_all_single) path over gloo with 2 processes; the
masked (decode) form and the contiguous (prefill) form of the layer."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from fp8gemm import reference as R
from fp8gemm import testing
from fp8gemm.kernels.swiglu import launch_swiglu_quant
from fp8gemm import reference as RL
from fp8gemm.testing import make_moe_weights
from fp8gemm import runtime
from fp8gemm.moe.ep import EPCommunicator, make_simulated_world
from fp8gemm.moe.layer import MoELayer, run_simulated

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (interpreter) tests")

H, I = 256, 128


def _local(w, r, L):
    return (w[0][r * L:(r + 1) * L].contiguous(), w[1][r * L:(r + 1) * L].contiguous())


def _world(world, num_experts, max_tokens, topk, seed=1, tail_experts=None, **kw):
    w13, w2 = make_moe_weights(num_experts, H, I, seed=seed)
    comms = make_simulated_world(world, num_experts=num_experts, max_tokens_per_rank=max_tokens, topk=topk,
                                 hidden=H, max_spin_iters=200, **kw)
    L = num_experts // world
    layers = [MoELayer(c, _local(w13, r, L), _local(w2, r, L), num_comm_sms=2, tail_experts=tail_experts)
              for r, c in enumerate(comms)]
    return layers, w13, w2


def _routing(kind, world, tokens, num_experts, topk, gen):
    idxs = []
    L = num_experts // world
    for r in range(world):
        if kind == "random":
            idx = torch.stack([torch.randperm(num_experts, generator=gen)[:topk] for _ in range(tokens)])
        elif kind == "one_expert":          # every token's first choice is expert 1, the rest -1
            idx = torch.full((tokens, topk), -1, dtype=torch.int64)
            idx[:, 0] = 1
        elif kind == "remote":              # every expert of every token lives on the next rank
            other = (r + 1) % world
            idx = torch.stack([other * L + torch.randperm(L, generator=gen)[:topk] for _ in range(tokens)])
        elif kind == "sparse":              # odd experts receive nothing; every third token routes nowhere
            idx = torch.stack([torch.randperm(num_experts // 2, generator=gen)[:topk] * 2 for _ in range(tokens)])
            idx[::3] = -1
        else:
            raise AssertionError(kind)
        idxs.append(idx.to(torch.int64))
    return idxs


def _check_layer(layers, w13, w2, idxs, tokens, overlap, gen, payload="bf16"):
    world = len(layers)
    xs = [torch.randn(tokens, H, generator=gen).bfloat16() for _ in range(world)]
    ws = [torch.rand(tokens, idxs[0].shape[1], generator=gen) for _ in range(world)]
    before = [layer.comm.cumulative_local_expert_recv_stats.clone() for layer in layers]
    ys = run_simulated(layers, xs, idxs, ws, overlap=overlap)
    num_experts = w13[0].shape[0]
    counts = RL.dispatch_counts_reference(idxs, num_experts, world)
    for r, layer in enumerate(layers):
        assert torch.equal(layer.comm.masked_m, counts[r]), (r, layer.comm.masked_m, counts[r])
        assert torch.equal(layer.comm.cumulative_local_expert_recv_stats - before[r], counts[r])
        ref = RL.moe_layer_reference(xs[r], idxs[r], ws[r], w13, w2, combine_payload=payload,
                                     dispatch_payload=layer.comm.dispatch_payload)
        assert ys[r].shape == ref.shape and ys[r].dtype == torch.bfloat16
        assert not ys[r].isnan().any()
        diff = testing.calc_diff(ys[r], ref)
        assert diff < 1e-3, (r, diff)
        valid = ((idxs[r] >= 0).any(dim=1))
        assert torch.all(ys[r][~valid] == 0)            # tokens without an expert reduce to 0
    if overlap:
        for layer in layers:                             # consumed SBO counters are zeroed by the combine
            assert int(layer.signal.abs().sum()) == 0
    return xs


# --------------------------------------------------------------------------------------------
# SwiGLU + FP8 re-quantisation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inter", [128, 192, 384])
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("sf_layout", ["row", "mn"])
def test_swiglu_quant_kernel(inter, use_ue8m0, sf_layout):
    g, max_m = 3, 11
    h = (torch.randn(g, max_m, 2 * inter) * 3).bfloat16()
    masked_m = torch.tensor([0, 4, 11], dtype=torch.int32)
    q = torch.full((g, max_m, inter), 0x55, dtype=torch.uint8).view(R.FP8)
    if sf_layout == "mn":       # as the MoE layer allocates them: each column's rows contiguous, rows padded
        sf = torch.full((g, -(-inter // 128), 12), float("nan")).transpose(1, 2)[:, :max_m]
    else:
        sf = torch.full((g, max_m, -(-inter // 128)), float("nan"))
    launch_swiglu_quant(h, q, sf, masked_m, use_ue8m0, soft=True, num_sms=4)
    rq, rsf = RL.swiglu_quant_reference(h, masked_m, use_ue8m0)
    for gi, m in enumerate(masked_m.tolist()):
        # rows past masked_m are untouched
        assert torch.all(q[gi, m:].view(torch.uint8) == 0x55) and sf[gi, m:].isnan().all()
        if m == 0:
            continue
        torch.testing.assert_close(sf[gi, :m], rsf[gi, :m], rtol=1e-6, atol=0)
        same = (q[gi, :m].view(torch.uint8) == rq[gi, :m].view(torch.uint8)).float().mean().item()
        assert same > 0.995, same      # exp() may differ by an ulp; at most a rare one-step code flip
        deq = R.dequantize(q[gi, :m], sf[gi, :m], 1)
        ref = R.dequantize(rq[gi, :m], rsf[gi, :m], 1)
        assert testing.calc_diff(deq, ref) < 1e-5


# --------------------------------------------------------------------------------------------
# The layer in a simulated world (symmetric-memory protocol in the interpreter)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world,num_experts,topk", [(2, 4, 2), (4, 8, 3)])
@pytest.mark.parametrize("overlap", [False, True, "auto"])
def test_layer_random_routing(world, num_experts, topk, overlap):
    gen = torch.Generator().manual_seed(7)
    layers, w13, w2 = _world(world, num_experts, 6, topk)
    idxs = _routing("random", world, 5, num_experts, topk, gen)
    idxs[0][1, 1] = -1                                   # a skipped slot
    idxs[1][2, :] = -1                                   # a token with no expert at all
    _check_layer(layers, w13, w2, idxs, 5, overlap, gen)
    # a second call through the same buffers (flags and counters were consumed, not reset)
    idxs = _routing("random", world, 4, num_experts, topk, gen)
    _check_layer(layers, w13, w2, idxs, 4, overlap, gen)


@pytest.mark.parametrize("world,num_experts,topk,overlap,tail", [(2, 4, 2, True, None), (4, 8, 3, True, 1),
                                                                   (2, 4, 2, False, None)])
def test_layer_fp8_combine_payload(world, num_experts, topk, overlap, tail):
    """The layer with the FP8 combine payload against the reference with the same payload (the reference
    quantises its own expert outputs, which differ from the kernels' by accumulation order only)."""
    gen = torch.Generator().manual_seed(11)
    layers, w13, w2 = _world(world, num_experts, 6, topk, tail_experts=tail, combine_payload="fp8")
    idxs = _routing("random", world, 5, num_experts, topk, gen)
    idxs[0][1, 1] = -1
    idxs[1][2, :] = -1
    _check_layer(layers, w13, w2, idxs, 5, overlap, gen, payload="fp8")
    # the rows came as FP8 payload: every used slot has its scale bytes (the BF16 form never writes them).
    # The layer's output alone cannot tell the payloads apart here: its expert outputs differ from the
    # reference's by ~2% (FP8 re-quantisation after SwiGLU), as much as the payload's own rounding; the
    # payload bytes and the reduce are checked exactly in test_ep_comm_rows.test_combine_fp8_payload.
    for r, layer in enumerate(layers):
        used = idxs[r] >= 0
        assert (layer.comm.combine_recv_sf[:5][used] != 0).all()


def test_layer_contiguous_fp8_combine_payload():
    """The contiguous (prefill) form with the FP8 combine payload: its L2 output stays BF16 and the combine
    sender casts the rows (the GEMM writes the payload only in the masked form)."""
    gen = torch.Generator().manual_seed(17)
    layers, w13, w2 = _world(2, 4, 6, 2, contiguous=True, combine_payload="fp8")
    assert layers[0].l2_writes_payload and layers[0].c_out2.dtype == torch.bfloat16
    idxs = _routing("random", 2, 5, 4, 2, gen)
    _run_contiguous(layers, w13, w2, idxs, 5, gen, 6, payload="fp8")
    assert (layers[0].comm.combine_recv_sf[:5][idxs[0] >= 0] != 0).all()


@pytest.mark.parametrize("world,num_experts,topk,tail", [(2, 4, 2, 1), (4, 8, 3, 1), (2, 8, 3, 3)])
def test_layer_overlap_with_tail_launch(world, num_experts, topk, tail):
    """Overlap with the combine split in two launches (the last ``tail`` local experts sent after the GEMM,
    their blocks cut into row ranges): same results, counters and flags consumed, twice through the buffers."""
    gen = torch.Generator().manual_seed(11)
    layers, w13, w2 = _world(world, num_experts, 6, topk, tail_experts=tail)
    head, rest = layers[0]._combine_launches(64, 3, 6)
    assert rest is not None and rest["experts"] == (num_experts // world - tail, num_experts // world)
    assert head["arrive_total"] == rest["arrive_total"]
    for tokens in (5, 4):
        idxs = _routing("random", world, tokens, num_experts, topk, gen)
        _check_layer(layers, w13, w2, idxs, tokens, True, gen)


@pytest.mark.parametrize("kind", ["one_expert", "remote"])
def test_layer_skewed_routing(kind):
    gen = torch.Generator().manual_seed(3)
    world, num_experts, topk = 2, 4, 2
    layers, w13, w2 = _world(world, num_experts, 8, topk)
    idxs = _routing(kind, world, 8, num_experts, topk, gen)
    _check_layer(layers, w13, w2, idxs, 8, True, gen)
    if kind == "one_expert":                             # 16 rows for expert 1, nothing for the others
        assert layers[0].comm.masked_m.tolist() == [0, 16] and layers[1].comm.masked_m.tolist() == [0, 0]


def test_dispatch_routing_metadata():
    gen = torch.Generator().manual_seed(5)
    world, num_experts, topk, tokens, tmax = 2, 4, 2, 5, 6
    comms = make_simulated_world(world, num_experts=num_experts, max_tokens_per_rank=tmax, topk=topk, hidden=H,
                                 max_spin_iters=100)
    idxs = _routing("random", world, tokens, num_experts, topk, gen)
    xs = [torch.randn(tokens, H, generator=gen) for _ in range(world)]
    qs = [R.per_token_cast_to_fp8(x) for x in xs]
    for c, (xq, xsf), idx in zip(comms, qs, idxs):
        c.dispatch_send(xq, xsf, idx)
    outs = [c.dispatch_recv() for c in comms]
    for c in comms:
        c.check()
    L = num_experts // world
    for r, out in enumerate(outs):
        for le in range(L):
            e = r * L + le
            m = int(out.masked_m[le])
            want = sorted(s * tmax * topk + t * topk + k for s in range(world)
                          for t, k in (idxs[s] == e).nonzero().tolist())
            words = out.recv_src_info[le, :m].tolist()
            assert sorted(words) == want
            for j, word in enumerate(words):             # each row carries its token's codes and scales
                s, rest = divmod(word, tmax * topk)
                t = rest // topk
                assert torch.equal(out.recv_x[le, j].view(torch.uint8), qs[s][0][t].view(torch.uint8))
                assert torch.equal(out.recv_x_sf[le, j], qs[s][1][t])


def test_peer_that_never_sends_times_out():
    gen = torch.Generator().manual_seed(1)
    comms = make_simulated_world(2, num_experts=4, max_tokens_per_rank=4, topk=2, hidden=H, max_spin_iters=50)
    idxs = _routing("random", 2, 3, 4, 2, gen)
    xq, xsf = R.per_token_cast_to_fp8(torch.randn(3, H))
    comms[0].dispatch_send(xq, xsf, idxs[0])             # rank 1 deliberately skips its send
    comms[0].dispatch_recv()
    with pytest.raises(RuntimeError, match=r"rank 0/2: dispatch: timed out .* rank 1 \(owner of experts 2\.\.3\)"):
        comms[0].check()


@pytest.mark.parametrize("payload", ["bf16", "fp8"])
def test_peer_that_never_combines_times_out(payload):
    """A rank that skips its combine send: its peer's receive step records the error naming it and ends (both
    payloads); nothing hangs."""
    gen = torch.Generator().manual_seed(2)
    comms = make_simulated_world(2, num_experts=4, max_tokens_per_rank=4, topk=2, hidden=H, max_spin_iters=50,
                                 combine_payload=payload)
    idxs = _routing("random", 2, 3, 4, 2, gen)
    for c, idx in zip(comms, idxs):
        xq, xsf = R.per_token_cast_to_fp8(torch.randn(3, H))
        c.dispatch_send(xq, xsf, idx)
    for c in comms:
        c.dispatch_recv()
        c.check()
    out = torch.zeros(comms[0].num_local_experts, comms[0].max_m, H).bfloat16()
    comms[0].combine_send(out)                           # rank 1 deliberately skips its send
    comms[0].combine_recv(idxs[0], torch.rand(3, 2))
    with pytest.raises(RuntimeError, match=r"rank 0/2: combine: timed out .* rank 1 \(owner of experts 2\.\.3\)"):
        comms[0].check()


def test_barrier_between_dispatches():
    """The barrier's mechanics between two dispatches: every rank's arrival reaches every rank, each wait
    consumes them (the flags are back at 0, so the next barrier needs new arrivals) and records no error; the
    dispatches' counts stay exact.  The simulated world runs the ranks one after another, so the ordering the
    barrier exists for is exercised on GPUs only (tests/gpu/test_moe_ep_gpu.py)."""
    world, ne, tmax, topk = 2, 4, 3, 2
    gen = torch.Generator().manual_seed(3)
    comms = make_simulated_world(world, num_experts=ne, max_tokens_per_rank=tmax, topk=topk, hidden=H,
                                 max_spin_iters=100)
    for step in range(2):
        idxs = _routing("random", world, tmax, ne, topk, gen)
        qs = [R.per_token_cast_to_fp8(torch.randn(tmax, H)) for _ in range(world)]
        for s in range(world):
            comms[s].dispatch_send(qs[s][0], qs[s][1], idxs[s])
        outs = [comms[r].dispatch_recv() for r in range(world)]
        want = RL.dispatch_counts_reference(idxs, ne, world)
        for r in range(world):
            assert torch.equal(outs[r].masked_m, want[r]), f"step {step} rank {r}"
        for c in comms:                                  # every rank arrives, then every rank waits
            c._barrier_arrive()
        for c in comms:
            c._barrier_wait()
            c.check()
        for c in comms:
            assert c.region[c.offsets["bflag"]:c.offsets["bflag"] + 4 * world].view(torch.int32).tolist() == \
                [0] * world


def test_barrier_with_a_missing_rank_times_out():
    comms = make_simulated_world(3, num_experts=3, max_tokens_per_rank=2, topk=1, hidden=H, max_spin_iters=50)
    comms[0]._barrier_arrive()
    comms[2]._barrier_arrive()                           # rank 1 never arrives
    comms[0]._barrier_wait()
    with pytest.raises(RuntimeError, match=r"rank 0/3: barrier: timed out waiting for rank 1 \(owner of experts 1"):
        comms[0].check()


def test_gemm_signal_that_never_arrives_times_out():
    comms = make_simulated_world(1, num_experts=2, max_tokens_per_rank=4, topk=1, hidden=H, max_spin_iters=50)
    c = comms[0]
    xq, xsf = R.per_token_cast_to_fp8(torch.randn(3, H))
    c.dispatch(xq, xsf, torch.tensor([[0], [1], [1]]))
    c.check()
    signal = torch.zeros(8, dtype=torch.int32)
    signal[0] = 2                                        # expert 0's block is done, expert 1's never is
    c.combine_send(torch.zeros(2, 4, H, dtype=torch.bfloat16), signal=signal, block_m=4, threshold=2)
    with pytest.raises(RuntimeError, match=r"GEMM signal of local expert 1 \(global expert 1\), m-block 0"):
        c.check()


def test_capacity_overflow_is_an_error():
    comms = make_simulated_world(1, num_experts=2, max_tokens_per_rank=6, topk=1, hidden=H, max_m=4,
                                 max_spin_iters=50)
    xq, xsf = R.per_token_cast_to_fp8(torch.randn(6, H))
    out = comms[0].dispatch(xq, xsf, torch.zeros(6, 1, dtype=torch.int64))
    assert out.masked_m.tolist() == [4, 0]
    with pytest.raises(RuntimeError, match=r"local expert 0 .* received 6 rows, more than its capacity max_m=4"):
        comms[0].check()


def test_validation():
    layers, w13, w2 = _world(2, 4, 4, 2)
    c = layers[0].comm
    xq, xsf = R.per_token_cast_to_fp8(torch.randn(3, H))
    idx = torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="x must have dtype"):
        c.dispatch_send(xq.float(), xsf, idx)
    with pytest.raises(ValueError, match="max_tokens_per_rank=4"):
        c.dispatch_send(*R.per_token_cast_to_fp8(torch.randn(5, H)), torch.zeros(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="topk_idx must have shape"):
        c.dispatch_send(xq, xsf, idx[:, :1])
    with pytest.raises(TypeError, match="topk_idx must have dtype"):
        c.dispatch_send(xq, xsf, idx.float())
    with pytest.raises(ValueError, match="expert_out must have shape"):
        c.combine_send(torch.zeros(2, 3, H, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="num_experts .* multiple of the world size"):
        make_simulated_world(2, num_experts=3, max_tokens_per_rank=4, topk=1, hidden=H)
    with pytest.raises(ValueError, match="hidden must be a multiple of 128"):
        make_simulated_world(1, num_experts=2, max_tokens_per_rank=4, topk=1, hidden=100)
    with pytest.raises(ValueError, match="backend must be one of"):
        EPCommunicator(None, num_experts=2, max_tokens_per_rank=4, topk=1, hidden=H, backend="mpi",
                       _simulated={"rank": 0, "world_size": 1, "region": None, "tab": None})
    sim = {"rank": 0, "world_size": 1, "region": None, "tab": None}
    for kw, msg in [(dict(combine_payload="fp4"), "combine_payload must be one of"),
                    (dict(combine_payload="fp8", backend="nccl"), "combine_payload='fp8' needs the symm backend"),
                    (dict(dispatch_payload="nvfp4"), "dispatch_payload must be one of"),
                    (dict(dispatch_payload="fp4", backend="nccl"), "dispatch_payload='fp4' needs the symm backend")]:
        with pytest.raises(ValueError, match=msg):
            EPCommunicator(None, num_experts=2, max_tokens_per_rank=4, topk=1, hidden=H, _simulated=sim, **kw)
    c4 = make_simulated_world(2, num_experts=4, max_tokens_per_rank=4, topk=2, hidden=H, dispatch_payload="fp4")[0]
    with pytest.raises(TypeError, match="x must have dtype"):
        c4.dispatch_send(xq, xsf, idx)                   # the FP8 form on an FP4 communicator
    q4 = torch.zeros(3, H // 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"x must have shape \[T, 128\] \(FP4 codes"):
        c4.dispatch_send(torch.zeros(3, H, dtype=torch.uint8), torch.zeros(3, H // 32, dtype=torch.uint8), idx)
    with pytest.raises(TypeError, match="x_sf must have dtype"):
        c4.dispatch_send(q4, xsf, idx)
    with pytest.raises(ValueError, match="dispatch_payload must be"):
        RL.moe_layer_reference(torch.randn(1, H).bfloat16(), idx[:1], torch.rand(1, 2), w13, w2,
                               dispatch_payload="fp16")
    with pytest.raises(ValueError, match="combine_payload must be"):
        RL.moe_layer_reference(torch.randn(1, H).bfloat16(), idx[:1], torch.rand(1, 2), w13, w2,
                               combine_payload="fp16")
    with pytest.raises(ValueError, match=r"w13\[0\] must have shape"):
        MoELayer(c, _local(w13, 0, 1), _local(w2, 0, 2))
    with pytest.raises(TypeError, match="comm must be an EPCommunicator"):
        MoELayer(None, _local(w13, 0, 2), _local(w2, 0, 2))
    with pytest.raises(TypeError, match="x must have dtype"):
        layers[0].forward(torch.randn(3, H), idx, torch.rand(3, 2))
    with pytest.raises(TypeError, match="overlap must be a bool"):
        layers[0].forward(torch.randn(3, H).bfloat16(), idx, torch.rand(3, 2), overlap=1)
    with pytest.raises(ValueError, match="overlap must be True, False or 'auto'"):
        layers[0].forward(torch.randn(3, H).bfloat16(), idx, torch.rand(3, 2), overlap="always")
    with pytest.raises(ValueError, match="tail_experts must be below the 2 local experts"):
        MoELayer(c, _local(w13, 0, 2), _local(w2, 0, 2), tail_experts=2)
    with pytest.raises(ValueError, match="tail_experts"):
        MoELayer(c, _local(w13, 0, 2), _local(w2, 0, 2), tail_experts=-1)


@pytest.mark.parametrize("world,tokens,pays", [(2, 128, False), (2, 256, True), (4, 32, False), (4, 128, True),
                                                (8, 128, True), (1, 4096, False)])
def test_auto_overlap_threshold(world, tokens, pays):
    """overlap="auto" at the DeepSeek-V3 shape (hidden 7168, top-8): overlap where the measured rows gained
    (cross-rank combine bytes >= 8 MB a rank), not where they lost; never on one rank, the NCCL backend or
    with an FP8 combine payload the sender has to cast (it may where the L2 GEMM writes it)."""
    from types import SimpleNamespace
    comm = SimpleNamespace(topk=8, world_size=world, hidden=7168, backend="symm", combine_payload="bf16")
    assert MoELayer.overlap_pays(SimpleNamespace(comm=comm, l2_writes_payload=False), tokens) is pays
    comm.combine_payload = "fp8"       # the combine sender casts the rows: never
    assert MoELayer.overlap_pays(SimpleNamespace(comm=comm, l2_writes_payload=False), tokens) is False
    assert MoELayer.overlap_pays(SimpleNamespace(comm=comm, l2_writes_payload=True), tokens) is pays
    comm.backend, comm.combine_payload = "nccl", "bf16"
    assert MoELayer.overlap_pays(SimpleNamespace(comm=comm, l2_writes_payload=False), tokens) is False


# --------------------------------------------------------------------------------------------
# Contiguous (prefill) form in a simulated world
# --------------------------------------------------------------------------------------------

def _check_contiguous_layout(comm, idxs, tokens_max, topk):
    """m_indices / segment starts / block_valid / routing words / rows against the routing."""
    A, R, L, r = comm.alignment, comm.contig_rows, comm.num_local_experts, comm.rank
    cnt = comm.masked_m.tolist()
    starts = comm.segment_starts.tolist()
    want_idx = torch.full((R,), -1, dtype=torch.int32)
    pos = 0
    for le in range(L):
        assert starts[le] == pos and pos % A == 0, (starts, cnt)
        want_idx[pos:pos + cnt[le]] = le
        pos += -(-cnt[le] // A) * A
    assert torch.equal(comm.m_indices, want_idx)
    assert torch.equal(comm.block_valid, (want_idx.view(-1, A) >= 0).sum(1).to(torch.int32))
    for le in range(L):
        e = r * L + le
        words = comm.crecv_src_info[starts[le]:starts[le] + cnt[le]].tolist()
        want = sorted(s * tokens_max * topk + t * topk + k for s in range(len(idxs))
                      for t, k in (idxs[s] == e).nonzero().tolist())
        assert sorted(words) == want


def _run_contiguous(layers, w13, w2, idxs, tokens, gen, tokens_max, payload="bf16"):
    world = len(layers)
    xs = [torch.randn(tokens, H, generator=gen).bfloat16() for _ in range(world)]
    ws = [torch.rand(tokens, idxs[0].shape[1], generator=gen) for _ in range(world)]
    before = [layer.comm.cumulative_local_expert_recv_stats.clone() for layer in layers]
    for layer in layers:                                 # sentinels: padding rows must stay untouched
        layer.c_h1.fill_(float("nan"))
        layer.c_out2.fill_(float("nan"))
        layer.c_a2.view(torch.uint8).fill_(0x55)
        layer.c_a2_sf.fill_(float("nan"))
    ys = run_simulated(layers, xs, idxs, ws, layout="contiguous")
    counts = RL.dispatch_counts_reference(idxs, w13[0].shape[0], world)
    for r, layer in enumerate(layers):
        c = layer.comm
        assert torch.equal(c.masked_m, counts[r]), (r, c.masked_m, counts[r])
        assert torch.equal(c.cumulative_local_expert_recv_stats - before[r], counts[r])
        _check_contiguous_layout(c, idxs, tokens_max, idxs[0].shape[1])
        pad, val = c.m_indices < 0, c.m_indices >= 0
        assert layer.c_h1[pad].isnan().all() and layer.c_out2[pad].isnan().all()
        assert torch.all(layer.c_a2[pad].view(torch.uint8) == 0x55) and layer.c_a2_sf[pad].isnan().all()
        assert not layer.c_out2[val].isnan().any()
        ref = RL.moe_layer_reference(xs[r], idxs[r], ws[r], w13, w2, dispatch_payload=c.dispatch_payload,
                                     combine_payload=payload)
        assert ys[r].shape == ref.shape and ys[r].dtype == torch.bfloat16 and not ys[r].isnan().any()
        diff = testing.calc_diff(ys[r], ref)
        assert diff < 1e-3, (r, diff)
        assert torch.all(ys[r][~(idxs[r] >= 0).any(dim=1)] == 0)
    return ys


@pytest.mark.parametrize("world,num_experts,topk,overlap", [(2, 4, 2, True), (4, 8, 3, False)])
def test_layer_fp4_dispatch_payload(world, num_experts, topk, overlap):
    """The layer with the FP4 dispatch payload (E2M1 codes + UE8M0 bytes a 32 columns, taken by the grouped
    GEMMs as FP4 activations), masked and contiguous, against the reference with the same payload; the
    FP8-payload reference is measurably further away (the payload really is FP4)."""
    gen = torch.Generator().manual_seed(13)
    layers, w13, w2 = _world(world, num_experts, 6, topk, dispatch_payload="fp4", contiguous=True)
    idxs = _routing("random", world, 5, num_experts, topk, gen)
    idxs[0][1, 1] = -1
    xs = _check_layer(layers, w13, w2, idxs, 5, overlap, gen)
    assert layers[0].comm.recv_x.dtype == torch.uint8 and layers[0].comm.recv_x.shape[-1] == H // 2
    ws = [torch.rand(5, topk, generator=gen) for _ in range(world)]
    ys = run_simulated(layers, xs, idxs, ws, overlap=overlap)
    y4 = RL.moe_layer_reference(xs[0], idxs[0], ws[0], w13, w2, dispatch_payload="fp4")
    y8 = RL.moe_layer_reference(xs[0], idxs[0], ws[0], w13, w2)
    assert testing.calc_diff(ys[0], y4) < 1e-3 < testing.calc_diff(ys[0], y8)
    idxs = _routing("random", world, 5, num_experts, topk, gen)
    _run_contiguous(layers, w13, w2, idxs, 5, gen, 6)


@pytest.mark.parametrize("kind", ["random", "one_expert", "sparse"])
def test_layer_contiguous(kind):
    gen = torch.Generator().manual_seed(21)
    world, num_experts, topk, tmax = 2, 4, 2, 8
    layers, w13, w2 = _world(world, num_experts, tmax, topk, contiguous=True)
    assert layers[0].comm.contig_rows == 3 * runtime.get_mk_alignment_for_contiguous_layout() or \
        runtime.get_mk_alignment_for_contiguous_layout() != 128
    idxs = _routing(kind, world, 7, num_experts, topk, gen)
    if kind == "random":
        idxs[0][1, 1] = -1
        idxs[1][2, :] = -1
    _run_contiguous(layers, w13, w2, idxs, 7, gen, tmax)
    if kind == "one_expert":                             # 14 rows for expert 1, nothing for the others
        assert layers[0].comm.masked_m.tolist() == [0, 14] and layers[1].comm.masked_m.tolist() == [0, 0]
        assert layers[1].comm.m_indices.eq(-1).all()
    if kind == "random":
        # a second call through the same buffers (count and arrival flags were consumed), then the
        # masked form through the same communicator
        idxs = _routing("remote", world, 5, num_experts, topk, gen)
        _run_contiguous(layers, w13, w2, idxs, 5, gen, tmax)
        idxs = _routing("random", world, 4, num_experts, topk, gen)
        _check_layer(layers, w13, w2, idxs, 4, True, gen)


def test_contiguous_capacity_overflow_is_an_error():
    a = runtime.get_mk_alignment_for_contiguous_layout()
    comms = make_simulated_world(1, num_experts=2, max_tokens_per_rank=6, topk=1, hidden=H, contiguous=True,
                                 contiguous_rows=a, max_spin_iters=50)
    xq, xsf = R.per_token_cast_to_fp8(torch.randn(6, H))
    out = comms[0].dispatch_contiguous(xq, xsf, torch.tensor([[0], [1], [1], [1], [1], [1]]))
    assert out.masked_m.tolist() == [1, 0] and out.m_indices[:2].tolist() == [0, -1]
    with pytest.raises(RuntimeError, match=rf"local expert 1 .* ends at row {a + 5}, beyond the contiguous "
                                           rf"capacity of {a} rows"):
        comms[0].check()


def test_contiguous_peer_that_never_sends_counts_times_out():
    gen = torch.Generator().manual_seed(1)
    comms = make_simulated_world(2, num_experts=4, max_tokens_per_rank=4, topk=2, hidden=H, max_spin_iters=50,
                                 contiguous=True)
    idx = _routing("random", 2, 3, 4, 2, gen)[0]
    xq, xsf = R.per_token_cast_to_fp8(torch.randn(3, H))
    comms[0].dispatch_contiguous(xq, xsf, idx)           # rank 1 deliberately skips its counts and rows
    with pytest.raises(RuntimeError, match=r"rank 0/2: dispatch \(contiguous\): timed out waiting for the token "
                                           r"counts of rank 1 \(owner of experts 2\.\.3\)"):
        comms[0].check()


def test_contiguous_validation():
    layers, w13, w2 = _world(2, 4, 4, 2)
    x, idx, w = torch.randn(3, H).bfloat16(), torch.zeros(3, 2, dtype=torch.int64), torch.rand(3, 2)
    with pytest.raises(ValueError, match="needs an EPCommunicator created with contiguous=True"):
        layers[0].forward(x, idx, w, layout="contiguous")
    with pytest.raises(ValueError, match="layout must be 'masked' or 'contiguous'"):
        layers[0].forward(x, idx, w, layout="ragged")
    with pytest.raises(ValueError, match="must be a multiple of the contiguous-layout alignment"):
        make_simulated_world(1, num_experts=2, max_tokens_per_rank=4, topk=1, hidden=H, contiguous=True,
                             contiguous_rows=100)
    with pytest.raises(ValueError, match="contiguous_rows needs contiguous=True"):
        make_simulated_world(1, num_experts=2, max_tokens_per_rank=4, topk=1, hidden=H, contiguous_rows=128)
    comm = make_simulated_world(1, num_experts=2, max_tokens_per_rank=4, topk=1, hidden=H, contiguous=True)[0]
    old = runtime.get_mk_alignment_for_contiguous_layout()
    runtime.set_mk_alignment_for_contiguous_layout(64 if old == 128 else 128)
    try:
        with pytest.raises(ValueError, match="create it after setting the alignment"):
            comm.dispatch_contiguous(*R.per_token_cast_to_fp8(torch.randn(2, H)), torch.zeros(2, 1, dtype=torch.int64))
    finally:
        runtime.set_mk_alignment_for_contiguous_layout(old)
    with pytest.raises(ValueError, match="expert_out must have shape"):
        comm.combine_contiguous_send(torch.zeros(3, H, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------
# NCCL path (all_to_all_single) over gloo, 2 processes
# --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world, port, kind, out_dir):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        num_experts, topk, tokens = 4, 2, 5
        gen = torch.Generator().manual_seed(11)
        w13, w2 = make_moe_weights(num_experts, H, I, seed=2)
        idxs = _routing(kind, world, tokens, num_experts, topk, gen)
        idxs[1][0, :] = -1
        xs = [torch.randn(tokens, H, generator=gen).bfloat16() for _ in range(world)]
        ws = [torch.rand(tokens, topk, generator=gen) for _ in range(world)]
        comm = EPCommunicator(dist.group.WORLD, num_experts=num_experts, max_tokens_per_rank=8, topk=topk,
                              hidden=H, backend="nccl", device="cpu", contiguous=True)
        L = comm.num_local_experts
        layer = MoELayer(comm, _local(w13, rank, L), _local(w2, rank, L), num_comm_sms=2)
        ref = RL.moe_layer_reference(xs[rank], idxs[rank], ws[rank], w13, w2)
        counts = RL.dispatch_counts_reference(idxs, num_experts, world)[rank]
        res = {}
        for layout in ("masked", "contiguous"):
            y = layer.forward(xs[rank], idxs[rank], ws[rank], overlap=True, layout=layout)   # overlap: off
            res[layout] = {"diff": testing.calc_diff(y, ref), "masked_m": comm.masked_m.clone(), "counts": counts,
                           "nan": bool(y.isnan().any())}
        a = comm.alignment
        res["contiguous"]["m_indices_ok"] = bool(
            (comm.m_indices[comm.m_indices >= 0].bincount(minlength=L).int() == counts).all()
            and (comm.segment_starts % a == 0).all() and comm.m_indices.numel() == comm.contig_rows)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["random", "remote"])
def test_nccl_path_over_gloo(kind, tmp_path):
    """gloo implements all_to_all_single (with unequal splits) on CPU tensors, so the collective path
    runs here exactly as it does over NCCL (byte payloads, no FP8/BF16 dtypes on the wire)."""
    import torch.multiprocessing as mp
    mp.spawn(_gloo_worker, args=(2, _free_port(), kind, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        both = torch.load(tmp_path / f"rank{r}.pt")
        assert both["contiguous"]["m_indices_ok"]
        for layout, res in both.items():
            assert not res["nan"], layout
            assert torch.equal(res["masked_m"], res["counts"]), layout
            assert res["diff"] < 1e-3, (layout, res["diff"])


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90a (the interpreter is lenient: this catches what only the compiler sees)
# --------------------------------------------------------------------------------------------

_I32, _I64 = "i32", "i64"
_AOT = {
    "dispatch_send_kernel": (
        {"xq_ptr": "*u8", "xsf_ptr": "*fp32", "idx_ptr": "*i64", "tab_ptr": "*i64", "done_ptr": "*i32",
         "T": _I32, "rank": _I32, "num_experts": _I32, "stride_xq": _I32, "stride_xsf": _I32, "stride_it": _I32,
         "stride_ik": _I32, "OFF_X": _I64, "OFF_SF": _I64, "OFF_META": _I64, "OFF_CNT": _I64, "OFF_DFLAG": _I64,
         "MAX_M": _I32, "TMAX": _I32},
        {"H": 7168, "SFH": 56, "TOPK": 8, "L": 128, "W": 2, "BLOCK_R": 16, "BLOCK_H": 1024, "BLOCK_SF": 64,
         "stride_ik": 1},
        ["xq_ptr", "stride_xq"], "STG.E.128"),
    "dispatch_recv_kernel": (
        {"buf_ptr": "*u8", "err_ptr": "*i32", "masked_m_ptr": "*i32", "stats_ptr": "*i32", "OFF_CNT": _I64,
         "OFF_DFLAG": _I64, "MAX_M": _I32, "max_iters": _I32, "timeout_ns": _I64},
        {"W": 2, "L": 128, "BLOCK_L": 128, "USE_TIMER": True}, [], "globaltimer"),
    "combine_send_kernel": (
        {"d_ptr": "*bf16", "buf_ptr": "*u8", "tab_ptr": "*i64", "masked_m_ptr": "*i32", "signal_ptr": "*i32",
         "err_ptr": "*i32", "done_ptr": "*i32", "rank": _I32, "stride_dg": _I32, "stride_dm": _I32,
         "OFF_META": _I64, "OFF_RECV": _I64, "OFF_CFLAG": _I64, "MAX_M": _I32, "TMAX": _I32, "block_m": _I32,
         "threshold": _I32, "nb": _I32, "parts": _I32, "g_lo": _I32, "g_hi": _I32, "arrive_total": _I32,
         "max_iters": _I32, "timeout_ns": _I64},
        {"H": 7168, "TOPK": 8, "L": 128, "W": 2, "ROWS": 16, "BLOCK_H": 1024, "BLOCK_L": 128, "WAIT_SIGNAL": True,
         "USE_TIMER": True},
        ["d_ptr", "stride_dg", "stride_dm"], "STG.E.128"),
    "combine_recv_kernel": (
        {"buf_ptr": "*u8", "err_ptr": "*i32", "OFF_CFLAG": _I64, "max_iters": _I32, "timeout_ns": _I64},
        {"W": 2, "USE_TIMER": True}, [], None),
    "signal_all_kernel": (
        {"tab_ptr": "*i64", "rank": _I32, "OFF_FLAG": _I64}, {"W": 4}, [], "atom.global.sys.release.add"),
    "combine_reduce_kernel": (
        {"recv_ptr": "*bf16", "idx_ptr": "*i64", "w_ptr": "*fp32", "out_ptr": "*bf16", "num_experts": _I32,
         "stride_rt": _I32, "stride_rk": _I32, "stride_it": _I32, "stride_ik": _I32, "stride_wt": _I32,
         "stride_wk": _I32, "stride_ot": _I32},
        {"H": 7168, "TOPK": 8, "BLOCK_H": 1024, "stride_ik": 1, "stride_wk": 1},
        ["recv_ptr", "out_ptr", "stride_rt", "stride_rk", "stride_ot"], None),
}


# the senders' tiles at the DeepSeek-V3 shape run with 8 warps (EPCommunicator._dispatch_tiles / _combine_tiles)
_SEND_WARPS = {"dispatch_send_kernel": 8, "combine_send_kernel": 8, "dispatch_send_contig_kernel": 8}


@pytest.mark.parametrize("kernel", sorted(_AOT))
def test_ep_kernels_compile_for_sm90(kernel):
    sig, consts, div16, must = _AOT[kernel]
    from fp8gemm.testing import compile_sm90_in_subprocess
    r = compile_sm90_in_subprocess("fp8gemm.kernels.ep_comm", kernel, sig, consts, divisible_by_16=div16,
                                   num_warps=_SEND_WARPS.get(kernel, 4))
    assert r["local"] == 0 and r["stack"] == 0, r
    if must:
        assert must in r["sass"] or must in r["ptx"], f"{must} missing"


def test_combine_send_trace_compiles_for_sm90():
    """The benchmark-only per-item timer stamps of the combine sender (EPCommunicator.combine_trace): the
    global timer read and two int64 stores, no local memory."""
    from fp8gemm.testing import compile_sm90_in_subprocess
    sig, consts, div16, _ = _AOT["combine_send_kernel"]
    r = compile_sm90_in_subprocess("fp8gemm.kernels.ep_comm", "combine_send_kernel",
                                   dict(sig, trace_ptr="*i64", trace_base=_I32), dict(consts, TRACE=True),
                                   divisible_by_16=div16, num_warps=8)
    plain = compile_sm90_in_subprocess("fp8gemm.kernels.ep_comm", "combine_send_kernel", sig,
                                       dict(consts, TRACE=False), divisible_by_16=div16, num_warps=8)
    assert r["local"] == 0 and r["stack"] == 0, r
    assert r["ptx"].count("globaltimer") >= plain["ptx"].count("globaltimer") + 2


@pytest.mark.parametrize("rows,block_h", [(16, 1024), (1, 8192)])
def test_combine_send_fp8_payload_compiles_for_sm90(rows, block_h):
    """The combine sender with the FP8 payload at the DeepSeek-V3 tiles (16 rows x 1024, one row x the whole
    hidden): the hardware E4M3 conversion, 16-byte code stores, byte stores of the scales, no local memory.
    With ``PRECAST`` (the payload the L2 GEMM wrote, copied as it is): no conversion at all."""
    from fp8gemm.testing import compile_sm90_in_subprocess
    sig, consts, div16, _ = _AOT["combine_send_kernel"]
    r = compile_sm90_in_subprocess("fp8gemm.kernels.ep_comm", "combine_send_kernel", dict(sig, OFF_RSF=_I64),
                                   dict(consts, FP8=True, SOFT=False, ROWS=rows, BLOCK_H=block_h),
                                   divisible_by_16=div16, num_warps=8)
    assert r["local"] == 0 and r["stack"] == 0, r
    assert "e4m3" in r["ptx"] and "STG.E.128" in r["sass"] and "STG.E.U8" in r["sass"]
    pre = compile_sm90_in_subprocess("fp8gemm.kernels.ep_comm", "combine_send_kernel",
                                     dict(sig, d_ptr="*u8", OFF_RSF=_I64, dsf_ptr="*u8", stride_sg=_I32,
                                          stride_sm=_I32),
                                     dict(consts, FP8=True, SOFT=False, PRECAST=True, BLOCK_SG=64, ROWS=rows,
                                          BLOCK_H=2 * block_h), divisible_by_16=div16, num_warps=8)
    assert pre["local"] == 0 and pre["stack"] == 0, pre
    assert "e4m3" not in pre["ptx"] and "STG.E.128" in pre["sass"] and "STG.E.U8" in pre["sass"]


@pytest.mark.parametrize("kernel", ["combine_recv_kernel", "combine_reduce_kernel"])
def test_combine_recv_trace_compiles_for_sm90(kernel):
    """The benchmark-only stamps of the receive side (EPCommunicator.recv_trace): the arrival wait's start and
    end, the reduce's start (one program) and end (an int64 atomic max), no local memory; off, no timer read
    beyond the spin's own."""
    from fp8gemm.testing import compile_sm90_in_subprocess
    sig, consts, div16, _ = _AOT[kernel]
    r = compile_sm90_in_subprocess("fp8gemm.kernels.ep_comm", kernel, dict(sig, trace_ptr="*i64"),
                                   dict(consts, TRACE=True), divisible_by_16=div16)
    plain = compile_sm90_in_subprocess("fp8gemm.kernels.ep_comm", kernel, sig, dict(consts, TRACE=False),
                                       divisible_by_16=div16)
    assert r["local"] == 0 and r["stack"] == 0, r
    assert r["ptx"].count("globaltimer") >= plain["ptx"].count("globaltimer") + 2
    if kernel == "combine_reduce_kernel":
        assert "atom.global" in r["ptx"] and ".max.s64" in r["ptx"]
        assert "globaltimer" not in plain["ptx"]


_AOT_CONTIG = {
    "dispatch_count_kernel": (
        {"idx_ptr": "*i64", "cnt_ptr": "*i32", "slot_ptr": "*i32", "tab_ptr": "*i64", "done_ptr": "*i32",
         "T": _I32, "rank": _I32, "num_experts": _I32, "stride_it": _I32, "stride_ik": _I32,
         "OFF_CCNT": _I64, "OFF_AFLAG": _I64},
        {"TOPK": 8, "E": 256, "W": 8, "BLOCK_E": 256, "BLOCK_R": 128, "stride_ik": 1}, [], None),
    "contig_layout_kernel": (
        {"buf_ptr": "*u8", "err_ptr": "*i32", "send_base_ptr": "*i32", "masked_m_ptr": "*i32", "stats_ptr": "*i32",
         "seg_ptr": "*i32", "rank": _I32, "R": _I32, "ALIGN": _I32, "max_iters": _I32, "timeout_ns": _I64,
         "OFF_CCNT": _I64, "OFF_AFLAG": _I64},
        {"E": 256, "L": 32, "W": 8, "BLOCK_E": 256, "BLOCK_W": 8, "USE_TIMER": True}, [], "globaltimer"),
    "contig_index_kernel": (
        {"seg_ptr": "*i32", "masked_m_ptr": "*i32", "m_idx_ptr": "*i32", "block_valid_ptr": "*i32", "ALIGN": _I32},
        {"L": 32, "BLOCK_L": 32, "BLOCK_A": 128}, [], None),
    "dispatch_send_contig_kernel": (
        {"xq_ptr": "*u8", "xsf_ptr": "*fp32", "idx_ptr": "*i64", "slot_ptr": "*i32", "send_base_ptr": "*i32",
         "tab_ptr": "*i64", "done_ptr": "*i32", "T": _I32, "rank": _I32, "num_experts": _I32, "stride_xq": _I32,
         "stride_xsf": _I32, "stride_it": _I32, "stride_ik": _I32, "OFF_X": _I64, "OFF_SF": _I64,
         "OFF_META": _I64, "OFF_DFLAG": _I64, "R": _I32, "TMAX": _I32},
        {"H": 7168, "SFH": 56, "TOPK": 8, "L": 32, "W": 8, "BLOCK_R": 16, "BLOCK_H": 1024, "BLOCK_SF": 64,
         "stride_ik": 1},
        ["xq_ptr", "stride_xq"], "STG.E.128"),
    "wait_arrivals_kernel": (
        {"buf_ptr": "*u8", "err_ptr": "*i32", "OFF_FLAG": _I64, "code": _I32, "max_iters": _I32,
         "timeout_ns": _I64},
        {"W": 8, "USE_TIMER": True}, [], "globaltimer"),
}


def test_contiguous_ep_kernels_compile_for_sm90():
    """Every kernel of the contiguous form, in one subprocess (one interpreter start for all)."""
    import json
    code = ("import json,sys\n"
            "from fp8gemm.testing import compile_sm90\n"
            "from fp8gemm.kernels import ep_comm\n"
            f"out={{}}\nwarps={_SEND_WARPS!r}\n"
            "for name,(sig,consts,div16,must) in json.loads(sys.stdin.read()).items():\n"
            "    r=compile_sm90(getattr(ep_comm,name),sig,consts,divisible_by_16=div16,num_warps=warps.get(name,4))\n"
            "    out[name]={'local':r['local'],'stack':r['stack'],'has':(must is None) or must in r['sass'] or must in r['ptx']}\n"
            "sys.stdout.write('@@JSON@@'+json.dumps(out))\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(_AOT_CONTIG), capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0 and "@@JSON@@" in proc.stdout, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("@@JSON@@", 1)[1])
    for name, r in res.items():
        assert r["local"] == 0 and r["stack"] == 0 and r["has"], (name, r)


def test_swiglu_kernel_compiles_for_sm90():
    from fp8gemm.testing import compile_sm90_in_subprocess
    sig = {"h_ptr": "*bf16", "q_ptr": "*u8", "sf_ptr": "*fp32", "masked_m_ptr": "*i32", "max_m": _I32,
           "stride_hg": _I32, "stride_hm": _I32, "stride_qg": _I32, "stride_qm": _I32, "stride_sg": _I32,
           "stride_sm": _I32, "stride_sc": _I32}
    r = compile_sm90_in_subprocess("fp8gemm.kernels.swiglu", "swiglu_quant_kernel", sig,
                                   {"INTER": 2048, "ROWS": 4, "SPLIT": 8, "USE_UE8M0": False, "SOFT_CVT": False},
                                   divisible_by_16=["h_ptr", "q_ptr", "stride_hg", "stride_hm", "stride_qg",
                                                    "stride_qm"])
    assert r["local"] == 0 and r["stack"] == 0, r
