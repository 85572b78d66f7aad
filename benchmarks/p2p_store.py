"""Peer-to-peer (NVLink) store bandwidth: the copy engine against Triton SM stores, and the cost of the
completion signal, to find which choices of the EP dispatch / combine kernels (``fp8gemm.kernels.ep_comm``)
keep them at ~50% of the copy-engine rate.

Run on one host with 2 or 4 GPUs; rank 0 prints, the JSON goes to ``--out``::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 benchmarks/p2p_store.py --out results/p2p_store

Every rank does the same thing at the same time (so each link carries traffic both ways, as in the EP
layer) and the time reported is the slowest rank's.  Peers are reached exactly as the EP kernels reach them:
a symmetric byte region from :meth:`fp8gemm.moe.ep.EPCommunicator._alloc_symmetric` (multicast off) and a
table ``tab`` of the regions' base addresses (int64) turned into typed pointers inside the kernel.

1. **Copy engine**: ``peer_view.copy_(local)`` of S bytes to the next rank (S = ``--sizes``, 16 MiB and
   2 MiB by default): the reference rate (``%CE`` below is against it, same S, same run).
2. **SM stores** (:func:`p2p_store_kernel`): a persistent grid of P programs copies ``S // row`` local rows
   of ``row`` bytes into peer regions, ``rows_per_tile`` rows per tile, tiles ``p, p + P, ...`` on program
   p, each tile as ``[rows_per_tile, tile_cols]`` pieces with the EP senders' own two-stage copy loop
   (``ep_comm._copy_rows``: 16-byte loads, 16-byte stores, the loads of piece j+1 issued before the stores
   of piece j; ``tile_cols`` from ``ep.send_tile``, the dispatch's heuristic).  Swept: P, row bytes
   (7168 = an FP8 token row, 14336 = a BF16 row, 16384), rows per tile, num_warps, destination slots
   contiguous or a random permutation (as the dispatch's slot atomics leave them), one peer (the next
   rank) or all peers (rows round-robin over the other ranks; only with more than 2 ranks).  Optional
   dispatch extras (``--extras``): ``claim`` = one relaxed sys-scope atomic per row on the destination
   rank before the row's stores, whose result the stores wait for (the dispatch's slot claim);
   ``side`` = the dispatch's per-row FP32 scales (row/32 bytes) and int32 routing word stored next to the
   row with the same (unhinted) pointers as ``ep_comm._put_rows``.  GB/s counts the row bytes only.
3. **Completion signal** (``--signal-sizes``, 0 / 64 KiB / 512 KiB by default): the same store kernel
   with the EP kernels' arrival chain (``ep_comm._arrive_all``: every program's acq_rel sys-scope
   done-counter bump, the last program's release atomic on every rank's flag) followed by the EP
   receive kernel (``ep_comm.wait_arrivals_kernel``: one program polling each rank's flag in turn with
   sys-scope acquire fetch-adds of 0 until it came), timed per step against the same store kernel without them; the
   difference is what the chain adds (the fixed ~20 µs of the EP kernels at small batches).

Method: every configuration is first run once and checked (each rank compares, with ``torch.equal``,
every section of its region with what the senders must have written there, regenerated from the
senders' rank, row size and seed; sections nobody writes must keep their poison; a wrong or failing
configuration is reported and not timed), then ``--iters`` launches are captured in one CUDA graph
(eager launches if capture fails), replayed ``--reps`` times after a ``dist.barrier()`` between CUDA
events; the per-rank median replay is divided by the launches, the slowest rank is kept.

Default sweep: 3 row sizes x 5 rows-per-tile (1, 2, 4, 8 and the dispatch's 16) x 2 warps x 2 layouts =
60 kernels, plus 2 dispatch extras (claim, side) x 5 x 2 at 7168-byte scattered rows = 20, each at up to 6
grid sizes (P capped at the tile count) and 2 sizes: 844 checked and timed configurations on 2 GPUs (1688 on
4, where "all peers" doubles them), plus 28 (56) of the signal sweep.  Expected: ~1.5-2 minutes on 2 GPUs,
~2.5-3 on 4, about half of it compiling ~80 kernels (a second run reuses Triton's cache).  Every list is a
command-line option (``--help``); e.g. ``--row-bytes 7168 --warps 8 --layouts scatter`` for a quick look.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8gemm import runtime  # noqa: E402
from fp8gemm.kernels import ep_comm as K  # noqa: E402
from fp8gemm.moe.ep import _align, send_tile, triton_next_pow2  # noqa: E402  (the regions' 256-byte alignment)

POISON = 0xA5           # fills every receive section before a checked run: stray or missing stores show
NUM_CLAIM = 128         # claim counters per rank (as many as the local experts of a 256-expert, 2-rank EP)
EXTRAS = ("none", "claim", "side", "claim+side")


@dataclass(frozen=True)
class RegionLayout:
    """Byte offsets in one rank's symmetric region: the signal flags (int32 [world]), the claim counters,
    then one receive section per sender rank (sender s writes only into section s of its peers, so a
    check can tell every sender's bytes apart): rows at 0, the ``side`` scales at ``side_off``, the
    routing words at ``meta_off``."""
    world: int
    max_bytes: int          # the most row bytes one sender sends in one launch
    min_row_bytes: int

    flag_off = 0
    claim_off = 256
    data_off = 4096

    @property
    def side_off(self) -> int:
        return _align(self.max_bytes)

    @property
    def meta_off(self) -> int:
        return self.side_off + _align(self.max_bytes // 32 + 16)

    @property
    def section_bytes(self) -> int:
        return self.meta_off + _align(4 * (self.max_bytes // self.min_row_bytes) + 16)

    @property
    def total(self) -> int:
        return self.data_off + self.world * self.section_bytes

    def section(self, sender: int) -> tuple[int, int]:
        return self.data_off + sender * self.section_bytes, self.section_bytes


@dataclass(frozen=True)
class StoreConfig:
    """One SM-store kernel variant and its launch."""
    row_bytes: int = 7168
    rows_per_tile: int = 4
    num_warps: int = 8
    scatter: bool = False
    all_peers: bool = False
    extras: str = "none"
    programs: int = 132
    tile_bytes: int = 16384
    load_cache: str = ""

    @property
    def tile_cols(self) -> int:
        """Bytes of a row a piece covers: the EP dispatch's choice for this many rows per tile."""
        return send_tile(self.rows_per_tile, self.row_bytes, 1, tile_bytes=self.tile_bytes, max_rows=64)[1]

    def describe(self) -> str:
        return (f"row={self.row_bytes} tile={self.rows_per_tile}x{self.tile_cols} w={self.num_warps} "
                f"{'scatter' if self.scatter else 'contig'} {'all' if self.all_peers else 'one'}-peer "
                f"extras={self.extras}{' cache=' + self.load_cache if self.load_cache else ''} P={self.programs}")


# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------

@triton.jit
def p2p_store_kernel(src_ptr, side_ptr, slot_ptr, tab_ptr, done_ptr, n_rows, rank, npeers,
                     data_off, section_bytes, side_off, meta_off, claim_off, flag_off,
                     ROW_BYTES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, W: tl.constexpr,
                     SCATTER: tl.constexpr, CLAIM: tl.constexpr, SIDE: tl.constexpr, SIGNAL: tl.constexpr,
                     NCLAIM: tl.constexpr, BLOCK_SF: tl.constexpr, CACHE: tl.constexpr):
    """Row ``i`` of ``src`` ([n_rows, ROW_BYTES] bytes) goes to rank ``(rank + 1 + i % npeers) % W``,
    section ``rank`` of its region, slot ``i // npeers`` (or ``slot[i]`` with ``SCATTER``).  Persistent:
    program p moves the tiles of ``BLOCK_R`` rows ``p, p + P, ...``."""
    pid = tl.program_id(0)
    rr = tl.arange(0, BLOCK_R)
    SFH: tl.constexpr = ROW_BYTES // 128
    soffs = tl.arange(0, BLOCK_SF)
    num_tiles = tl.cdiv(n_rows, BLOCK_R)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_R + rr
        live = rows < n_rows
        src = src_ptr + rows.to(tl.int64) * ROW_BYTES
        # tile 0 and the scales are in flight before the address work and the claim's round trip, as in
        # the dispatch (ep_comm._token_rows)
        v0 = K._load_tile(src, live, 0, ROW_BYTES, BLOCK_H, CACHE)
        if SIDE:
            smask = live[:, None] & (soffs[None, :] < SFH)
            sf = tl.load(side_ptr + rows.to(tl.int64)[:, None] * SFH + soffs[None, :], mask=smask)
        peer = (rank + 1 + rows % npeers) % W
        if SCATTER:
            slot = tl.load(slot_ptr + rows, mask=live, other=0)
        else:
            slot = rows // npeers
        base = tl.load(tab_ptr + peer)
        if CLAIM:
            cnt = (base + claim_off).to(tl.pointer_type(tl.int32)) + slot % NCLAIM
            old = tl.atomic_add(cnt, tl.full((BLOCK_R,), 1, tl.int32), mask=live, sem="relaxed", scope="sys")
            # the counters only grow from 0: the slot is unchanged, but the stores now wait for the reply
            slot = tl.where(old >= 0, slot, 0)
        sec = base + (data_off + (rank + tl.zeros((), tl.int64)) * section_bytes)
        # the regions are 256-byte aligned and ROW_BYTES % 16 == 0: 16-byte peer stores (as ep_comm._put_rows)
        dst = tl.multiple_of((sec + slot.to(tl.int64) * ROW_BYTES).to(tl.pointer_type(tl.uint8)), 16)
        K._copy_rows(v0, src, dst, live, live, ROW_BYTES, BLOCK_H, CACHE)
        if SIDE:
            sdst = (sec + side_off + slot.to(tl.int64) * (SFH * 4)).to(tl.pointer_type(tl.float32))
            tl.store(sdst[:, None] + soffs[None, :], sf, mask=smask)
            tl.store((sec + meta_off).to(tl.pointer_type(tl.int32)) + slot, rows, mask=live)
    if SIGNAL:
        K._arrive_all(tab_ptr, done_ptr, rank, flag_off, W)


@dataclass
class StoreBuffers:
    """What one sender's launches read: rows, side scales, scatter slots (int32), the peer table, the
    done counter of the signal; ``region`` is the sender's own region (the signal's wait spins on it)."""
    src: torch.Tensor           # uint8 [n_rows, row_bytes]
    side: torch.Tensor          # float32 [n_rows, row_bytes // 128]
    slots: torch.Tensor         # int32 [n_rows]
    tab: torch.Tensor           # int64 [world]
    done: torch.Tensor          # int32 [1], zero between launches
    region: torch.Tensor
    err: torch.Tensor           # int32 [4], ep_comm's error record of the wait


def launch_store(cfg: StoreConfig, buf: StoreBuffers, layout: RegionLayout, rank: int, world: int,
                 signal: bool = False) -> None:
    """One launch of :func:`p2p_store_kernel` for ``cfg`` (``signal``: with the EP arrival chain)."""
    if cfg.row_bytes % 128:
        raise ValueError(f"row bytes must be a multiple of 128 (16-byte stores, FP8 scale groups), got "
                         f"{cfg.row_bytes}")
    if cfg.extras not in EXTRAS:
        raise ValueError(f"extras must be one of {EXTRAS}, got {cfg.extras!r}")
    n_rows = buf.src.shape[0]
    if n_rows * cfg.row_bytes > layout.max_bytes or cfg.row_bytes < layout.min_row_bytes:
        raise ValueError("the rows do not fit the region layout")
    for name, t in (("src", buf.src), ("side", buf.side)):
        if t.data_ptr() % 16 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous and 16-byte aligned")
    npeers = max(1, world - 1) if cfg.all_peers else 1
    sfh = cfg.row_bytes // 128
    p2p_store_kernel[(max(1, cfg.programs),)](
        buf.src, buf.side, buf.slots, buf.tab, buf.done, n_rows, rank, npeers,
        layout.data_off, layout.section_bytes, layout.side_off, layout.meta_off, layout.claim_off, layout.flag_off,
        ROW_BYTES=cfg.row_bytes, BLOCK_R=cfg.rows_per_tile, BLOCK_H=cfg.tile_cols, W=world,
        SCATTER=cfg.scatter, CLAIM="claim" in cfg.extras, SIDE="side" in cfg.extras, SIGNAL=signal,
        NCLAIM=NUM_CLAIM, BLOCK_SF=triton_next_pow2(sfh), CACHE=cfg.load_cache, num_warps=cfg.num_warps)


def launch_wait(buf: StoreBuffers, layout: RegionLayout, world: int, use_timer: bool, max_spin_iters: int = 1 << 16,
                timeout_s: float = 10.0) -> None:
    """The EP receive side of the signal: wait until every rank's flag came, consume it."""
    K.wait_arrivals_kernel[(1,)](buf.region, buf.err, layout.flag_off, 1, max_spin_iters, int(timeout_s * 1e9),
                                 W=world, USE_TIMER=use_timer, num_warps=1)


# ------------------------------------------------------------------------------------------------------
# Deterministic data and destinations (both sides regenerate them)
# ------------------------------------------------------------------------------------------------------

def make_rows(n_rows: int, row_bytes: int, sender: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sender ``sender``'s rows (uint8 [n_rows, row_bytes], every row different) and side scales (FP32
    [n_rows, row_bytes // 128], finite), an integer hash so every device computes the same bytes."""
    r = torch.arange(n_rows, device=device, dtype=torch.int64)[:, None]
    c = torch.arange(row_bytes, device=device, dtype=torch.int64)[None, :]
    mask = 0xFFFFFFFF
    x = (r * 0x9E3779B1 + c * 0x85EBCA77 + (sender + 1) * 0xC2B2AE3D + (seed + 7) * 0x27D4EB2F) & mask
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & mask
    x = x ^ (x >> 12)
    rows = (x & 0xFF).to(torch.uint8)
    side = ((x[:, ::128] >> 8) & 0xFFFF).to(torch.float32) - 32768.0
    return rows.contiguous(), side.contiguous()


def row_destinations(n_rows: int, sender: int, world: int, npeers: int, scatter: bool, seed: int = 0):
    """(peer rank, slot) of each of ``sender``'s rows (CPU int64): row i goes to rank
    ``(sender + 1 + i % npeers) % world`` at slot ``i // npeers`` of its section, or, scattered, at a
    random permutation of the slots of that peer's rows."""
    i = torch.arange(n_rows, device="cpu")      # CPU whatever the default device (the GPU tests set CUDA)
    q = i % npeers
    slot = i // npeers
    if scatter:
        g = torch.Generator(device="cpu").manual_seed(seed * 1000003 + sender * 1009 + n_rows * 17 + npeers)
        for qq in range(npeers):
            sel = (q == qq).nonzero().flatten()
            slot[sel] = torch.randperm(sel.numel(), generator=g, device="cpu")
    return (sender + 1 + q) % world, slot


def expected_section(layout: RegionLayout, cfg: StoreConfig, rows: torch.Tensor, side: torch.Tensor,
                     sender: int, receiver: int, world: int, seed: int) -> torch.Tensor:
    """The bytes section ``sender`` of ``receiver``'s region must hold after one launch of ``cfg``."""
    out = torch.full((layout.section_bytes,), POISON, dtype=torch.uint8, device=rows.device)
    npeers = max(1, world - 1) if cfg.all_peers else 1
    peer, slot = row_destinations(rows.shape[0], sender, world, npeers, cfg.scatter, seed)
    mine = (peer == receiver).nonzero().flatten()
    if mine.numel() == 0:
        return out
    slot_d, mine_d = slot[mine].to(rows.device), mine.to(rows.device)
    n, rb = rows.shape
    out[:n * rb].view(n, rb)[slot_d] = rows[mine_d]
    if "side" in cfg.extras:
        sb = rb // 32
        out[layout.side_off:layout.side_off + n * sb].view(n, sb)[slot_d] = side[mine_d].view(torch.uint8)
        out[layout.meta_off:layout.meta_off + 4 * n].view(torch.int32)[slot_d] = mine_d.to(torch.int32)
    return out


def check_region(region: torch.Tensor, layout: RegionLayout, cfg: StoreConfig, receiver: int, world: int,
                 rows_of, seed: int) -> str | None:
    """None if every section of ``receiver``'s region holds exactly what the senders must have written
    (``rows_of(sender)`` -> (rows, side)), else what is wrong."""
    for s in range(world):
        off, size = layout.section(s)
        rows, side = rows_of(s)
        want = expected_section(layout, cfg, rows, side, s, receiver, world, seed)
        got = region[off:off + size]
        if not torch.equal(got, want):
            bad = (got != want).nonzero().flatten()
            return (f"rank {receiver}, section of sender {s}: {bad.numel()} wrong bytes, first at section byte "
                    f"{int(bad[0])} (row {int(bad[0]) // cfg.row_bytes} if a row byte)")
    return None


# ------------------------------------------------------------------------------------------------------
# The benchmark (torchrun)
# ------------------------------------------------------------------------------------------------------

def _alloc_region(nbytes: int, group, rank: int, world: int, device):
    """The region and peer table from the EP communicator's own allocator (same symmetric-memory calls,
    same peer mapping); returns (region, tab, handle)."""
    from fp8gemm.moe.ep import EPCommunicator
    # _alloc_symmetric reads only these attributes of its instance
    owner = types.SimpleNamespace(layout=types.SimpleNamespace(sections=lambda: {"total": (0, nbytes)}),
                                  group=group, rank=rank, world_size=world, device=device, _handle=None)
    region, tab = EPCommunicator._alloc_symmetric(owner)
    return region, tab, owner._handle


def _fmt_size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}MiB"
    return f"{n >> 10}KiB" if n % 1024 == 0 and n else f"{n}B"


def _csv(kind):
    def parse(text):
        return [kind(x) for x in text.split(",") if x.strip()]
    return parse


def _size(text: str) -> int:
    t = text.strip().upper()
    for suffix, mult in (("KIB", 1 << 10), ("MIB", 1 << 20), ("K", 1 << 10), ("M", 1 << 20)):
        if t.endswith(suffix):
            return int(float(t[:-len(suffix)]) * mult)
    return int(t)


def _cache_list(text):
    out = []
    for x in text.split(","):
        x = x.strip()
        if x not in ("none", ".ca", ".cg", ".cv"):
            raise argparse.ArgumentTypeError(f"{x!r} is not one of none, .ca, .cg, .cv")
        out.append("" if x == "none" else x)
    return out


def _bool_list(names, true_name):
    def parse(text):
        out = []
        for x in text.split(","):
            x = x.strip()
            if x not in names:
                raise argparse.ArgumentTypeError(f"{x!r} is not one of {names}")
            out.append(x == true_name)
        return out
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/p2p_store", help="folder of p2p_store.json (rank 0 writes it)")
    p.add_argument("--sizes", type=_csv(_size), default=[16 << 20, 2 << 20],
                   help="bytes each rank sends per launch (suffix K/M = KiB/MiB); default 16M,2M")
    p.add_argument("--programs", type=_csv(int), default=[8, 16, 22, 32, 66, 132], help="grid sizes P")
    p.add_argument("--row-bytes", type=_csv(int), default=[7168, 14336, 16384])
    p.add_argument("--rows-per-tile", type=_csv(int), default=[1, 2, 4, 8, 16],
                   help="rows per tile (the dispatch uses 16 from ~264 tokens per rank at top-8)")
    p.add_argument("--warps", type=_csv(int), default=[4, 8])
    p.add_argument("--layouts", type=_bool_list(("contig", "scatter"), "scatter"), default=[False, True],
                   help="destination slots: contig, scatter")
    p.add_argument("--peers", type=_bool_list(("one", "all"), "all"), default=[False, True],
                   help="one (next rank), all (round-robin over the other ranks; skipped with 2 ranks)")
    p.add_argument("--tile-bytes", type=_csv(int), default=[16384],
                   help="bytes of one [rows, cols] piece (the dispatch: 16384, the combine: 32768)")
    p.add_argument("--load-cache", type=_cache_list, default=[""],
                   help="cache modifiers of the loads: none (the dispatch), .cg (the combine), .ca, .cv")
    p.add_argument("--extras", type=_csv(str), default=["none"], help=f"extras in the main sweep, of {EXTRAS}")
    p.add_argument("--dispatch-extras", type=_csv(str), default=["claim", "side"],
                   help="extras swept at the first row size, scattered, every rows-per-tile / warps / P")
    p.add_argument("--signal-sizes", type=_csv(_size), default=[0, 64 << 10, 512 << 10],
                   help="bytes per rank of the signal sweep (0: the chain alone)")
    p.add_argument("--signal-rows-per-tile", type=int, default=1, help="the dispatch's choice at small batches")
    p.add_argument("--signal-warps", type=int, default=8)
    p.add_argument("--signal-programs", type=_csv(int), default=None, help="default: --programs")
    p.add_argument("--iters", type=int, default=0, help="launches per graph (0: about 256 MiB worth, 10..200)")
    p.add_argument("--reps", type=int, default=5, help="timed graph replays (median)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for e in args.extras + args.dispatch_extras:
        if e not in EXTRAS:
            p.error(f"extras must be among {EXTRAS}, got {e!r}")
    for r in args.row_bytes:
        if r % 128:
            p.error(f"--row-bytes must be multiples of 128, got {r}")
    for r in args.rows_per_tile:
        if r & (r - 1) or r > 64:
            p.error(f"--rows-per-tile must be powers of two <= 64, got {r}")
    return args


class Bench:
    """The state of one rank: region, peer table, data caches, timing."""

    def __init__(self, args):
        import torch.distributed as dist
        self.dist, self.args = dist, args
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        self.dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=self.dev)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = dist.group.WORLD
        rows = list(args.row_bytes)
        max_bytes = max(args.sizes + args.signal_sizes)
        self.layout = RegionLayout(self.world, max_bytes, min(rows))
        self.region, self.tab, self.handle = _alloc_region(self.layout.total, self.group, self.rank, self.world,
                                                           self.dev)
        # the kernel promises 16-byte aligned peer rows (tl.multiple_of): hold the regions to it
        if any(p % 256 for p in self.tab.tolist()):
            raise RuntimeError(f"symmetric regions not 256-byte aligned: {[hex(p) for p in self.tab.tolist()]}")
        self.use_timer = not runtime.interpreting()        # the wait's bound: %globaltimer on a GPU
        self.done = torch.zeros(1, dtype=torch.int32, device=self.dev)
        self.err = torch.zeros(4, dtype=torch.int32, device=self.dev)
        self._rows, self._slots = {}, {}

    # -- helpers ------------------------------------------------------------------------------------
    def say(self, *a):
        if self.rank == 0:
            print(*a, flush=True)

    def rows_of(self, sender: int, n_rows: int, row_bytes: int):
        key = (sender, n_rows, row_bytes)
        if key not in self._rows:
            # at least one row: a launch without rows still gets real (non-null) pointers
            rows, side = make_rows(max(1, n_rows), row_bytes, sender, self.args.seed, self.dev)
            self._rows[key] = rows[:n_rows], side[:n_rows]
        return self._rows[key]

    def buffers(self, cfg: StoreConfig, n_rows: int) -> StoreBuffers:
        npeers = max(1, self.world - 1) if cfg.all_peers else 1
        key = (n_rows, npeers, cfg.scatter)
        if key not in self._slots:
            _, slot = row_destinations(max(1, n_rows), self.rank, self.world, npeers, cfg.scatter, self.args.seed)
            self._slots[key] = slot.to(torch.int32).to(self.dev)[:n_rows]
        src, side = self.rows_of(self.rank, n_rows, cfg.row_bytes)
        return StoreBuffers(src, side, self._slots[key], self.tab, self.done, self.region, self.err)

    def all_ok(self, ok: bool) -> bool:
        t = torch.tensor([1 if ok else 0], device=self.dev)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN)
        return bool(t.item())

    def poison(self):
        self.region[self.layout.data_off:].fill_(POISON)
        torch.cuda.synchronize()
        self.dist.barrier()

    def timed(self, fn, iters: int) -> tuple[float, bool]:
        """Seconds per call of ``fn`` (``iters`` calls in a CUDA graph, median of the replays), slowest rank."""
        graph = None
        try:
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(iters):
                    fn()
            graph = g
        except Exception:      # noqa: BLE001  (not capturable: eager launches)
            torch.cuda.synchronize()
        reps = []
        for i in range(self.args.reps + 1):
            torch.cuda.synchronize()
            self.dist.barrier()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            if graph is not None:
                graph.replay()
            else:
                for _ in range(iters):
                    fn()
            e.record()
            torch.cuda.synchronize()
            if i:       # the first replay uploads the graph
                reps.append(s.elapsed_time(e) * 1e-3 / iters)
        t = torch.tensor([statistics.median(reps)], dtype=torch.float64, device=self.dev)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        graphed = graph is not None
        del graph
        return float(t.item()), graphed

    def iters_for(self, nbytes: int) -> int:
        if self.args.iters:
            return self.args.iters
        return max(10, min(200, (256 << 20) // max(1, nbytes)))

    # -- 1. copy engine ----------------------------------------------------------------------------
    def copy_engine(self, size: int) -> dict:
        peer = (self.rank + 1) % self.world
        off, _ = self.layout.section(self.rank)
        base = self.region.data_ptr() - self.handle.buffer_ptrs[self.rank]
        dst = self.handle.get_buffer(peer, (size,), torch.uint8, base + off)
        src = self.rows_of(self.rank, 1, size)[0].view(-1)
        self.poison()
        err = None
        try:
            dst.copy_(src)
            torch.cuda.synchronize()
        except Exception as e:      # noqa: BLE001
            err = repr(e)
        self.dist.barrier()
        if err is None:
            prev = (self.rank - 1) % self.world
            poff, _ = self.layout.section(prev)
            if not torch.equal(self.region[poff:poff + size], self.rows_of(prev, 1, size)[0].view(-1)):
                err = f"rank {self.rank}: copy-engine bytes from rank {prev} differ"
        row = {"bytes": size}
        if not self.all_ok(err is None):
            row.update(ok=False, error=err or "another rank failed")
            self.say(f"[p2p] copy engine S={_fmt_size(size)}: WRONG ({row['error']})")
            return row
        t, graphed = self.timed(lambda: dst.copy_(src), self.iters_for(size))
        row.update(ok=True, us=t * 1e6, GBps=size / t / 1e9, graph=graphed)
        self.say(f"[p2p] copy engine S={_fmt_size(size)}: {row['us']:.1f} us, {row['GBps']:.1f} GB/s")
        return row

    # -- 2. SM stores -----------------------------------------------------------------------------
    def checked_launch(self, cfg: StoreConfig, n_rows: int, signal: bool) -> str | None:
        """One launch checked on every rank: None if right everywhere, else this rank's error (or a peer's)."""
        buf = self.buffers(cfg, n_rows)
        self.poison()
        err = None
        try:
            launch_store(cfg, buf, self.layout, self.rank, self.world, signal)
            if signal:
                launch_wait(buf, self.layout, self.world, self.use_timer)
            torch.cuda.synchronize()
            if signal and int(self.err[0]):
                err = f"signal wait failed: {K.ERROR_CODES.get(int(self.err[0]), '?')} {self.err.tolist()}"
        except Exception as e:      # noqa: BLE001  (does not compile, launch error)
            err = f"{type(e).__name__}: {str(e)[:300]}"
        self.dist.barrier()
        if err is None:
            err = check_region(self.region, self.layout, cfg, self.rank, self.world,
                               lambda s: self.rows_of(s, n_rows, cfg.row_bytes), self.args.seed)
        return None if self.all_ok(err is None) else (err or "wrong on another rank")

    def store(self, cfg: StoreConfig, size: int, ce: dict | None, signal: bool = False,
              iters: int | None = None) -> dict:
        n_rows = size // cfg.row_bytes
        nbytes = n_rows * cfg.row_bytes
        row = {**asdict(cfg), "tile_cols": cfg.tile_cols, "bytes": nbytes, "size": size, "signal": signal}
        err = self.checked_launch(cfg, n_rows, signal)
        if err is not None:
            row.update(ok=False, error=err)
            self.say(f"[p2p] {cfg.describe()} S={_fmt_size(size)}{' signal' if signal else ''}: WRONG ({err})")
            return row
        buf = self.buffers(cfg, n_rows)
        if signal:
            def step():
                launch_store(cfg, buf, self.layout, self.rank, self.world, True)
                launch_wait(buf, self.layout, self.world, self.use_timer)
        else:
            def step():
                launch_store(cfg, buf, self.layout, self.rank, self.world, False)
        t, graphed = self.timed(step, iters or self.iters_for(nbytes))
        if signal and int(self.err[0]):
            row.update(ok=False, error=f"signal wait failed while timing: {self.err.tolist()}")
            self.say(f"[p2p] {cfg.describe()}: {row['error']}")
            self.err.zero_()
            return row
        row.update(ok=True, us=t * 1e6, GBps=nbytes / t / 1e9 if nbytes else 0.0, graph=graphed)
        pct = ""
        if ce and ce.get("ok") and nbytes:
            row["pct_ce"] = row["GBps"] / ce["GBps"] * 100
            pct = f" ({row['pct_ce']:.0f}% of CE)"
        self.say(f"[p2p] {cfg.describe()} S={_fmt_size(size)}{' signal' if signal else ''}: {row['us']:.1f} us, "
                 f"{row['GBps']:.1f} GB/s{pct}")
        return row


def _programs_for(programs, tiles):
    """The grid sizes, capped at the tile count (a program without a tile measures nothing), no repeats."""
    out = []
    for p in programs:
        p = max(1, min(p, tiles)) if tiles else p
        if p not in out:
            out.append(p)
    return out


def _summary(res: dict, args) -> str:
    lines = []
    ce = {r["bytes"]: r for r in res["copy_engine"]}
    for size in args.sizes:
        c = ce.get(size, {})
        lines.append(f"\nSM stores, S = {_fmt_size(size)} per rank; GB/s of row bytes, slowest of {res['world']} "
                     f"ranks; copy engine {c.get('GBps', float('nan')):.1f} GB/s")
        rows = [r for r in res["store"] if r["size"] == size]
        progs = sorted({r["programs"] for r in rows})
        head = f"{'row':>6} {'layout':>7} {'peers':>5} {'extras':>10} {'tile':>9} {'w':>2} |" + \
            "".join(f"{'P=' + str(p):>8}" for p in progs) + f" | {'best':>6} {'%CE':>5}"
        lines.append(head)
        lines.append("-" * len(head))
        groups = {}
        for r in rows:
            key = (r["row_bytes"], r["scatter"], r["all_peers"], r["extras"], r["rows_per_tile"], r["tile_cols"],
                   r["num_warps"], r["tile_bytes"], r["load_cache"])
            groups.setdefault(key, {})[r["programs"]] = r
        for key, by_p in groups.items():
            rb, sc, ap, ex, br, bh, w, _, cache = key
            if cache:
                ex = cache if ex == "none" else ex + cache
            cells = []
            for p in progs:
                r = by_p.get(p)
                cells.append(f"{'':>8}" if r is None else f"{'WRONG':>8}" if not r["ok"] else f"{r['GBps']:>8.1f}")
            good = [r for r in by_p.values() if r["ok"]]
            best = max(good, key=lambda r: r["GBps"]) if good else None
            tail = f"{best['GBps']:>6.1f} {best.get('pct_ce', float('nan')):>5.0f}" if best else f"{'-':>6} {'-':>5}"
            lines.append(f"{rb:>6} {'scatter' if sc else 'contig':>7} {'all' if ap else 'one':>5} {ex:>10} "
                         f"{str(br) + 'x' + str(bh):>9} {w:>2} |" + "".join(cells) + f" | {tail}")
    if res["signal"]:
        lines.append("\nCompletion signal (EP arrival chain + receive kernel) per step, slowest rank: store alone, "
                     "store + chain, what the chain adds")
        head = f"{'bytes':>8} {'peers':>5} {'P':>4} | {'store us':>9} {'+chain us':>9} {'chain us':>9}"
        lines.append(head)
        lines.append("-" * len(head))
        plain = {(r["size"], r["all_peers"], r["programs"]): r for r in res["signal"] if not r["signal"]}
        for r in res["signal"]:
            if not r["signal"]:
                continue
            b = plain.get((r["size"], r["all_peers"], r["programs"]))
            what = f"{_fmt_size(r['size']):>8} {'all' if r['all_peers'] else 'one':>5} {r['programs']:>4} | "
            if not (r["ok"] and b and b["ok"]):
                lines.append(what + "WRONG")
                continue
            lines.append(what + f"{b['us']:>9.1f} {r['us']:>9.1f} {r['us'] - b['us']:>9.1f}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(k, v)
    t0 = time.time()
    b = Bench(args)
    card = torch.cuda.get_device_name()
    b.say(f"[p2p] {card} x{b.world}, region {b.layout.total / 2**20:.1f} MiB per rank, sizes "
          f"{', '.join(_fmt_size(s) for s in args.sizes)}")
    if b.world == 1:
        b.say("[p2p] one rank: every 'peer' is the rank itself (local HBM copy, not NVLink)")
    res = {"card": card, "world": b.world, "args": vars(args), "copy_engine": [], "store": [], "signal": []}
    ce = {}
    for size in args.sizes:
        r = b.copy_engine(size)
        res["copy_engine"].append(r)
        ce[size] = r

    peers = [p for p in args.peers if not p or b.world > 2] or [False]      # with 2 ranks "all" is "one"
    variants = [(rb, br, w, sc, ex, tb, lc) for rb in args.row_bytes for br in args.rows_per_tile
                for w in args.warps for sc in args.layouts for ex in args.extras for tb in args.tile_bytes
                for lc in args.load_cache]
    variants += [(args.row_bytes[0], br, w, True, ex, args.tile_bytes[0], args.load_cache[0])
                 for ex in args.dispatch_extras if ex not in args.extras
                 for br in args.rows_per_tile for w in args.warps]
    for rb, br, w, sc, ex, tb, lc in variants:
        for ap in peers:
            for size in args.sizes:
                tiles = -(-(size // rb) // br)
                for p in _programs_for(args.programs, tiles):
                    cfg = StoreConfig(rb, br, w, sc, ap, ex, p, tb, lc)
                    res["store"].append(b.store(cfg, size, ce.get(size)))

    sig_programs = args.signal_programs or args.programs
    for size in args.signal_sizes:
        for ap in peers:
            tiles = -(-(size // args.row_bytes[0]) // args.signal_rows_per_tile)
            for p in _programs_for(sig_programs, tiles):
                cfg = StoreConfig(args.row_bytes[0], args.signal_rows_per_tile, args.signal_warps, False, ap, "none",
                                  p, args.tile_bytes[0], args.load_cache[0])
                for signal in (False, True):
                    # latency, not bandwidth: a fixed count of steps whatever the size
                    res["signal"].append(b.store(cfg, size, ce.get(size), signal=signal, iters=50))

    res["seconds"] = time.time() - t0
    if b.rank == 0:
        print(_summary(res, args), flush=True)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "p2p_store.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\n[p2p] {res['seconds']:.0f} s; wrote {path}", flush=True)
    b.dist.barrier()
    b.dist.destroy_process_group()


if __name__ == "__main__":
    main()
