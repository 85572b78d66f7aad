"""The row-block senders of the EP dispatch / combine (``fp8gemm.kernels.ep_comm``) in a simulated world:
many row blocks per program (persistent grid of 1..3 programs), row counts that are not a multiple of the
block, a hidden size that is not a multiple of the column tile, m-blocks smaller and larger than the row
tile; every byte that must be written is, and nothing else (poisoned rows and receive slots stay as
they were).  Also the tile heuristic at the DeepSeek-V3 shape."""
import pytest
import torch

from fp8gemm import reference as R
from fp8gemm.moe.ep import EPCommunicator, make_simulated_world, send_tile

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (interpreter) tests")

H = 384         # 3 x 128: not a multiple of the 256-column tiles forced below


def _routing(world, tokens, num_experts, topk, gen, local_pairs=True):
    idxs = []
    for _ in range(world):
        idx = torch.stack([torch.randperm(num_experts, generator=gen)[:topk] for _ in range(tokens)])
        idx[1, -1] = -1                                   # a skipped slot
        if tokens > 3:
            idx[3, :] = -1                                # a token without any expert
        if local_pairs:                                   # a token with two experts on the same owner
            idx[0, 0], idx[0, 1] = 0, 1
        idxs.append(idx.to(torch.int64))
    return idxs


def _world(world, num_experts, tokens_max, topk, num_sms, tile, **kw):
    comms = make_simulated_world(world, num_experts=num_experts, max_tokens_per_rank=tokens_max, topk=topk,
                                 hidden=H, max_spin_iters=200, num_sms=num_sms, **kw)
    for c in comms:
        c.tile_override = tile
    return comms


def _cast(x, payload):
    if payload == "fp4":
        return R.per_token_cast_to_fp4(x, True, 32, ue8m0_bytes=True)
    return R.per_token_cast_to_fp8(x)


def _dispatch(comms, idxs, gen):
    tokens = idxs[0].shape[0]
    qs = [_cast(torch.randn(tokens, H, generator=gen), comms[0].dispatch_payload) for _ in comms]
    for c in comms:
        o, n = c.layout.sections()["x"]
        c.region[o:o + n].fill_(0x55)                    # the whole section (FP4 rows use its first half)
        c.recv_x_sf.view(torch.uint8).fill_(0xAA)
        c.recv_src_info.fill_(-7)
    for c, (xq, xsf), idx in zip(comms, qs, idxs):
        c.dispatch_send(xq, xsf, idx)
    outs = [c.dispatch_recv() for c in comms]
    for c in comms:
        c.check()
    return qs, outs


def _check_dispatch(comms, idxs, qs, outs):
    world, topk = len(comms), idxs[0].shape[1]
    tmax, L = comms[0].max_tokens, comms[0].num_local_experts
    for r, out in enumerate(outs):
        for le in range(L):
            e = r * L + le
            m = int(out.masked_m[le])
            want = sorted(s * tmax * topk + t * topk + k for s in range(world)
                          for t, k in (idxs[s] == e).nonzero().tolist())
            assert m == len(want), (r, le, m, len(want))
            assert sorted(out.recv_src_info[le, :m].tolist()) == want
            for j, word in enumerate(out.recv_src_info[le, :m].tolist()):
                s, rest = divmod(word, tmax * topk)
                t = rest // topk
                assert torch.equal(out.recv_x[le, j].view(torch.uint8), qs[s][0][t].view(torch.uint8)), (r, le, j)
                assert torch.equal(out.recv_x_sf[le, j].view(torch.uint8), qs[s][1][t].view(torch.uint8))
            # rows past masked_m were not touched (a store past the end of a row would land there)
            assert torch.all(out.recv_x[le, m:].view(torch.uint8) == 0x55)
            assert torch.all(out.recv_x_sf[le, m:].view(torch.uint8) == 0xAA)
            assert torch.all(out.recv_src_info[le, m:] == -7)
    if comms[0].dispatch_payload == "fp4":      # the FP4 rows fill the first half of the FP8 form's bytes only
        for c in comms:
            o, n = c.offsets["x"], c.recv_x.numel()
            assert torch.all(c.region[o + n:o + 2 * n] == 0x55)


@pytest.mark.parametrize("num_sms,tile", [(1, (4, 256)), (3, (2, 128)), (2, (8, 512)), (3, None)])
@pytest.mark.parametrize("payload", ["fp8", "fp4"])
def test_dispatch_row_blocks(num_sms, tile, payload):
    """5 tokens x top-3 = 15 rows: blocks of 2/4/8 rows (the last one partial), 1..3 programs each
    looping over several blocks; 384 columns in 256-column tiles (the second tile half masked).  FP4
    payload: 192-byte rows of codes and 12 scale bytes, moved byte for byte."""
    gen = torch.Generator().manual_seed(2)
    comms = _world(2, 6, 6, 3, num_sms, tile, dispatch_payload=payload)
    idxs = _routing(2, 5, 6, 3, gen)
    qs, outs = _dispatch(comms, idxs, gen)
    _check_dispatch(comms, idxs, qs, outs)
    # again through the same buffers (counters and flags consumed), another batch size
    idxs = _routing(2, 4, 6, 3, gen)
    qs, outs = _dispatch(comms, idxs, gen)
    _check_dispatch(comms, idxs, qs, outs)


@pytest.mark.parametrize("block_m,tile,num_sms", [(2, (4, 256), 1), (8, (2, 256), 3), (3, (1, 512), 2),
                                                  (4, None, 3)])
@pytest.mark.parametrize("overlap", [False, True])
def test_combine_row_blocks(block_m, tile, num_sms, overlap, split=None, payload="bf16"):
    """The combine sender with m-blocks smaller than, equal to and larger than its row tile (several
    row iterations per block, a partial last one), units spread over 1..3 programs, SBO counters
    waited on and consumed; every received slot holds its row, every other slot stays poisoned.
    ``split`` = ``(parts, programs)``: the combine as two launches (local expert 0 on ``num_sms`` programs,
    expert 1 cut into ``parts`` row ranges on ``programs`` programs), one arrival for both.  ``payload="fp8"``:
    every received slot holds the FP8 combine payload of its row, byte for byte (codes and scale bytes)."""
    gen = torch.Generator().manual_seed(4)
    world, num_experts, topk, tokens = 2, 4, 3, 6
    comms = _world(world, num_experts, tokens, topk, num_sms, tile,
                   combine_payload="fp8" if payload.startswith("fp8") else payload)
    idxs = _routing(world, tokens, num_experts, topk, gen)
    qs, outs = _dispatch(comms, idxs, gen)
    L, M = comms[0].num_local_experts, comms[0].max_m
    nb = -(-M // block_m)
    outs_e = [torch.randn(L, M, H, generator=gen).bfloat16() for _ in comms]
    pre = [R.quantize_combine_payload(e) for e in outs_e] if payload == "fp8pre" else None
    signals = []
    for c, out in zip(comms, outs):
        sig = torch.zeros(L * nb, dtype=torch.int32)
        for g, m in enumerate(out.masked_m.tolist()):
            sig[g * nb:g * nb + -(-m // block_m)] = 2            # what the GEMM leaves: threshold per block
        signals.append(sig)
        c.combine_recv_buf.fill_(float("nan"))
        c.combine_recv_sf.fill_(0xAA)
    for r_, (c, e, sig) in enumerate(zip(comms, outs_e, signals)):
        kw = dict(signal=sig, block_m=block_m, threshold=2) if overlap else {}
        if pre is not None:                         # the payload as the L2 GEMM writes it: copied as it is
            e, kw["expert_out_sf"] = pre[r_]
        if split is None:
            c.combine_send(e, num_sms=num_sms, **kw)
        else:
            parts, programs = split
            total = c.combine_programs(num_sms, 1, block_m if overlap else 64) + \
                c.combine_programs(programs, L - 1, block_m if overlap else 64, parts)
            c.combine_send(e, num_sms=num_sms, experts=(0, 1), arrive_total=total, **kw)
            c.combine_send(e, num_sms=programs, experts=(1, L), parts=parts, arrive_total=total, **kw)
    ws = [torch.rand(tokens, topk, generator=gen) for _ in comms]
    ys = [c.combine_recv(idx, w) for c, idx, w in zip(comms, idxs, ws)]
    for c in comms:
        c.check()
    if overlap:
        assert all(int(s.abs().sum()) == 0 for s in signals)     # consumed counters are zeroed
    for c in comms:                                              # one arrival per peer, all consumed
        o = c.offsets["cflag"]
        assert int(c.region[o:o + 4 * world].view(torch.int32).abs().sum()) == 0
        assert int(c.done.abs().sum()) == 0                      # the grid-completion counters reset
    tmax = comms[0].max_tokens
    for s, c in enumerate(comms):
        if payload.startswith("fp8"):
            _check_fp8_payload(c, s, outs, outs_e, idxs[s], ws[s], ys[s], tokens, num_experts)
            continue
        buf = c.combine_recv_buf
        got = torch.zeros(tokens, topk, dtype=torch.bool)
        for t, k, row in _rows_returned_to(s, outs, outs_e, tmax, topk):
            assert torch.equal(buf[t, k].view(torch.int16), row.view(torch.int16)), (s, t, k)
            got[t, k] = True
        assert torch.equal(got, idxs[s] >= 0)
        assert buf[:tokens][~got].isnan().all() and buf[tokens:].isnan().all()
        ref = R.combine_reduce_reference(torch.nan_to_num(buf[:tokens]), idxs[s], ws[s], num_experts)
        # one BF16 ulp: Triton's interpreter truncates the FP32 -> BF16 cast (the GPU rounds to nearest)
        torch.testing.assert_close(ys[s], ref, rtol=2 ** -7, atol=1e-30)


def _rows_returned_to(s, outs, outs_e, tmax, topk):
    """(token, k, expert output row) of every row the combine sends back to rank ``s``, found through the
    routing words every rank's dispatch left."""
    for r, out in enumerate(outs):
        for le in range(out.masked_m.numel()):
            for j, word in enumerate(out.recv_src_info[le, :int(out.masked_m[le])].tolist()):
                src, rest = divmod(word, tmax * topk)
                if src == s:
                    yield (*divmod(rest, topk), outs_e[r][le, j])


def _check_fp8_payload(c, s, outs, outs_e, idx, w, y, tokens, num_experts):
    """Rank ``s``'s receive slots hold the FP8 payload of the rows sent to it (the rest poisoned) and its
    reduce equals the reference's on them, bit for bit."""
    codes, sf = c.combine_recv_codes.view(torch.uint8), c.combine_recv_sf
    got = torch.zeros(tokens, c.topk, dtype=torch.bool)
    for t, k, row in _rows_returned_to(s, outs, outs_e, c.max_tokens, c.topk):
        q, b = R.quantize_combine_payload(row[None])
        assert torch.equal(codes[t, k], q[0].view(torch.uint8)), (s, t, k)
        assert torch.equal(sf[t, k], b[0]), (s, t, k)
        got[t, k] = True
    assert torch.equal(got, idx >= 0)
    assert (sf[:tokens][~got] == 0xAA).all() and (sf[tokens:] == 0xAA).all()
    ref = R.combine_reduce(c.combine_recv_codes[:tokens], sf[:tokens], w, torch.where(got, idx, -1))
    assert torch.equal(y.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("block_m,tile,num_sms,split", [(2, (4, 256), 1, None), (3, (1, 512), 2, None),
                                                        (8, (2, 256), 3, (3, 2)), (4, None, 3, None)])
def test_combine_fp8_payload(block_m, tile, num_sms, split):
    """The FP8 combine payload (``combine_payload="fp8"``): the sender casts each BF16 row as it stores it
    (tiles whose last scale group lies past the row, 1..4 groups a tile, one and two launches), or copies the
    payload the L2 GEMM wrote (``expert_out_sf``); codes, scale bytes and the reduce exact against the
    reference."""
    test_combine_row_blocks(block_m, tile, num_sms, True, split=split, payload="fp8")
    test_combine_row_blocks(block_m, tile, num_sms, False, payload="fp8")
    test_combine_row_blocks(block_m, tile, num_sms, True, split=split, payload="fp8pre")


@pytest.mark.parametrize("parts,programs", [(3, 2), (7, 5), (1, 1)])
def test_combine_split_over_two_launches(parts, programs):
    """The overlapped layer's combine as two launches (experts the GEMM finishes last sent by a second
    launch with their blocks cut into row ranges): parts with no rows, more parts than programs; every part
    spins, counts itself and the last one zeroes the counter; one arrival for both launches; rows exact."""
    test_combine_row_blocks(8, (2, 256), 3, True, split=(parts, programs))
    test_combine_row_blocks(3, (1, 512), 2, True, split=(parts, programs))
    test_combine_row_blocks(4, None, 3, False, split=(parts, programs))


def test_combine_send_rejects_bad_split():
    comms = _world(2, 4, 6, 3, 2, None)
    e = torch.zeros(comms[0].num_local_experts, comms[0].max_m, H).bfloat16()
    for bad, word in [(dict(experts=(1, 1)), "experts"), (dict(experts=(0, 3)), "experts"),
                      (dict(parts=0), "parts"), (dict(arrive_total=1, num_sms=2), "arrive_total")]:
        with pytest.raises(ValueError, match=word):
            comms[0].combine_send(e, **bad)


@pytest.mark.parametrize("tile", [(4, 256), (1, 128)])
def test_contiguous_row_blocks(tile):
    """The contiguous sender and the count kernel's row blocks: 7 tokens x top-3 on 1 program."""
    gen = torch.Generator().manual_seed(9)
    comms = _world(2, 4, 8, 3, 1, tile, contiguous=True)
    idxs = _routing(2, 7, 4, 3, gen)
    qs = [R.per_token_cast_to_fp8(torch.randn(7, H, generator=gen)) for _ in comms]
    for c in comms:
        c.crecv_x.view(torch.uint8).fill_(0x55)
    for c, (xq, xsf), idx in zip(comms, qs, idxs):
        c.dispatch_contiguous_counts(xq, xsf, idx)
    for c, (xq, xsf), idx in zip(comms, qs, idxs):
        c.dispatch_contiguous_send(xq, xsf, idx)
    outs = [c.dispatch_contiguous_recv() for c in comms]
    for c in comms:
        c.check()
    tmax, topk = 8, 3
    for r, out in enumerate(outs):
        valid = out.m_indices >= 0
        assert int(valid.sum()) == sum(int(((idx >= 2 * r) & (idx < 2 * r + 2)).sum()) for idx in idxs)
        for row in valid.nonzero().flatten().tolist():
            s, rest = divmod(int(out.recv_src_info[row]), tmax * topk)
            t = rest // topk
            assert torch.equal(out.recv_x[row].view(torch.uint8), qs[s][0][t].view(torch.uint8))
            assert torch.equal(out.recv_x_sf[row], qs[s][1][t])
        assert torch.all(out.recv_x[~valid].view(torch.uint8) == 0x55)


def test_tile_heuristic_deepseek_shape():
    """DeepSeek-V3 on 2 ranks, 132 SMs: 256 tokens move 16 rows x 1024 columns per dispatch program
    (128 programs), 8 tokens one whole row per program (64 programs); the combine moves 16 rows x 1024
    BF16 columns (32 KB) at 16 rows per m-block, one whole row (16 KB) at 1."""
    assert send_tile(16, 7168, 1) == (16, 1024)
    assert send_tile(1, 7168, 1) == (1, 8192)
    assert send_tile(5, 7168, 1) == (4, 4096)
    assert send_tile(64, 7168, 1) == (16, 1024)
    assert send_tile(16, 7168, 2, tile_bytes=32768) == (16, 1024)
    assert send_tile(1, 7168, 2, tile_bytes=32768) == (1, 8192)
    assert send_tile(16, 128, 2, tile_bytes=32768) == (16, 128)
    c = EPCommunicator(None, num_experts=256, max_tokens_per_rank=256, topk=8, hidden=7168, num_sms=132,
                       _simulated={"rank": 0, "world_size": 2, "region": torch.zeros(1, dtype=torch.uint8),
                                   "tab": torch.zeros(2, dtype=torch.int64)}, backend="nccl")
    assert c._dispatch_tiles(256) == (16, 1024, 8, 128)
    assert c._dispatch_tiles(8) == (1, 8192, 8, 64)
    c._last_tokens = 256
    assert c._expected_rows() == 16 and c._combine_tiles(16) == (16, 1024)
    c._last_tokens = 8
    assert c._expected_rows() == 1 and c._combine_tiles(1) == (1, 8192)


def test_trace_buffers_are_checked():
    """The benchmark-only stamp buffers (``combine_trace``, ``recv_trace``) are checked before any launch: dtype,
    shape and rows; in the interpreter (no global timer) a good one is accepted and the kernels run unstamped."""
    comms = _world(2, 4, 6, 3, 2, None)
    c = comms[0]
    e = torch.zeros(c.num_local_experts, c.max_m, H).bfloat16()
    idx = torch.zeros(6, 3, dtype=torch.int64)
    w = torch.ones(6, 3)
    for name, bad, word in [("combine_trace", torch.zeros(1, 2, dtype=torch.int64), "rows"),
                            ("combine_trace", torch.zeros(64, 2), "int64"),
                            ("recv_trace", torch.zeros(3, dtype=torch.int64), "rows"),
                            ("recv_trace", torch.zeros(4, 2, dtype=torch.int64), "int64")]:
        setattr(c, name, bad)
        with pytest.raises(ValueError, match=f"{name}.*{word}|{word}.*{name}|{name} holds"):
            c.combine_send(e) if name == "combine_trace" else c.combine_recv(idx, w)
        setattr(c, name, None)
    assert c._trace_args("combine_trace", 8) == {} and c._trace_args("recv_trace", 4) == {}
    c.combine_trace = torch.zeros(4096, 2, dtype=torch.int64)
    c.recv_trace = torch.zeros(4, dtype=torch.int64)
    assert c._trace_args("combine_trace", 8, trace_base=0) == {} and c._trace_args("recv_trace", 4) == {}
