"""Expert-parallel MoE layer with Single Batch Overlap (SBO).

``MoELayer(comm, w13, w2).forward(x, topk_idx, topk_weights, overlap=True) -> y``:

1. quantise the tokens once (FP8, one scale per token per 128 columns; or FP4 with the communicator's
   ``dispatch_payload="fp4"``) and **dispatch** them into the owners' masked buffers ``[L, max_m, hidden]``
   (:class:`fp8gemm.moe.ep.EPCommunicator`);
2. **expert compute** on the owner: masked L1 GEMM (gate and up fused, ``N = 2 * inter``), SwiGLU
   fused with the FP8 re-quantisation of its output (:mod:`fp8gemm.kernels.swiglu`, rows < masked_m
   only), masked L2 GEMM;
3. **combine**: the L2 rows go back to their source ranks (BF16, or FP8 with ``combine_payload="fp8"``),
   which reduce ``y[t] = sum_k w[t, k] * o[t, k]``.

With ``overlap=True`` (symm backend on a GPU) the L2 GEMM runs with ``enable_overlap=True`` on
``num_gemm_sms`` SMs while the combine kernel runs on a second stream with the other SMs, sending each
m-block as soon as the GEMM's counter for it reaches the threshold (DESIGN.md §3).  The last
``tail_experts`` local experts (the GEMM walks the experts in order, so it finishes them last) are sent by a
second launch on the main stream right after the GEMM, on every SM, instead (``MoELayer._combine_launches``):
otherwise the block finished last is sent by one communication SM after the GEMM has ended.  ``overlap=False``
runs the same stages back to back (the safe choice where overlap is unavailable; the NCCL backend
always runs this way).  ``overlap="auto"`` (the default of :meth:`MoELayer.forward`) overlaps only where
the combine is big enough to pay for the SMs the GEMM gives up (:meth:`MoELayer.overlap_pays`).

``layout="contiguous"`` (prefill; the communicator must be created with ``contiguous=True``) runs the
same layer on the contiguous grouped layout instead: the dispatch lays each rank's received rows out
per local expert, each segment padded to ``get_mk_alignment_for_contiguous_layout()`` with
``m_indices = -1`` rows (:meth:`fp8gemm.moe.ep.EPCommunicator.dispatch_contiguous`); L1 and L2 are
:func:`fp8gemm.m_grouped_fp8_gemm_nt_contiguous` over the fixed capacity ``R`` (padding rows of their
outputs are never written); SwiGLU + FP8 runs on the block view ``[R / A, A, 2 * inter]`` with the
valid-row prefix of every block as its ``masked_m``, i.e. on the valid rows only; the combine sends the
valid rows back.  No SBO in this form (``overlap`` is ignored: the stages run back to back).  Like the
masked form it has fixed shapes and no host synchronisation on the symm backend (the segment offsets
are prefix sums on the device), so it is CUDA-graph capturable; it costs one more bounded wait (the
exchange of the per-expert counts) than the masked form.

Semantics: :func:`fp8gemm.reference.moe_layer_reference`.  Every step of the symm backend
is free of host synchronisation and allocation except the final error check (``check=False`` skips
it; call ``layer.comm.check()`` later, e.g. after a CUDA-graph replay).
"""
from __future__ import annotations

import math

import torch

from .. import runtime
from .._checks import FP8, check_bool, check_int, check_pair, check_tensor
from ..kernels.swiglu import launch_swiglu_quant
from ..quant import empty_mn_major, per_token_cast_to_fp4
from .ep import EPCommunicator


def _default_gemm():
    from ..grouped import m_grouped_fp8_gemm_nt_masked
    return m_grouped_fp8_gemm_nt_masked


def _default_contiguous_gemm():
    from ..grouped import m_grouped_fp8_gemm_nt_contiguous
    return m_grouped_fp8_gemm_nt_contiguous


def _default_quant():
    from ..quant import per_token_cast_to_fp8
    return per_token_cast_to_fp8


# Cross-rank combine bytes a rank from which overlap="auto" overlaps (MoELayer.overlap_pays).
AUTO_OVERLAP_MIN_BYTES = 8e6


class MoELayer:
    """The layer on one rank; ``w13``/``w2`` hold this rank's ``L`` local experts.

    ``w13 = (FP8 [L, 2*inter, hidden], FP32 [L, ceil(2*inter/128), hidden/128])`` (rows ``[0, inter)``
    gate, ``[inter, 2 inter)`` up); ``w2 = (FP8 [L, hidden, inter], FP32 [L, hidden/128, ceil(inter/128)])``.
    ``num_comm_sms``: SMs left to the combine while the L2 GEMM runs with overlap (default 8, or 1/6 of a
    smaller device; measured on 2 and 4 H200s at 32-256 tokens a rank, benchmarks/RESULTS.md session 6: 8 SMs
    gained 0.8-2.3 points of overlap over 22 on every row, and were the best of 8/16/22 on four GPUs and of
    4/8/16/22 at 128-256 tokens on two: the combine stays hidden while the L2 GEMM keeps more SMs).  At 32
    tokens a rank the overlap was 0.5-2.1% slower than ``overlap=False`` on every split tried (hence
    ``overlap="auto"``, :meth:`overlap_pays`).  ``tail_experts``: local experts whose overlapped combine
    is sent after the GEMM on every SM (default L/8 from 8 local experts on, else 0; 0 turns it off; on one
    H200 with 64 local experts the default made the overlapped layer 1.3% faster at 256 tokens, RESULTS.md
    session 7).  ``gemm`` / ``contiguous_gemm`` / ``quant``: injectable masked
    GEMM, contiguous GEMM and token cast (DeepGEMM signatures), defaulting to fp8gemm's own.  The contiguous
    form's buffers (``R`` rows of L1, SwiGLU and L2 outputs) exist when ``comm`` was created with
    ``contiguous=True``.
    """

    def __init__(self, comm: EPCommunicator, w13, w2, *, num_comm_sms: int | None = None,
                 use_ue8m0: bool = False, gemm=None, quant=None, contiguous_gemm=None,
                 tail_experts: int | None = None):
        if not isinstance(comm, EPCommunicator):
            raise TypeError(f"comm must be an EPCommunicator, got {type(comm).__name__}")
        L, H = comm.num_local_experts, comm.hidden
        w13q, w13sf = check_pair("w13", w13)
        w2q, w2sf = check_pair("w2", w2)
        check_tensor("w13[0]", w13q, dtype=FP8, ndim=3)
        two_i = w13q.shape[1]
        if w13q.shape[0] != L or w13q.shape[2] != H or two_i % 2:
            raise ValueError(f"w13[0] must have shape [{L}, 2*inter, {H}], got {list(w13q.shape)}")
        inter = two_i // 2
        if inter % 128:
            raise ValueError(f"inter (w13[0].shape[1] / 2 = {inter}) must be a multiple of 128")
        check_tensor("w13[1]", w13sf, dtype=torch.float32, shape=(L, math.ceil(two_i / 128), H // 128))
        check_tensor("w2[0]", w2q, dtype=FP8, shape=(L, H, inter))
        check_tensor("w2[1]", w2sf, dtype=torch.float32, shape=(L, H // 128, inter // 128))
        for name, t in (("w13[0]", w13q), ("w13[1]", w13sf), ("w2[0]", w2q), ("w2[1]", w2sf)):
            if t.device != comm.device:
                raise ValueError(f"{name} must be on {comm.device}, got {t.device}")
        check_bool("use_ue8m0", use_ue8m0)
        self.comm, self.w13, self.w2, self.inter, self.use_ue8m0 = comm, (w13q, w13sf), (w2q, w2sf), inter, use_ue8m0
        self.gemm = gemm or _default_gemm()
        self.contiguous_gemm = contiguous_gemm or _default_contiguous_gemm()
        self.quant = quant or _default_quant()
        total = runtime._default_sms()
        if num_comm_sms is None:
            num_comm_sms = max(1, min(8, total // 6))
        check_int("num_comm_sms", num_comm_sms)
        if not 1 <= num_comm_sms < max(total, 2):
            raise ValueError(f"num_comm_sms must be in [1, {total - 1}], got {num_comm_sms}")
        self.num_comm_sms, self.num_gemm_sms = num_comm_sms, max(1, total - num_comm_sms)
        if tail_experts is None:
            tail_experts = L // 8 if L >= 8 else 0
        check_int("tail_experts", tail_experts, 0)
        if tail_experts >= L and tail_experts:
            raise ValueError(f"tail_experts must be below the {L} local experts, got {tail_experts}")
        self.tail_experts = tail_experts
        M, dev = comm.max_m, comm.device
        self.h1 = torch.empty(L, M, two_i, dtype=torch.bfloat16, device=dev)
        self.a2 = torch.empty(L, M, inter, dtype=FP8, device=dev)
        # The L2 GEMM's A scales MN-major (rows contiguous): the Gluon GEMM then brings them through shared
        # memory (gemm_gluon.sa_smem_pays; masked 1.01-1.10x, contiguous 1.03-1.05x on an H200, session 9).
        self.a2_sf = empty_mn_major(L, M, inter // 128, device=dev)
        # FP8 combine payload with fp8gemm's own masked GEMM: the L2 GEMM writes the payload itself (codes +
        # UE8M0 bytes a 128 columns, d_sf), so the combine only copies bytes; with an injected GEMM the combine
        # sender casts the BF16 rows.
        self.l2_writes_payload = comm.combine_payload == "fp8" and gemm is None
        if self.l2_writes_payload:
            self.out2 = torch.empty(L, M, H, dtype=FP8, device=dev)
            self.out2_sf = torch.empty(L, M, H // 128, dtype=torch.uint8, device=dev)
        else:
            self.out2 = torch.empty(L, M, H, dtype=torch.bfloat16, device=dev)
            self.out2_sf = None
        from ..grouped import alloc_signal
        self.signal = alloc_signal(L, M, dev)
        if comm.contig_rows:
            R = comm.contig_rows
            self.c_h1 = torch.empty(R, two_i, dtype=torch.bfloat16, device=dev)
            self.c_a2 = torch.empty(R, inter, dtype=FP8, device=dev)
            self.c_a2_sf = empty_mn_major(1, R, inter // 128, device=dev)[0]
            self.c_out2 = torch.empty(R, H, dtype=torch.bfloat16, device=dev)
        self.on_gpu = dev.type == "cuda" and not runtime.interpreting()
        self.comm_stream = torch.cuda.Stream(dev) if self.on_gpu else None
        self.last_block_m = None

    # ------------------------------------------------------------------ stages
    def expected_m(self, num_tokens: int) -> int:
        c = self.comm
        return max(1, math.ceil(num_tokens * c.topk * c.world_size / c.num_experts))

    def expert_compute(self, masked_m: torch.Tensor, expected_m: int) -> None:
        """L1 GEMM (gate and up fused) and SwiGLU + FP8 re-quantisation, rows < masked_m."""
        c = self.comm
        self.gemm((c.recv_x, c.recv_x_sf), self.w13, self.h1, masked_m, expected_m)
        launch_swiglu_quant(self.h1, self.a2, self.a2_sf, masked_m, self.use_ue8m0,
                            soft=runtime.interpreting(), num_sms=runtime.get_num_sms())

    def down_proj(self, masked_m: torch.Tensor, expected_m: int, overlap: bool):
        """L2 GEMM; with ``overlap`` on ``num_gemm_sms`` SMs with SBO signals, returning ``(block_m, threshold)``."""
        payload = {"d_sf": self.out2_sf} if self.l2_writes_payload else {}
        if not overlap:
            self.gemm((self.a2, self.a2_sf), self.w2, self.out2, masked_m, expected_m, **payload)
            return None
        old = runtime.get_num_sms()
        runtime.set_num_sms(self.num_gemm_sms)
        try:
            block_m, threshold = self.gemm((self.a2, self.a2_sf), self.w2, self.out2, masked_m, expected_m,
                                           enable_overlap=True, signal=self.signal, **payload)
        finally:
            runtime.set_num_sms(old)
        self.last_block_m = block_m
        return block_m, threshold

    def expert_compute_contiguous(self, d) -> torch.Tensor:
        """L1 (gate and up fused), SwiGLU + FP8 and L2 on the contiguous layout ``d``
        (:class:`fp8gemm.moe.ep.ContiguousDispatchOutput`); returns the L2 output BF16 [R, hidden]
        (rows with ``m_indices == -1`` are left untouched)."""
        A = d.alignment
        nblk = d.m_indices.shape[0] // A
        self.contiguous_gemm((d.recv_x, d.recv_x_sf), self.w13, self.c_h1, d.m_indices)
        launch_swiglu_quant(self.c_h1.view(nblk, A, -1), self.c_a2.view(nblk, A, -1),
                            self.c_a2_sf.view(nblk, A, -1), d.block_valid, self.use_ue8m0,
                            soft=runtime.interpreting(), num_sms=runtime.get_num_sms())
        self.contiguous_gemm((self.c_a2, self.c_a2_sf), self.w2, self.c_out2, d.m_indices)
        return self.c_out2

    def _steps_contiguous(self, x, topk_idx, topk_weights, out, events, skip_combine):
        c = self.comm
        if not c.contig_rows:
            raise ValueError("layout='contiguous' needs an EPCommunicator created with contiguous=True")
        self._mark(events, "start")
        xq, xsf = self._cast_tokens(x)
        self._mark(events, "quant")
        c.dispatch_contiguous_counts(xq, xsf, topk_idx)
        yield "counts_sent"
        c.dispatch_contiguous_send(xq, xsf, topk_idx)
        yield "dispatch_sent"
        d = c.dispatch_contiguous_recv()
        self._mark(events, "dispatch")
        o = self.expert_compute_contiguous(d)
        self._mark(events, "l2")
        if skip_combine:
            yield "combine_sent"
            return None
        self._mark(events, "combine_send_start")
        c.combine_contiguous_send(o)
        self._mark(events, "combine_send")
        yield "combine_sent"
        y = c.combine_recv(topk_idx, topk_weights, out)
        self._mark(events, "combine")
        return y

    def _cast_tokens(self, x):
        """The tokens in the communicator's dispatch payload: FP8 through ``self.quant``, or FP4 (E2M1 codes +
        UE8M0 bytes a 32 columns, :func:`fp8gemm.per_token_cast_to_fp4`), which the grouped GEMMs take as is."""
        if self.comm.dispatch_payload == "fp4":
            return per_token_cast_to_fp4(x, use_ue8m0=True, gran_k=32, ue8m0_bytes=True)
        return self.quant(x, use_ue8m0=self.use_ue8m0)

    def _mark(self, events, name, stream=None):
        if events is not None and self.on_gpu:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream or torch.cuda.current_stream(self.comm.device))
            events[name] = ev

    def steps(self, x, topk_idx, topk_weights, overlap=True, out=None, events=None, skip_combine=False,
              layout="masked"):
        """The forward pass as a generator that yields where every rank must have reached the same
        point (after the dispatch send, after the combine send; the contiguous form also after the
        count exchange); :meth:`forward` runs it through, a simulated world (tests) interleaves the
        ranks' generators.  Returns ``y`` (StopIteration.value).

        ``events`` (a dict, GPU only): CUDA events recorded at the stage boundaries (the benchmark's
        timeline).  ``skip_combine`` (benchmarks only, on every rank at once): stop after the L2 GEMM and
        return ``None``, to measure how much of the combine the overlap hides."""
        c = self.comm
        check_tensor("x", x, dtype=torch.bfloat16, ndim=2)
        if x.shape[1] != c.hidden:
            raise ValueError(f"x must have shape [T, {c.hidden}], got {list(x.shape)}")
        if isinstance(overlap, str):
            if overlap != "auto":
                raise ValueError(f"overlap must be True, False or 'auto', got {overlap!r}")
            overlap = self.overlap_pays(x.shape[0])
        check_bool("overlap", overlap)
        if layout not in ("masked", "contiguous"):
            raise ValueError(f"layout must be 'masked' or 'contiguous', got {layout!r}")
        overlap = overlap and c.backend == "symm"
        t = x.shape[0]
        check_tensor("topk_weights", topk_weights, dtype=(torch.float32, torch.bfloat16), shape=(t, c.topk))
        if layout == "contiguous":
            return (yield from self._steps_contiguous(x, topk_idx, topk_weights, out, events, skip_combine))
        self._mark(events, "start")
        xq, xsf = self._cast_tokens(x)
        self._mark(events, "quant")
        c.dispatch_send(xq, xsf, topk_idx)
        yield "dispatch_sent"
        d = c.dispatch_recv()
        self._mark(events, "dispatch")
        em = self.expected_m(t)
        self.expert_compute(d.masked_m, em)
        self._mark(events, "l1_swiglu")
        if skip_combine:
            self.down_proj(d.masked_m, em, overlap)     # same SM budget as the real thing
            if overlap:
                self.signal.zero_()
            self._mark(events, "l2")
            yield "combine_sent"
            return None
        if overlap:
            main = torch.cuda.current_stream(c.device) if self.on_gpu else None
            if main is not None:
                # The combine stream waits for what is queued so far (dispatch, L1, SwiGLU), not for
                # the L2 GEMM launched next: the two then run side by side on disjoint SM budgets.
                self.comm_stream.wait_stream(main)
            block_m, threshold = self.down_proj(d.masked_m, em, True)
            self._mark(events, "l2")
            head, tail = self._combine_launches(block_m, threshold, em)
            if main is not None:
                with torch.cuda.stream(self.comm_stream):
                    self._mark(events, "combine_send_start", self.comm_stream)
                    c.combine_send(self.out2, **head)
                    self._mark(events, "combine_send", self.comm_stream)
                if tail is not None:
                    c.combine_send(self.out2, **tail)        # main stream: after the GEMM, on every SM
                    self._mark(events, "combine_tail")
                main.wait_stream(self.comm_stream)
            else:
                c.combine_send(self.out2, **head)
                if tail is not None:
                    c.combine_send(self.out2, **tail)
        else:
            self.down_proj(d.masked_m, em, False)
            self._mark(events, "l2")
            self._mark(events, "combine_send_start")
            c.combine_send(self.out2, expert_out_sf=self.out2_sf)
            self._mark(events, "combine_send")
        yield "combine_sent"
        y = c.combine_recv(topk_idx, topk_weights, out)
        self._mark(events, "combine")
        return y

    @property
    def total_sms(self) -> int:
        """The SMs the layer divides between the L2 GEMM and the combine (the tail launch takes them all)."""
        return self.num_comm_sms + self.num_gemm_sms

    def _combine_launches(self, block_m: int, threshold: int, expected_m: int):
        """Keyword arguments of the overlapped combine's launches: ``head`` sends local experts
        ``[0, L - tail_experts)`` on the communication SMs while the L2 GEMM runs, each block the moment its
        counter completes; ``tail`` (None when ``tail_experts`` is 0) sends the last ``tail_experts`` experts,
        the ones the GEMM (which walks the experts in order) finishes last, from the main stream after the
        GEMM on every SM, their blocks cut into row ranges so that many SMs share each.  Without the tail, the
        block finished last is sent by one communication SM after the GEMM ends (an estimate: ~15 µs for 32 rows
        of 14 KB at the ~30 GB/s an SM copies, from the 8-SM combine's stand-alone time); the tail launch is one
        extra launch on the critical path."""
        c, L = self.comm, self.comm.num_local_experts
        X = self.tail_experts
        common = dict(signal=self.signal, block_m=block_m, threshold=threshold, expert_out_sf=self.out2_sf)
        if not X:
            return dict(common, num_sms=self.num_comm_sms), None
        rows = max(1, min(block_m, expected_m))
        # enough row ranges to give every SM one (counting only the blocks the batch is expected to fill)
        filled = X * max(1, math.ceil(expected_m / block_m))
        parts = max(1, min(rows, math.ceil(self.total_sms / filled)))
        p_head = c.combine_programs(self.num_comm_sms, L - X, block_m)
        p_tail = c.combine_programs(self.total_sms, X, block_m, parts)
        total = p_head + p_tail
        head = dict(common, num_sms=self.num_comm_sms, experts=(0, L - X), arrive_total=total)
        tail = dict(common, num_sms=self.total_sms, experts=(L - X, L), parts=parts, arrive_total=total,
                    trace_base=(L - X) * math.ceil(c.max_m / block_m))
        return head, tail

    def overlap_pays(self, tokens: int) -> bool:
        """Whether SBO is expected to beat the stages back to back for ``tokens`` tokens on this rank: the
        combine's cross-rank bytes a rank (``tokens * topk * (W - 1) / W`` BF16 rows) reach
        :data:`AUTO_OVERLAP_MIN_BYTES`.  Measured on 2 and 4 H200s with 8 communication SMs
        (benchmarks/RESULTS.md, session 6): 0.7-2.9 MB (8-32 tokens) 0.5-2.1% slower with overlap, 5.6-7.6 MB
        (64 tokens on four, 128 on two) within ±0.3%, 11-22 MB (128-256 tokens on four, 256 on two) 1.1-5.4%
        faster.

        With the FP8 combine payload (``EPCommunicator(combine_payload="fp8")``) only where the L2 GEMM writes
        the payload itself (``l2_writes_payload``, fp8gemm's own GEMM; 4 x H100: overlap 0.6-1.2% faster than
        back to back at 128 tokens, 1.7-2.1% at 256): where the combine sender has to cast the rows, that cast is
        compute-bound on the communication SMs (4 x H200, 256 tokens: the overlapped layer 1048 µs against 886
        back to back), so never (RESULTS.md session 10)."""
        c = self.comm
        remote = tokens * c.topk * (c.world_size - 1) / c.world_size * c.hidden * 2
        payload_ok = c.combine_payload == "bf16" or self.l2_writes_payload
        return c.backend == "symm" and payload_ok and remote >= AUTO_OVERLAP_MIN_BYTES

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                overlap: bool | str = "auto", out: torch.Tensor | None = None, check: bool = True,
                layout: str = "masked", **bench) -> torch.Tensor:
        """``x`` BF16 [T, hidden] (T <= max_tokens_per_rank), ``topk_idx`` int64/int32 [T, topk]
        (negative = no expert), ``topk_weights`` FP32/BF16 [T, topk] -> ``y`` BF16 [T, hidden].

        ``overlap``: True, False or ``"auto"`` (:meth:`overlap_pays`; module docstring).
        ``layout``: ``"masked"`` (decode, the default: per-expert masked buffers, SBO with ``overlap``)
        or ``"contiguous"`` (prefill: the contiguous grouped layout, stages back to back, ``overlap``
        ignored; needs ``EPCommunicator(..., contiguous=True)``)."""
        gen = self.steps(x, topk_idx, topk_weights, overlap, out, layout=layout, **bench)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                y = stop.value
                break
        if check and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            self.comm.check()
        return y

    __call__ = forward


def run_simulated(layers: list, xs, idxs, ws, overlap: bool = True, layout: str = "masked",
                  check: bool = True) -> list[torch.Tensor]:
    """Run one forward of every rank of a simulated world (:func:`fp8gemm.moe.ep.make_simulated_world`),
    stage by stage, and check each rank's error flag (unless ``check=False``)."""
    gens = [layer.steps(x, i, w, overlap, layout=layout) for layer, x, i, w in zip(layers, xs, idxs, ws)]
    outs = [None] * len(gens)
    live = list(range(len(gens)))
    while live:
        nxt = []
        for r in live:
            try:
                next(gens[r])
                nxt.append(r)
            except StopIteration as stop:
                outs[r] = stop.value
        live = nxt
    if check:
        for layer in layers:
            layer.comm.check()
    return outs
