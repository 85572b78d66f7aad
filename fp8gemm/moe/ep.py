"""Expert-parallel communicator: dispatch tokens to the ranks that own their experts, combine the
expert outputs back, inside one NVLink domain (torch symmetric memory + Triton kernels) or across
nodes (NCCL ``all_to_all_single``).

Experts are split evenly: rank ``r`` owns global experts ``[r * L, (r + 1) * L)`` with
``L = num_experts // world_size``.  Received tokens land in the masked layout of the grouped GEMM:
FP8 ``[L, max_m, hidden]`` + FP32 scales ``[L, max_m, hidden / 128]`` with the per-expert counts
``masked_m`` (int32 [L], on the device).  ``max_m`` (capacity per expert) defaults to
``world_size * max_tokens_per_rank``, which never overflows when a token's top-k experts are distinct;
a smaller capacity is checked and overflow is reported as an error, never silently wrong.

Routing word of a received row (``recv_src_info``, int32 [L, max_m]):
``src_rank * max_tokens_per_rank * topk + token * topk + k``; the combine sends the expert output of
that row back to rank ``src_rank``'s receive buffer ``[max_tokens_per_rank, topk, hidden]`` BF16 at
``(token, k)``, where ``y[t] = sum_k topk_weights[t, k] * recv[t, k]`` (FP32, then BF16) reduces it.
Entries of ``topk_idx`` that are negative (or >= num_experts) are skipped throughout.

Dispatch payload: ``dispatch_payload="fp8"`` (default) takes tokens as FP8 ``[T, hidden]`` + FP32 scales
``[T, hidden / 128]`` (:func:`fp8gemm.per_token_cast_to_fp8`) and leaves them so on the owner;
``dispatch_payload="fp4"`` (symm backend) takes the FP4 form of :func:`fp8gemm.per_token_cast_to_fp4` with
``ue8m0_bytes=True`` -- E2M1 codes uint8 ``[T, hidden / 2]`` + UE8M0 scale bytes ``[T, hidden / 32]``, 52% of the
FP8 form's bytes -- and leaves the same form on the owner (``recv_x`` uint8 ``[L, max_m, hidden / 2]``,
``recv_x_sf`` uint8 ``[L, max_m, hidden / 32]``), which the grouped GEMMs take as FP4 activations.  The rows
are moved as bytes either way (the scale bytes of a row, ``hidden / 32 = 4 * hidden / 128``, fill exactly
the FP8 form's scale slot).

Combine payload: ``combine_payload="bf16"`` (default) sends the expert outputs as they are;
``combine_payload="fp8"`` (symm backend) sends each row as E4M3 codes with one UE8M0 scale byte per 128
columns (:func:`fp8gemm.reference.quantize_combine_payload`) -- cast by the sender as it stores a BF16 expert
output, or copied as it is where the L2 GEMM wrote it (``combine_send(expert_out_sf=)``, what
:class:`fp8gemm.moe.layer.MoELayer` does with fp8gemm's own GEMM) -- and the receiver reduces the de-quantised rows (:func:`fp8gemm.reference.combine_reduce`): half the bytes on
NVLink and in the reduce, at the precision of an FP8 round trip of every expert output (semantics:
:func:`fp8gemm.reference.moe_layer_reference` with ``combine_payload="fp8"``).

Contiguous layout (prefill)
---------------------------
Created with ``contiguous=True``, the communicator also has a second receive form for
:func:`fp8gemm.m_grouped_fp8_gemm_nt_contiguous`: :meth:`EPCommunicator.dispatch_contiguous` lays the
received rows out as FP8 ``[R, hidden]`` + FP32 scales ``[R, hidden / 128]``, local expert ``le``'s rows
in one segment starting at ``segment_starts[le]``, every segment padded to ``A =
get_mk_alignment_for_contiguous_layout()`` (read at construction) and the rows after the last segment
unused; ``m_indices`` (int32 [R]) holds the local expert of each valid row and -1 on every padding row;
``masked_m`` holds the rows per local expert, as in the masked form; ``recv_src_info`` (int32 [R]) the
routing words; ``block_valid`` (int32 [R / A]) how many leading rows of each A-row block are valid
(the segments start on block boundaries, so the valid rows of a block are a prefix of it).  The
capacity ``R`` (``contiguous_rows``) defaults to ``A * ceil((W * max_tokens_per_rank * topk + L * (A -
1)) / A)``, which no routing can overflow; a smaller one is checked (error, rows past it dropped).
Segment offsets are computed on the device: the ranks first exchange their per-expert counts
(``[W, E]`` int32 into every region, a bounded wait), then every sender derives the same prefix sums
and stores its rows at their final place; no host synchronisation, fixed grids, so the symm form is
capturable in a CUDA graph like the masked one.  Row order within a segment is that of the slot
atomics (not deterministic); the NCCL backend orders it by (source rank, token, k).
:meth:`EPCommunicator.combine_contiguous` sends the valid rows of an expert output ``[R, hidden]``
back (no SBO signals: prefill runs the stages back to back).

Backends
--------
``"symm"`` (default, one NVLink domain): one symmetric byte region per rank
(``torch.distributed._symmetric_memory``, multicast not used) written directly by Triton kernels
(:mod:`fp8gemm.kernels.ep_comm` describes the protocol).  No host synchronisation and no allocation:
capturable in a CUDA graph with a fixed batch size.  Every wait is bounded (``timeout_s`` on the GPU,
``max_spin_iters`` in the interpreter); a peer that never signals leaves an error that
:meth:`EPCommunicator.check` turns into a ``RuntimeError`` naming the rank (and expert), never a hang.
After such an error the communicator's state is undefined: create a new one.

Call order (symm form): one dispatch's receive buffers and slot counters are reused by the next. Every rank
must have consumed a dispatch (its receive step read the counters, its experts read the rows) before any
rank starts the next one. The layer's order (dispatch, expert GEMMs, combine) guarantees it: a rank's
combine waits for every peer's combine send, which comes after that peer's receive step and GEMMs. Two
dispatches back to back with nothing between them do not: a fast rank's next slot claims can reach a
peer's counters before that peer's receive step has read them. Put a combine or
:meth:`EPCommunicator.barrier` (on the device, bounded, capturable) between them.

``"nccl"`` (the multi-node path, for users who outgrow one NVLink domain): the same API over
``torch.distributed.all_to_all_single`` (any backend that has it: NCCL on GPUs, gloo on CPUs).  It
synchronises with the host (split sizes) and is therefore not graph-capturable; slot order is
deterministic (source rank, token, k).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import runtime
from .._checks import FP8, check_bool, check_int, check_tensor
from ..kernels import ep_comm as K
from ..kernels.moe_act import launch_combine_reduce

_BACKENDS = ("symm", "nccl")
_COMBINE_PAYLOADS = ("bf16", "fp8")
_DISPATCH_PAYLOADS = ("fp8", "fp4")



def _align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class SymmLayout:
    """Byte offsets of the sections of one rank's symmetric region (all 256-byte aligned)."""
    num_local_experts: int
    max_m: int
    hidden: int
    max_tokens: int
    topk: int
    world_size: int
    contig_rows: int = 0        # R of the contiguous form, 0 when it is not allocated

    @property
    def sf_cols(self) -> int:
        return math.ceil(self.hidden / 128)

    def sections(self) -> dict:
        L, M, H = self.num_local_experts, self.max_m, self.hidden
        sizes = {"x": L * M * H, "sf": L * M * self.sf_cols * 4, "meta": L * M * 4, "cnt": L * 4,
                 "dflag": self.world_size * 4, "cflag": self.world_size * 4, "bflag": self.world_size * 4,
                 "recv": self.max_tokens * self.topk * H * 2, "rsf": self.max_tokens * self.topk * self.sf_cols}
        if self.contig_rows:
            R, E = self.contig_rows, L * self.world_size
            sizes.update({"ccnt": self.world_size * E * 4, "aflag": self.world_size * 4, "cx": R * H,
                          "csf": R * self.sf_cols * 4, "cmeta": R * 4})
        out, off = {}, 0
        for name, size in sizes.items():
            out[name] = (off, size)
            off = _align(off + size)
        out["total"] = (0, off)
        return out


@dataclass
class DispatchOutput:
    """What the dispatch leaves on the owner rank (views of persistent buffers, valid until the next call)."""
    recv_x: torch.Tensor          # FP8 [L, max_m, hidden] (FP4 payload: uint8 [L, max_m, hidden / 2])
    recv_x_sf: torch.Tensor       # FP32 [L, max_m, hidden / 128] (FP4 payload: uint8 [L, max_m, hidden / 32])
    masked_m: torch.Tensor        # int32 [L]
    recv_src_info: torch.Tensor   # int32 [L, max_m], routing words (module docstring)


@dataclass
class ContiguousDispatchOutput:
    """The contiguous (prefill) form of a dispatch on the owner rank (views of persistent buffers)."""
    recv_x: torch.Tensor          # FP8 [R, hidden] (FP4 payload: uint8 [R, hidden / 2])
    recv_x_sf: torch.Tensor       # FP32 [R, hidden / 128] (FP4 payload: uint8 [R, hidden / 32])
    m_indices: torch.Tensor       # int32 [R]: local expert of each row, -1 on padding rows
    masked_m: torch.Tensor        # int32 [L]: rows received per local expert
    recv_src_info: torch.Tensor   # int32 [R], routing words of the valid rows
    segment_starts: torch.Tensor  # int32 [L]: first row of each local expert's segment
    block_valid: torch.Tensor     # int32 [R / alignment]: valid leading rows of each aligned block
    alignment: int


class EPCommunicator:
    """Dispatch / combine between the ranks of ``group`` (see the module docstring).

    Parameters: ``num_experts`` (a multiple of the group size), ``max_tokens_per_rank`` (the most
    tokens one rank passes per call), ``topk``, ``hidden`` (a multiple of 128), ``max_m`` (capacity per
    local expert, default ``world_size * max_tokens_per_rank``), ``backend`` ``"symm"`` or ``"nccl"``,
    ``timeout_s`` (bound of every wait on the GPU), ``max_spin_iters`` (bound in the interpreter),
    ``num_sms`` (programs of the dispatch kernel and of the combine without overlap; default all SMs),
    ``contiguous`` (also allocate the contiguous prefill form, see the module docstring),
    ``contiguous_rows`` (its capacity R, a multiple of the alignment; default: never overflows),
    ``combine_payload`` (``"bf16"`` or ``"fp8"``) and ``dispatch_payload`` (``"fp8"`` or ``"fp4"``), the latter
    two other than their defaults on the symm backend only (module docstring).
    """

    def __init__(self, group=None, *, num_experts: int, max_tokens_per_rank: int, topk: int, hidden: int,
                 max_m: int | None = None, backend: str = "symm", timeout_s: float = 10.0,
                 max_spin_iters: int = 1 << 16, num_sms: int | None = None, contiguous: bool = False,
                 contiguous_rows: int | None = None, combine_payload: str = "bf16",
                 dispatch_payload: str = "fp8", device=None, _simulated=None):
        import torch.distributed as dist
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if combine_payload not in _COMBINE_PAYLOADS:
            raise ValueError(f"combine_payload must be one of {_COMBINE_PAYLOADS}, got {combine_payload!r}")
        if combine_payload == "fp8" and backend != "symm":
            raise ValueError(f"combine_payload='fp8' needs the symm backend, got backend={backend!r}")
        self.combine_payload = combine_payload
        if dispatch_payload not in _DISPATCH_PAYLOADS:
            raise ValueError(f"dispatch_payload must be one of {_DISPATCH_PAYLOADS}, got {dispatch_payload!r}")
        if dispatch_payload == "fp4" and backend != "symm":
            raise ValueError(f"dispatch_payload='fp4' needs the symm backend, got backend={backend!r}")
        self.dispatch_payload = dispatch_payload
        if _simulated is not None:
            rank, world = _simulated["rank"], _simulated["world_size"]
        else:
            if group is None:
                group = dist.group.WORLD
            rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.group, self.backend, self.rank, self.world_size = group, backend, rank, world
        check_int("num_experts", num_experts, 1)
        check_int("max_tokens_per_rank", max_tokens_per_rank, 1)
        check_int("topk", topk, 1)
        check_int("hidden", hidden, 1)
        if num_experts % world:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the world size ({world})")
        if hidden % 128:
            raise ValueError(f"hidden must be a multiple of 128, got {hidden}")
        if topk > num_experts:
            raise ValueError(f"topk ({topk}) must be <= num_experts ({num_experts})")
        self.num_experts, self.topk, self.hidden = num_experts, topk, hidden
        self.max_tokens = max_tokens_per_rank
        self.num_local_experts = num_experts // world
        self.max_m = check_int("max_m", max_m, 1) if max_m is not None else world * max_tokens_per_rank
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        self.timeout_ns = int(timeout_s * 1e9)
        self.max_spin_iters = check_int("max_spin_iters", max_spin_iters, 1)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type != "cuda" and not runtime.interpreting() and backend == "symm":
            raise ValueError("the symm backend needs a CUDA device (or TRITON_INTERPRET=1 in a simulated world)")
        self.num_sms = num_sms if num_sms is not None else runtime._default_sms()
        self.use_timer = self.device.type == "cuda" and not runtime.interpreting()
        L, M, H = self.num_local_experts, self.max_m, hidden
        self.contiguous = check_bool("contiguous", contiguous)
        self.alignment = runtime.get_mk_alignment_for_contiguous_layout()
        R = 0
        if contiguous:
            R = contiguous_rows_bound(world, max_tokens_per_rank, topk, L, self.alignment)
            if contiguous_rows is not None:
                R = check_int("contiguous_rows", contiguous_rows, 1)
                if R % self.alignment:
                    raise ValueError(f"contiguous_rows ({R}) must be a multiple of the contiguous-layout "
                                     f"alignment {self.alignment}")
        elif contiguous_rows is not None:
            raise ValueError("contiguous_rows needs contiguous=True")
        self.contig_rows = R
        self.layout = SymmLayout(L, M, H, max_tokens_per_rank, topk, world, R)
        self.sf_cols = self.layout.sf_cols
        dev = self.device
        self.err = torch.zeros(4, dtype=torch.int32, device=dev)
        self.done = torch.zeros(3, dtype=torch.int32, device=dev)
        self.masked_m = torch.zeros(L, dtype=torch.int32, device=dev)
        self.cumulative_local_expert_recv_stats = torch.zeros(L, dtype=torch.int32, device=dev)
        self._handle = None
        self._last_tokens = None        # tokens of the last dispatch (host side): sizes the combine's tiles
        self.tile_override = None       # (rows, columns) of every sender's tile: tests only
        self.combine_trace = None       # int64 [items, 2]: per-item timer stamps of combine_send (benchmarks)
        self.recv_trace = None          # int64 [4]: timer stamps of combine_recv (benchmarks, see combine_recv)
        if backend == "symm":
            if _simulated is not None:
                self.region, self.tab = _simulated["region"], _simulated["tab"]
            else:
                self.region, self.tab = self._alloc_symmetric()
            self._views_from_region()
        else:
            self.recv_x = torch.zeros(L, M, H, dtype=FP8, device=dev)
            self.recv_x_sf = torch.zeros(L, M, self.sf_cols, dtype=torch.float32, device=dev)
            self.recv_src_info = torch.zeros(L, M, dtype=torch.int32, device=dev)
            self.combine_recv_buf = torch.zeros(max_tokens_per_rank, topk, H, dtype=torch.bfloat16, device=dev)
            if R:
                self.crecv_x = torch.zeros(R, H, dtype=FP8, device=dev)
                self.crecv_x_sf = torch.zeros(R, self.sf_cols, dtype=torch.float32, device=dev)
                self.crecv_src_info = torch.zeros(R, dtype=torch.int32, device=dev)
        if R:       # local (non-symmetric) state of the contiguous form
            E, i32 = num_experts, torch.int32
            self._ccnt_local = torch.zeros(E, dtype=i32, device=dev)        # zero between calls
            self._slot_of = torch.zeros(max_tokens_per_rank * topk, dtype=i32, device=dev)
            self._send_base = torch.zeros(E, dtype=i32, device=dev)
            self.segment_starts = torch.zeros(L, dtype=i32, device=dev)
            self.m_indices = torch.full((R,), -1, dtype=i32, device=dev)
            self.block_valid = torch.zeros(R // self.alignment, dtype=i32, device=dev)

    # ------------------------------------------------------------------ symmetric memory set-up
    def _alloc_symmetric(self):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        nbytes = self.layout.sections()["total"][1]
        group_name = self.group.group_name if hasattr(self.group, "group_name") else self.group
        if hasattr(symm_mem, "enable_symm_mem_for_group"):      # needed by older torch, a no-op later
            try:
                symm_mem.enable_symm_mem_for_group(group_name)
            except Exception:       # noqa: BLE001  (deprecated / already enabled)
                pass
        region = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        region.zero_()
        torch.cuda.synchronize(self.device)
        hdl = symm_mem.rendezvous(region, group_name)
        ptrs = []
        for p in range(self.world_size):
            peer = region if p == self.rank else hdl.get_buffer(p, (nbytes,), torch.uint8,
                                                                region.data_ptr() - hdl.buffer_ptrs[self.rank])
            ptrs.append(peer.data_ptr())
        self._handle = hdl
        dist.barrier(group=self.group)      # every region is zeroed before any peer writes into it
        return region, torch.tensor(ptrs, dtype=torch.int64, device=self.device)

    def _views_from_region(self):
        s, r = self.layout.sections(), self.region
        L, M, H = self.num_local_experts, self.max_m, self.hidden

        def sec(name, dtype, shape):
            off, size = s[name]
            return r[off:off + size].view(dtype).view(*shape)
        if self.dispatch_payload == "fp4":     # the FP4 form's rows in the first half of the FP8 form's bytes
            self.recv_x = sec("x", torch.uint8, (2, L, M, H // 2))[0]
            self.recv_x_sf = sec("sf", torch.uint8, (L, M, H // 32))
        else:
            self.recv_x = sec("x", torch.uint8, (L, M, H)).view(FP8)
            self.recv_x_sf = sec("sf", torch.float32, (L, M, self.sf_cols))
        self.recv_src_info = sec("meta", torch.int32, (L, M))
        self.combine_recv_buf = sec("recv", torch.bfloat16, (self.max_tokens, self.topk, H))
        # the FP8 payload: codes in the first half of the same section, scale bytes in their own
        self.combine_recv_codes = sec("recv", torch.uint8, (2, self.max_tokens, self.topk, H))[0].view(FP8)
        self.combine_recv_sf = sec("rsf", torch.uint8, (self.max_tokens, self.topk, self.sf_cols))
        if self.contig_rows:
            R = self.contig_rows
            if self.dispatch_payload == "fp4":
                self.crecv_x = sec("cx", torch.uint8, (2, R, H // 2))[0]
                self.crecv_x_sf = sec("csf", torch.uint8, (R, H // 32))
            else:
                self.crecv_x = sec("cx", torch.uint8, (R, H)).view(FP8)
                self.crecv_x_sf = sec("csf", torch.float32, (R, self.sf_cols))
            self.crecv_src_info = sec("cmeta", torch.int32, (R,))
        self.offsets = {k: v[0] for k, v in s.items()}

    # ------------------------------------------------------------------ argument checks
    def _check_tokens(self, xq, xsf, topk_idx):
        fp4 = self.dispatch_payload == "fp4"
        cols = self.hidden // 2 if fp4 else self.hidden
        check_tensor("x", xq, dtype=torch.uint8 if fp4 else FP8, ndim=2)
        t = xq.shape[0]
        if xq.shape[1] != cols:
            raise ValueError(f"x must have shape [T, {cols}]" + (" (FP4 codes, two a byte)" if fp4 else "")
                             + f", got {list(xq.shape)}")
        if t > self.max_tokens:
            raise ValueError(f"x has {t} tokens, more than max_tokens_per_rank={self.max_tokens}")
        if fp4:
            check_tensor("x_sf", xsf, dtype=torch.uint8, shape=(t, self.hidden // 32))
        else:
            check_tensor("x_sf", xsf, dtype=torch.float32, shape=(t, self.sf_cols))
        check_tensor("topk_idx", topk_idx, dtype=(torch.int64, torch.int32), shape=(t, self.topk))
        for name, v in (("x", xq), ("x_sf", xsf), ("topk_idx", topk_idx)):
            if v.device != self.device:
                raise ValueError(f"{name} must be on {self.device}, got {v.device}")
        if xq.stride(1) != 1 or xsf.stride(1) != 1:
            raise ValueError("x and x_sf must be row-major (unit stride along the last dim)")

    def check(self) -> None:
        """Raise ``RuntimeError`` if a kernel of this communicator recorded an error (synchronises)."""
        err = self.err.tolist()
        if err[0] == 0:
            return
        code, a, b, c = err
        g = self.rank * self.num_local_experts + a
        what = K.ERROR_CODES.get(code, "unknown error {a} {b} {c}").format(a=a, b=b, c=c, g=g)
        if code in (1, 3, 6, 7):
            lo = a * self.num_local_experts
            what += f" (owner of experts {lo}..{lo + self.num_local_experts - 1})"
        raise RuntimeError(f"EP rank {self.rank}/{self.world_size}: {what}")

    # ------------------------------------------------------------------ barrier
    def barrier(self) -> None:
        """Every rank waits (on the device, in stream order) until every rank has reached this call: what
        two dispatches need between them when no combine separates them (module docstring, "Call order").
        symm: a release flag to every rank, then a bounded spin on this rank's flags (a peer that never
        arrives leaves an error naming it for :meth:`check`; capturable in a CUDA graph); nccl:
        ``torch.distributed.barrier``."""
        if self.backend == "nccl":
            import torch.distributed as dist
            dist.barrier(group=self.group)
            return
        self._barrier_arrive()
        self._barrier_wait()

    def _barrier_arrive(self) -> None:
        K.signal_all_kernel[(1,)](self.tab, self.rank, self.offsets["bflag"], W=self.world_size, num_warps=1)

    def _barrier_wait(self) -> None:
        K.wait_arrivals_kernel[(1,)](self.region, self.err, self.offsets["bflag"], 7, self.max_spin_iters,
                                     self.timeout_ns, W=self.world_size, USE_TIMER=self.use_timer, num_warps=1)

    # ------------------------------------------------------------------ dispatch
    def dispatch_send(self, xq: torch.Tensor, xsf: torch.Tensor, topk_idx: torch.Tensor) -> None:
        """Send every (token, k) to its expert's owner (first half of :meth:`dispatch`)."""
        self._check_tokens(xq, xsf, topk_idx)
        if self.backend == "nccl":
            self._nccl_dispatch(xq, xsf, topk_idx)
            return
        o = self.offsets
        t = xq.shape[0]
        self._last_tokens = t
        br, bh, warps, programs = self._dispatch_tiles(t)
        xb, sfw = self._payload_words(xq, xsf)
        K.dispatch_send_kernel[(programs,)](
            xb, sfw, topk_idx, self.tab, self.done[0:], t, self.rank, self.num_experts,
            xb.stride(0), sfw.stride(0), topk_idx.stride(0), topk_idx.stride(1),
            o["x"], o["sf"], o["meta"], o["cnt"], o["dflag"], self.max_m, self.max_tokens,
            H=self._row_bytes, SFH=self.sf_cols, TOPK=self.topk, L=self.num_local_experts, W=self.world_size,
            BLOCK_R=br, BLOCK_H=bh, BLOCK_SF=triton_next_pow2(self.sf_cols), num_warps=warps)

    @property
    def _row_bytes(self) -> int:
        """Bytes of a dispatched token's codes: hidden (FP8) or hidden / 2 (FP4)."""
        return self.hidden // 2 if self.dispatch_payload == "fp4" else self.hidden

    def _payload_words(self, xq, xsf):
        """The senders' view of a token batch: codes as bytes, scales as FP32 words (the FP4 form's
        ``hidden / 32`` scale bytes are ``hidden / 128`` words, the FP8 form's slot, moved as they are)."""
        if self.dispatch_payload == "fp4":
            if xsf.stride(0) % 4 or xsf.storage_offset() % 4:
                xsf = xsf.contiguous()
            return xq, xsf.view(torch.float32)
        return xq.view(torch.uint8), xsf

    def _dispatch_tiles(self, t: int):
        """(BLOCK_R, BLOCK_H, num_warps, programs) of a dispatch sender for ``t`` tokens: about one row
        block of the ``t * topk`` rows per program, at most 16 rows, so small batches spread over many
        SMs (latency) and large ones move 16 rows x hidden per program with the loads of one tile in
        flight behind the stores of the previous one (bandwidth); ``self.tile_override`` (tests) forces
        ``(BLOCK_R, BLOCK_H)``."""
        rows = t * self.topk
        br, bh = send_tile(-(-rows // max(1, self.num_sms)), self._row_bytes, 1)
        if self.tile_override is not None:
            br, bh = self.tile_override
        programs = max(1, min(self.num_sms, -(-rows // br)))
        return br, bh, (8 if br * bh >= 8192 else 4), programs

    def dispatch_recv(self) -> DispatchOutput:
        """Wait for every peer's tokens and publish ``masked_m`` (second half of :meth:`dispatch`)."""
        if self.backend == "symm":
            o = self.offsets
            K.dispatch_recv_kernel[(1,)](
                self.region, self.err, self.masked_m, self.cumulative_local_expert_recv_stats,
                o["cnt"], o["dflag"], self.max_m, self.max_spin_iters, self.timeout_ns,
                W=self.world_size, L=self.num_local_experts, BLOCK_L=triton_next_pow2(self.num_local_experts),
                USE_TIMER=self.use_timer, num_warps=4)
        return DispatchOutput(self.recv_x, self.recv_x_sf, self.masked_m, self.recv_src_info)

    def dispatch(self, xq: torch.Tensor, xsf: torch.Tensor, topk_idx: torch.Tensor) -> DispatchOutput:
        """Quantised tokens (``xq`` FP8 [T, hidden], ``xsf`` FP32 [T, hidden/128]) and their experts
        (``topk_idx`` [T, topk]) -> the masked receive buffers of this rank's experts."""
        self.dispatch_send(xq, xsf, topk_idx)
        return self.dispatch_recv()

    # ------------------------------------------------------------------ combine
    def combine_send(self, expert_out: torch.Tensor, *, signal: torch.Tensor | None = None,
                     block_m: int | None = None, threshold: int | None = None,
                     num_sms: int | None = None, experts: tuple[int, int] | None = None,
                     parts: int = 1, arrive_total: int | None = None, trace_base: int = 0,
                     expert_out_sf: torch.Tensor | None = None) -> None:
        """Send the rows ``< masked_m`` of ``expert_out`` (BF16 [L, max_m, hidden]) back to their sources.

        With the FP8 combine payload the rows may come cast already: ``expert_out`` FP8 E4M3 and
        ``expert_out_sf`` their UE8M0 bytes uint8 [L, max_m, hidden / 128] (what the masked GEMM writes with
        ``d_sf``, :func:`fp8gemm.m_grouped_fp8_gemm_nt_masked`); they are then copied as they are.

        With ``signal`` (the SBO counters of the masked GEMM that is producing ``expert_out``, and the
        ``(block_m, threshold)`` it returned) each m-block is sent as soon as its counter reaches the
        threshold; the kernel zeroes each counter it consumed, so the array is ready for the next call.

        One combine may be sent by two launches (the overlapped layer: most experts on a few SMs while the
        GEMM runs, the experts it finishes last on all SMs after it; ``MoELayer._combine_launches``):
        ``experts`` = ``(lo, hi)`` restricts this launch to local experts ``[lo, hi)``, ``parts`` cuts each
        m-block's rows into that many ranges on different programs, and ``arrive_total`` is the number of
        programs of all launches of this combine (the last of them signals the peers; default: this one's).
        Use :meth:`combine_programs` for each launch's program count.

        ``self.combine_trace`` (benchmarks; int64 [items, 2], None by default; GPU only): each work item of
        this launch records the global timer after its counter wait and after its stores at row
        ``trace_base + item`` (items ``u * parts + s`` over the launch's units ``u``; rows of empty units are
        left as they were).
        """
        L, M, H = self.num_local_experts, self.max_m, self.hidden
        precast = expert_out_sf is not None
        if precast:
            if self.combine_payload != "fp8":
                raise ValueError("expert_out_sf (an FP8 expert output) needs combine_payload='fp8'")
            check_tensor("expert_out", expert_out, dtype=FP8, shape=(L, M, H))
            check_tensor("expert_out_sf", expert_out_sf, dtype=torch.uint8, shape=(L, M, H // 128))
            if expert_out_sf.stride(2) != 1 or expert_out_sf.device != expert_out.device:
                raise ValueError(f"expert_out_sf must be row-major and on {expert_out.device}")
        else:
            check_tensor("expert_out", expert_out, dtype=torch.bfloat16, shape=(L, M, H))
        if expert_out.stride(2) != 1:
            raise ValueError("expert_out must be row-major (unit stride along hidden)")
        g_lo, g_hi = (0, L) if experts is None else experts
        check_int("experts[0]", g_lo, 0)
        check_int("experts[1]", g_hi, g_lo + 1)
        if g_hi > L:
            raise ValueError(f"experts must lie in [0, {L}], got ({g_lo}, {g_hi})")
        check_int("parts", parts, 1)
        if self.backend == "nccl":
            if signal is not None or experts is not None:
                raise ValueError("signal (overlap) and experts are only supported by the symm backend")
            self._nccl_combine(expert_out)
            return
        wait = signal is not None
        if wait:
            check_tensor("signal", signal, dtype=torch.int32, ndim=1)
            check_int("block_m", block_m, 1)
            check_int("threshold", threshold, 0)
            if signal.numel() < L * math.ceil(M / block_m):
                raise ValueError(f"signal must hold L * ceil(max_m / block_m) = {L * math.ceil(M / block_m)} "
                                 f"counters, got {signal.numel()}")
        else:
            block_m, threshold, signal = 64, 0, self.err    # signal unused
        nb = math.ceil(M / block_m)
        o = self.offsets
        programs = self.combine_programs(num_sms, g_hi - g_lo, block_m, parts)
        if arrive_total is None:
            arrive_total = programs
        check_int("arrive_total", arrive_total, programs)
        expected = min(block_m, self._expected_rows())
        rows, bh = self._combine_tiles(-(-expected // parts), 1 if precast else 2)
        extra = self._payload_args()
        if precast:
            extra.update(dsf_ptr=expert_out_sf, stride_sg=expert_out_sf.stride(0), stride_sm=expert_out_sf.stride(1),
                         PRECAST=True, BLOCK_SG=triton_next_pow2(H // 128))
            expert_out = expert_out.view(torch.uint8)
        K.combine_send_kernel[(programs,)](
            expert_out, self.region, self.tab, self.masked_m, signal, self.err, self.done[1:], self.rank,
            expert_out.stride(0), expert_out.stride(1), o["meta"], o["recv"], o["cflag"], M, self.max_tokens,
            block_m, threshold, nb, parts, g_lo, g_hi, arrive_total, self.max_spin_iters, self.timeout_ns,
            H=H, TOPK=self.topk, L=L, W=self.world_size, ROWS=rows, BLOCK_H=bh, BLOCK_L=triton_next_pow2(L),
            WAIT_SIGNAL=wait, USE_TIMER=self.use_timer, num_warps=8 if rows * bh >= 4096 else 4,
            **extra,
            **self._trace_args("combine_trace", trace_base + (g_hi - g_lo) * nb * parts, trace_base=trace_base))

    def _payload_args(self) -> dict:
        """The combine sender's arguments of the FP8 payload (none for BF16)."""
        if self.combine_payload != "fp8":
            return {}
        return dict(OFF_RSF=self.offsets["rsf"], FP8=True, SOFT=runtime.interpreting())

    def _trace_args(self, name: str, rows: int, **extra) -> dict:
        """The kernel arguments of the benchmark-only timer stamps held in ``self.<name>`` (int64, at least
        ``rows`` rows of 2 stamps for ``combine_trace``, 4 stamps for ``recv_trace``): none where it is None or
        there is no global timer (the interpreter)."""
        t = getattr(self, name)
        if t is None:
            return {}
        shape = (rows, 2) if name == "combine_trace" else (4,)
        if t.dtype != torch.int64 or t.dim() != len(shape) or t.shape[1:] != shape[1:] or t.device != self.device:
            raise ValueError(f"{name} must be int64 {['items', 2] if len(shape) == 2 else [4]} on {self.device}")
        if t.shape[0] < shape[0]:
            raise ValueError(f"{name} holds {t.shape[0]} rows, this launch needs {shape[0]}")
        return dict(trace_ptr=t, TRACE=True, **extra) if self.use_timer else {}

    def combine_programs(self, num_sms: int | None, experts: int, block_m: int = 64, parts: int = 1) -> int:
        """Programs of a :meth:`combine_send` launch over ``experts`` local experts: ``num_sms`` (default the
        communicator's), at most one per work item."""
        items = experts * math.ceil(self.max_m / block_m) * parts
        return max(1, min(max(1, num_sms or self.num_sms), items))

    def _expected_rows(self) -> int:
        """Rows an m-block of a local expert holds on average for the last dispatch's batch (uniform routing)."""
        t = self._last_tokens if self._last_tokens is not None else self.max_tokens
        return max(1, -(-self.world_size * t * self.topk // self.num_experts))

    def _combine_tiles(self, rows_per_block: int, elem_bytes: int = 2):
        """(ROWS, BLOCK_H) of the combine sender: a tile of 16 K BF16 elements (32 KB; 16 KB of FP8 codes when
        they are copied as they are) shaped to the rows a block holds (one row x the whole hidden for tiny
        batches, 16 rows x 1024 for large ones)."""
        if self.tile_override is not None:
            return self.tile_override
        return send_tile(rows_per_block, self.hidden, elem_bytes, tile_bytes=16384 * elem_bytes)

    def combine_recv(self, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Wait for every peer's rows and reduce: ``out[t] = sum_k w[t, k] * recv[t, k]`` (BF16 [T, hidden]; with
        the FP8 payload ``recv`` is the de-quantised codes, :func:`fp8gemm.reference.combine_reduce`).

        ``self.recv_trace`` (benchmarks; int64 [4] zeros, None by default; GPU only, symm backend): the global
        timer (ns) when the arrival wait starts, when the arrivals are all in, when the reduce starts, and when
        its last program ends (kept as a maximum over calls)."""
        t = topk_idx.shape[0] if isinstance(topk_idx, torch.Tensor) else 0
        check_tensor("topk_idx", topk_idx, dtype=(torch.int64, torch.int32), shape=(t, self.topk))
        check_tensor("topk_weights", topk_weights, dtype=(torch.float32, torch.bfloat16), shape=(t, self.topk))
        if out is None:
            out = torch.empty(t, self.hidden, dtype=torch.bfloat16, device=self.device)
        check_tensor("out", out, dtype=torch.bfloat16, shape=(t, self.hidden))
        trace = self._trace_args("recv_trace", 4) if self.backend == "symm" else {}
        if self.backend == "symm":
            K.combine_recv_kernel[(1,)](self.region, self.err, self.offsets["cflag"], self.max_spin_iters,
                                        self.timeout_ns, W=self.world_size, USE_TIMER=self.use_timer, num_warps=1,
                                        **trace)
        if self.combine_payload == "fp8":
            if t:
                launch_combine_reduce(self.combine_recv_codes[:t], self.combine_recv_sf[:t], topk_weights, topk_idx,
                                      out, runtime.interpreting(), num_experts=self.num_experts,
                                      trace=trace.get("trace_ptr"))
            return out
        return combine_reduce_bf16(self.combine_recv_buf, topk_idx, topk_weights, out, self.num_experts,
                                   trace=trace.get("trace_ptr"))

    def combine(self, expert_out, topk_idx, topk_weights, out=None, **kw) -> torch.Tensor:
        self.combine_send(expert_out, **kw)
        return self.combine_recv(topk_idx, topk_weights, out)

    # ------------------------------------------------------------------ contiguous form (prefill)
    def _check_contiguous(self):
        if not self.contig_rows:
            raise RuntimeError("the contiguous form needs an EPCommunicator created with contiguous=True")
        a = runtime.get_mk_alignment_for_contiguous_layout()
        if a != self.alignment:
            raise ValueError(f"get_mk_alignment_for_contiguous_layout() is {a}, but this communicator laid out "
                             f"its contiguous buffers for {self.alignment}: create it after setting the alignment")

    def dispatch_contiguous_counts(self, xq: torch.Tensor, xsf: torch.Tensor, topk_idx: torch.Tensor) -> None:
        """Step 1 of :meth:`dispatch_contiguous`: every rank's per-expert counts to every rank (symm);
        the whole exchange on the NCCL backend."""
        self._check_contiguous()
        self._check_tokens(xq, xsf, topk_idx)
        if self.backend == "nccl":
            self._nccl_dispatch(xq, xsf, topk_idx, contiguous=True)
            return
        t, o = xq.shape[0], self.offsets
        self._last_tokens = t
        br = max(1, min(128, triton_next_pow2(-(-t * self.topk // max(1, self.num_sms)))))
        K.dispatch_count_kernel[(max(1, min(self.num_sms, -(-t * self.topk // br))),)](
            topk_idx, self._ccnt_local, self._slot_of, self.tab, self.done[2:], t, self.rank, self.num_experts,
            topk_idx.stride(0), topk_idx.stride(1), o["ccnt"], o["aflag"],
            TOPK=self.topk, E=self.num_experts, W=self.world_size, BLOCK_E=triton_next_pow2(self.num_experts),
            BLOCK_R=br, num_warps=4)

    def dispatch_contiguous_send(self, xq: torch.Tensor, xsf: torch.Tensor, topk_idx: torch.Tensor) -> None:
        """Step 2: wait for every rank's counts, derive the segment layout, store the rows (symm)."""
        if self.backend == "nccl":
            return
        t, o = xq.shape[0], self.offsets
        L, E, W, A = self.num_local_experts, self.num_experts, self.world_size, self.alignment
        K.contig_layout_kernel[(1,)](
            self.region, self.err, self._send_base, self.masked_m, self.cumulative_local_expert_recv_stats,
            self.segment_starts, self.rank, self.contig_rows, A, self.max_spin_iters, self.timeout_ns,
            o["ccnt"], o["aflag"], E=E, L=L, W=W, BLOCK_E=triton_next_pow2(E), BLOCK_W=triton_next_pow2(W),
            USE_TIMER=self.use_timer, num_warps=4)
        K.contig_index_kernel[(self.contig_rows // A,)](
            self.segment_starts, self.masked_m, self.m_indices, self.block_valid, A,
            L=L, BLOCK_L=triton_next_pow2(L), BLOCK_A=triton_next_pow2(A), num_warps=4)
        br, bh, warps, programs = self._dispatch_tiles(t)
        xb, sfw = self._payload_words(xq, xsf)
        K.dispatch_send_contig_kernel[(programs,)](
            xb, sfw, topk_idx, self._slot_of, self._send_base, self.tab, self.done[0:], t,
            self.rank, E, xb.stride(0), sfw.stride(0), topk_idx.stride(0), topk_idx.stride(1),
            o["cx"], o["csf"], o["cmeta"], o["dflag"], self.contig_rows, self.max_tokens,
            H=self._row_bytes, SFH=self.sf_cols, TOPK=self.topk, L=L, W=W,
            BLOCK_R=br, BLOCK_H=bh, BLOCK_SF=triton_next_pow2(self.sf_cols), num_warps=warps)

    def dispatch_contiguous_recv(self) -> ContiguousDispatchOutput:
        """Step 3: wait for every peer's rows (symm)."""
        self._check_contiguous()
        if self.backend == "symm":
            K.wait_arrivals_kernel[(1,)](self.region, self.err, self.offsets["dflag"], 1, self.max_spin_iters,
                                         self.timeout_ns, W=self.world_size, USE_TIMER=self.use_timer, num_warps=1)
        return ContiguousDispatchOutput(self.crecv_x, self.crecv_x_sf, self.m_indices, self.masked_m,
                                        self.crecv_src_info, self.segment_starts, self.block_valid, self.alignment)

    def dispatch_contiguous(self, xq: torch.Tensor, xsf: torch.Tensor, topk_idx: torch.Tensor
                            ) -> ContiguousDispatchOutput:
        """Like :meth:`dispatch`, into the contiguous layout of the grouped GEMM (module docstring)."""
        self.dispatch_contiguous_counts(xq, xsf, topk_idx)
        self.dispatch_contiguous_send(xq, xsf, topk_idx)
        return self.dispatch_contiguous_recv()

    def combine_contiguous_send(self, expert_out: torch.Tensor, num_sms: int | None = None) -> None:
        """Send the valid rows (``m_indices >= 0``) of ``expert_out`` (BF16 [R, hidden]) back to their sources."""
        self._check_contiguous()
        R, H, A = self.contig_rows, self.hidden, self.alignment
        check_tensor("expert_out", expert_out, dtype=torch.bfloat16, shape=(R, H))
        if expert_out.stride(1) != 1:
            raise ValueError("expert_out must be row-major (unit stride along hidden)")
        if self.backend == "nccl":
            self._nccl_combine(expert_out)
            return
        nblk, o = R // A, self.offsets
        rows, bh = self._combine_tiles(A)
        # the kernel of the masked form on the block view [R / A, A, hidden] with block_valid as masked_m
        K.combine_send_kernel[(max(1, min(num_sms or self.num_sms, nblk)),)](
            expert_out, self.region, self.tab, self.block_valid, self.err, self.err, self.done[1:], self.rank,
            A * expert_out.stride(0), expert_out.stride(0), o["cmeta"], o["recv"], o["cflag"], A, self.max_tokens,
            A, 0, 1, 1, 0, nblk, -1, self.max_spin_iters, self.timeout_ns,
            H=H, TOPK=self.topk, L=nblk, W=self.world_size, ROWS=rows, BLOCK_H=bh,
            BLOCK_L=triton_next_pow2(nblk), WAIT_SIGNAL=False, USE_TIMER=self.use_timer,
            num_warps=8 if rows * bh >= 4096 else 4, **self._payload_args())

    def combine_contiguous(self, expert_out, topk_idx, topk_weights, out=None) -> torch.Tensor:
        """:meth:`combine_contiguous_send` then :meth:`combine_recv` (the reduction is the same)."""
        self.combine_contiguous_send(expert_out)
        return self.combine_recv(topk_idx, topk_weights, out)

    # ------------------------------------------------------------------ NCCL (all_to_all_single) path
    def _nccl_dispatch(self, xq, xsf, topk_idx, contiguous: bool = False):
        import torch.distributed as dist
        W, L, E, K_ = self.world_size, self.num_local_experts, self.num_experts, self.topk
        T, H, dev = xq.shape[0], self.hidden, self.device
        idx = topk_idx.long()
        valid = (idx >= 0) & (idx < E)
        t_i, k_i = valid.nonzero(as_tuple=True)
        e = idx[t_i, k_i]
        order = torch.argsort(e * (T * K_) + t_i * K_ + k_i)       # by owner, expert, token, k
        t_i, k_i, e = t_i[order], k_i[order], e[order]
        dest = e // L
        send_counts = torch.bincount(dest, minlength=W)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        word = (self.rank * self.max_tokens * K_ + t_i * K_ + k_i).to(torch.int32)
        ints = torch.stack([(e - dest * L).to(torch.int32), word], dim=1)
        payload = torch.cat([xq[t_i].view(torch.uint8), xsf[t_i].contiguous().view(torch.uint8),
                             ints.view(torch.uint8)], dim=1)
        rb = payload.shape[1]
        n_recv = sum(recv_splits)
        recv = torch.empty(n_recv, rb, dtype=torch.uint8, device=dev)
        dist.all_to_all_single(recv, payload.contiguous(), recv_splits, send_splits, group=self.group)
        rx = recv[:, :H].contiguous().view(FP8)
        rsf = recv[:, H:H + 4 * self.sf_cols].contiguous().view(torch.float32)
        rints = recv[:, H + 4 * self.sf_cols:].contiguous().view(torch.int32)
        le, rword = rints[:, 0].long(), rints[:, 1]
        counts = torch.bincount(le, minlength=L)
        starts = torch.cumsum(counts, 0) - counts
        grp_order = torch.argsort(le, stable=True)                  # keeps (source rank, token, k) order
        slot = torch.empty_like(le)
        slot[grp_order] = torch.arange(n_recv, device=dev) - starts[le[grp_order]]
        if contiguous:
            A, R = self.alignment, self.contig_rows
            padded = (counts + A - 1) // A * A
            starts = torch.cumsum(padded, 0) - padded
            over = (starts + counts > R).nonzero().flatten()
            if over.numel():
                a = int(over[0])
                self.err.copy_(torch.tensor([5, a, int(starts[a] + counts[a]), R], dtype=torch.int32))
                self.check()
            row = starts[le] + slot
            self.crecv_x[row] = rx
            self.crecv_x_sf[row] = rsf
            self.crecv_src_info[row] = rword
            self.m_indices.fill_(-1)
            self.m_indices[row] = le.to(torch.int32)
            self.block_valid.copy_((self.m_indices.view(-1, A) >= 0).sum(1).to(torch.int32))
            self.segment_starts.copy_(starts.to(torch.int32))
            where = (row,)
        else:
            over = (counts > self.max_m).nonzero().flatten()
            if over.numel():
                a = int(over[0])
                self.err.copy_(torch.tensor([4, a, int(counts[a]), self.max_m], dtype=torch.int32))
                self.check()
            self.recv_x[le, slot] = rx
            self.recv_x_sf[le, slot] = rsf
            self.recv_src_info[le, slot] = rword
            where = (le, slot)
        self.masked_m.copy_(counts.to(torch.int32))
        self.cumulative_local_expert_recv_stats += self.masked_m
        self._nccl_handle = (send_splits, recv_splits, where, t_i, k_i)

    def _nccl_combine(self, expert_out):
        import torch.distributed as dist
        send_splits, recv_splits, where, t_i, k_i = self._nccl_handle
        if expert_out.dim() != len(where) + 1:
            raise ValueError("the combine's layout (masked / contiguous) must match that of the last dispatch")
        rows = expert_out[where].contiguous().view(torch.uint8)   # BF16 bytes (gloo has no BF16/int16)
        back = torch.empty(len(t_i), 2 * self.hidden, dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(back, rows, send_splits, recv_splits, group=self.group)
        self.combine_recv_buf[t_i, k_i] = back.view(torch.bfloat16)


def contiguous_rows_bound(world_size: int, max_tokens_per_rank: int, topk: int, num_local_experts: int,
                          alignment: int) -> int:
    """Rows of a contiguous receive buffer that no routing overflows: every (token, k) of every rank,
    plus the padding of each local expert's segment, rounded up to the alignment."""
    n = world_size * max_tokens_per_rank * topk + num_local_experts * (alignment - 1)
    return (n + alignment - 1) // alignment * alignment


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def send_tile(rows: int, hidden: int, elem_bytes: int, tile_bytes: int = 16384, max_rows: int = 16):
    """``(BLOCK_R, BLOCK_H)`` of a row-moving tile: ``BLOCK_R`` the power of two <= ``rows`` (1..16),
    ``BLOCK_H`` so that the tile holds about ``tile_bytes`` (at most the whole row, at least 128)."""
    br = 1 << max(0, min(max_rows, max(1, int(rows))).bit_length() - 1)
    bh = max(128, min(triton_next_pow2(hidden), tile_bytes // elem_bytes // br))
    return br, bh


def combine_reduce_bf16(recv: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        out: torch.Tensor, num_experts: int, trace: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = bf16(sum_k w[t, k] * recv[t, k])`` over valid experts, FP32 accumulation in k order.
    ``trace`` (benchmarks, GPU only): :attr:`EPCommunicator.recv_trace`, slots 2 and 3."""
    t, h = out.shape
    if t == 0:
        return out
    block_h = min(1024, triton_next_pow2(h))
    K.combine_reduce_kernel[(t, math.ceil(h / block_h))](
        recv, topk_idx, topk_weights, out, num_experts,
        recv.stride(0), recv.stride(1), topk_idx.stride(0), topk_idx.stride(1),
        topk_weights.stride(0), topk_weights.stride(1), out.stride(0),
        H=h, TOPK=topk_idx.shape[1], BLOCK_H=block_h, num_warps=4,
        **({} if trace is None else dict(trace_ptr=trace, TRACE=True)))
    return out


def make_simulated_world(world_size: int, **kwargs) -> list[EPCommunicator]:
    """``world_size`` symm-backend communicators living in one process (regions are plain tensors).

    For tests in the interpreter: run every rank's ``*_send`` before any rank's ``*_recv`` (the
    kernels of one process run one after another).  ``kwargs`` as for :class:`EPCommunicator`.
    """
    check_int("world_size", world_size, 1)
    device = torch.device(kwargs.pop("device", "cpu"))
    L = kwargs["num_experts"] // world_size
    rows = 0
    if kwargs.get("contiguous"):
        rows = kwargs.get("contiguous_rows") or contiguous_rows_bound(
            world_size, kwargs["max_tokens_per_rank"], kwargs["topk"], L,
            runtime.get_mk_alignment_for_contiguous_layout())
    probe = SymmLayout(L, kwargs.get("max_m") or world_size * kwargs["max_tokens_per_rank"], kwargs["hidden"],
                       kwargs["max_tokens_per_rank"], kwargs["topk"], world_size, rows)
    nbytes = probe.sections()["total"][1]
    regions = [torch.zeros(nbytes, dtype=torch.uint8, device=device) for _ in range(world_size)]
    tab = torch.tensor([r.data_ptr() for r in regions], dtype=torch.int64, device=device)
    return [EPCommunicator(None, device=device, _simulated={"rank": r, "world_size": world_size,
                                                             "region": regions[r], "tab": tab.clone()}, **kwargs)
            for r in range(world_size)]
