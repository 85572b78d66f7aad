"""The SM-store kernel of ``benchmarks/p2p_store.py`` in a simulated world (one process, the "peer"
regions are plain tensors whose addresses go in the table, as in the EP communicator's CPU tests): rows
land in the right peer, section and slot for contiguous and scattered slots, one and several peers, tiles
of 1..4 rows with several tiles per program and a partial last tile, rows cut into several pieces (the last
one masked); the dispatch extras (claim atomics, scales and routing words) and the EP completion signal;
nothing outside the written rows changes; the benchmark's own checker agrees and catches a wrong byte.
On a GPU machine the same cases run compiled on one GPU (the "peers" are buffers of that GPU).  And the
sm_90a build (ahead of time, no GPU needed): every row load and store 16 bytes wide, no spills."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import p2p_store as P  # noqa: E402

ROW = 384           # three 128-byte scale groups; not a multiple of the 256- and 512-byte pieces below
N_ROWS = 11         # not a multiple of the tile rows


def _world(world, device, max_rows=N_ROWS):
    layout = P.RegionLayout(world, max_rows * ROW, ROW)
    regions = [torch.zeros(layout.total, dtype=torch.uint8, device=device) for _ in range(world)]
    tab = torch.tensor([r.data_ptr() for r in regions], dtype=torch.int64, device=device)
    return layout, regions, tab


def _send_all(cfg, layout, regions, tab, n_rows=N_ROWS, signal=False):
    """Every rank's launch, one after another (the interpreter runs one kernel at a time); returns each
    sender's (rows, side) and the buffers."""
    world, dev = len(regions), regions[0].device
    for r in regions:
        r[layout.data_off:].fill_(P.POISON)
    data, bufs = [], []
    for s in range(world):
        rows, side = P.make_rows(max(1, n_rows), cfg.row_bytes, s, 0, dev)      # sliced: never a null pointer
        rows, side = rows[:n_rows], side[:n_rows]
        npeers = max(1, world - 1) if cfg.all_peers else 1
        _, slot = P.row_destinations(n_rows, s, world, npeers, cfg.scatter)
        buf = P.StoreBuffers(rows, side, slot.to(torch.int32).to(dev), tab,
                             torch.zeros(1, dtype=torch.int32, device=dev), regions[s],
                             torch.zeros(4, dtype=torch.int32, device=dev))
        P.launch_store(cfg, buf, layout, s, world, signal=signal)
        data.append((rows, side))
        bufs.append(buf)
    return data, bufs


def _check_by_hand(cfg, layout, regions, data, n_rows=N_ROWS):
    """Row i of sender s: in rank (s + 1 + i % npeers) % world, section s, at its slot; the rest poisoned."""
    world = len(regions)
    npeers = max(1, world - 1) if cfg.all_peers else 1
    for s, (rows, side) in enumerate(data):
        _, slot = P.row_destinations(n_rows, s, world, npeers, cfg.scatter)
        if not cfg.scatter:
            assert slot.tolist() == [i // npeers for i in range(n_rows)]
        written = {r: set() for r in range(world)}
        for i in range(n_rows):
            d = (s + 1 + i % npeers) % world
            off = layout.section(s)[0] + int(slot[i]) * ROW
            assert torch.equal(regions[d][off:off + ROW], rows[i]), (s, i, d)
            written[d].add(int(slot[i]))
            if "side" in cfg.extras:
                so = layout.section(s)[0] + layout.side_off + int(slot[i]) * (ROW // 32)
                assert torch.equal(regions[d][so:so + ROW // 32], side[i].view(torch.uint8)), (s, i)
                mo = layout.section(s)[0] + layout.meta_off + 4 * int(slot[i])
                assert regions[d][mo:mo + 4].view(torch.int32).item() == i
        for d in range(world):
            # the slots of one peer are 0..count-1 (a permutation when scattered), all other bytes untouched
            assert sorted(written[d]) == list(range(len(written[d])))
            off, size = layout.section(s)
            sec = regions[d][off:off + size].clone()
            for k in written[d]:
                sec[k * ROW:(k + 1) * ROW] = P.POISON
            if "side" in cfg.extras:
                for k in written[d]:
                    sec[layout.side_off + k * (ROW // 32):layout.side_off + (k + 1) * (ROW // 32)] = P.POISON
                    sec[layout.meta_off + 4 * k:layout.meta_off + 4 * (k + 1)] = P.POISON
            assert torch.all(sec == P.POISON), (s, d)


CASES = [
    # world, rows per tile, programs, scatter, all peers
    (2, 1, 3, False, False),
    (2, 2, 2, True, False),
    (3, 4, 2, False, True),
    (3, 2, 3, True, True),
    (3, 1, 1, True, False),
]


@pytest.mark.parametrize("world,br,programs,scatter,all_peers", CASES)
def test_rows_land_in_place(world, br, programs, scatter, all_peers, device):
    cfg = P.StoreConfig(row_bytes=ROW, rows_per_tile=br, num_warps=4, scatter=scatter, all_peers=all_peers,
                        programs=programs, tile_bytes=512)
    # one piece (128 lanes masked), two (the second half masked) or three full ones
    assert cfg.tile_cols == {1: 512, 2: 256, 4: 128}[br]
    layout, regions, tab = _world(world, device)
    data, _ = _send_all(cfg, layout, regions, tab)
    _check_by_hand(cfg, layout, regions, data)
    for r in range(world):
        assert P.check_region(regions[r], layout, cfg, r, world, lambda s: data[s], 0) is None


def test_dispatch_extras_and_signal(device):
    """Claim atomics (slots unchanged, counters bumped once per row on the destination), scales and routing
    words beside the rows, and the EP arrival chain that the wait kernel consumes."""
    world = 3
    cfg = P.StoreConfig(row_bytes=ROW, rows_per_tile=2, num_warps=4, scatter=True, all_peers=True,
                        extras="claim+side", programs=2, tile_bytes=512)
    layout, regions, tab = _world(world, device)
    data, bufs = _send_all(cfg, layout, regions, tab, signal=True)
    _check_by_hand(cfg, layout, regions, data)
    claims = sum(int(r[layout.claim_off:layout.claim_off + 4 * P.NUM_CLAIM].view(torch.int32).sum()) for r in regions)
    assert claims == world * N_ROWS
    for r in range(world):
        flags = regions[r][layout.flag_off:layout.flag_off + 4 * world].view(torch.int32)
        assert flags.tolist() == [1] * world                 # every rank arrived once, on every rank
        assert int(bufs[r].done[0]) == 0                     # the last program reset the done counter
        P.launch_wait(bufs[r], layout, world, use_timer=False, max_spin_iters=50)
        assert flags.tolist() == [0] * world and int(bufs[r].err[0]) == 0


def test_wait_times_out_without_signal_and_checker_catches_a_wrong_byte(device):
    world = 2
    cfg = P.StoreConfig(row_bytes=ROW, rows_per_tile=4, num_warps=4, scatter=True, programs=2, tile_bytes=512)
    layout, regions, tab = _world(world, device)
    data, bufs = _send_all(cfg, layout, regions, tab)
    P.launch_wait(bufs[0], layout, world, use_timer=False, max_spin_iters=5)
    assert int(bufs[0].err[0]) == 1                          # no arrival: bounded, reported
    off = layout.section(0)[0] + 5 * ROW + 7
    regions[1][off] ^= 1
    msg = P.check_region(regions[1], layout, cfg, 1, world, lambda s: data[s], 0)
    assert msg is not None and "sender 0" in msg
    regions[1][off] ^= 1
    off = layout.section(1)[0] + N_ROWS * ROW                 # just past the last row: must stay poisoned
    regions[0][off] = 0
    assert P.check_region(regions[0], layout, cfg, 0, world, lambda s: data[s], 0) is not None


def test_zero_rows_and_arguments(device):
    layout, regions, tab = _world(2, device)
    cfg = P.StoreConfig(row_bytes=ROW, rows_per_tile=1, num_warps=4, programs=2, tile_bytes=512)
    data, _ = _send_all(cfg, layout, regions, tab, n_rows=0)
    for r in range(2):
        assert P.check_region(regions[r], layout, cfg, r, 2, lambda s: data[s], 0) is None
    rows, side = P.make_rows(N_ROWS + 1, ROW, 0, 0, device)
    buf = P.StoreBuffers(rows, side, torch.zeros(N_ROWS + 1, dtype=torch.int32, device=device), tab,
                         torch.zeros(1, dtype=torch.int32, device=device), regions[0],
                         torch.zeros(4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="fit"):
        P.launch_store(cfg, buf, layout, 0, 2)
    with pytest.raises(ValueError, match="multiple of 128"):
        P.launch_store(P.StoreConfig(row_bytes=200), buf, layout, 0, 2)
    args = P.parse_args(["--sizes", "64K,2M", "--layouts", "scatter", "--peers", "one,all", "--load-cache", "none,.cg"])
    assert args.sizes == [64 << 10, 2 << 20] and args.layouts == [True] and args.peers == [False, True]
    assert args.load_cache == ["", ".cg"]


_SIG = {"src_ptr": "*u8", "side_ptr": "*fp32", "slot_ptr": "*i32", "tab_ptr": "*i64", "done_ptr": "*i32",
        "n_rows": "i32", "rank": "i32", "npeers": "i32", "data_off": "i32", "section_bytes": "i32",
        "side_off": "i32", "meta_off": "i32", "claim_off": "i32", "flag_off": "i32"}
# what the JIT specialises at run time: torch's allocations and the layout's 256-byte offsets
_DIV16 = ["src_ptr", "side_ptr", "slot_ptr", "tab_ptr", "done_ptr", "data_off", "section_bytes", "side_off",
          "meta_off", "claim_off", "flag_off"]


@pytest.mark.parametrize("row,br,warps,scatter", [(7168, 1, 8, False), (14336, 4, 4, True)])
def test_sm90_build_moves_rows_16_bytes_at_a_time(row, br, warps, scatter, monkeypatch):
    import re

    from fp8gemm.testing import compile_sm90_in_subprocess
    here = os.path.dirname(P.__file__)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    cfg = P.StoreConfig(row_bytes=row, rows_per_tile=br, num_warps=warps)
    consts = dict(ROW_BYTES=row, BLOCK_R=br, BLOCK_H=cfg.tile_cols, W=2, SCATTER=scatter, CLAIM=False, SIDE=False,
                  SIGNAL=True, NCLAIM=P.NUM_CLAIM, BLOCK_SF=P.triton_next_pow2(row // 128), CACHE="")
    r = compile_sm90_in_subprocess("p2p_store", "p2p_store_kernel", _SIG, consts, divisible_by_16=_DIV16,
                                   num_warps=warps)
    assert r["local"] == 0 and r["stack"] == 0, r
    stores = re.findall(r"\bSTG\.E[.\w]*", r["sass"])
    loads = re.findall(r"\bLDG\.E[.\w]*", r["sass"])
    assert stores and set(stores) == {"STG.E.128"}, sorted(set(stores))
    # 16-byte row loads; the narrower ones are the peer table (8 bytes) and the scatter slots (4 bytes)
    assert loads.count("LDG.E.128") == stores.count("STG.E.128"), (loads, stores)
