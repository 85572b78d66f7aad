"""The MoE activation path around expert-parallel dispatch and combine.

- :func:`mega_moe_pre_dispatch`: one launch that turns a batch of BF16 tokens and their routing into the
  fixed-capacity buffers the dispatch sends (FP8 or FP4 activations with UE8M0 scale bytes, top-k ids and
  weights, padding rows);
- :func:`quantize_combine_payload` / :func:`combine_reduce`: the FP8 payload of the combine (expert
  outputs quantised per (token, 128 columns) with a UE8M0 byte) and the weighted top-k reduction back to
  BF16.

Semantics, byte for byte: the "MoE activations" section of :mod:`fp8gemm.reference`.  Every launch is free
of host synchronisation and allocation when the outputs are given (CUDA-graph capturable), except the
optional expert-id range check of :func:`mega_moe_pre_dispatch` (skipped under graph capture).
"""
from __future__ import annotations

import math

import torch

from .. import runtime
from .._checks import (FP8, check_bool, check_cuda_or_interpreter, check_int, check_no_overlap,
                       check_same_device, check_tensor, check_unit_stride)
from ..kernels import moe_act as K
from ..kernels import quant as KQ

_IDX_DTYPES = (torch.int64, torch.int32)
_W_DTYPES = (torch.float32, torch.bfloat16)
_FP4_DTYPES = tuple(t for t in (torch.uint8, getattr(torch, "float4_e2m1fn_x2", None)) if t is not None)





def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def mega_moe_pre_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                          buf_x: torch.Tensor, buf_x_sf: torch.Tensor, buf_topk_idx: torch.Tensor,
                          buf_topk_weights: torch.Tensor, num_tokens: int, group_size: int, use_fp4_acts: bool,
                          *, fp32_scales: bool = False, use_ue8m0: bool = True,
                          num_experts: int | None = None) -> None:
    """Fill the dispatch buffers from ``num_tokens`` BF16 tokens in one launch.

    Inputs: ``x`` BF16 [>= num_tokens, hidden]; ``topk_idx`` int64/int32 and ``topk_weights`` FP32/BF16,
    both [>= num_tokens, topk] (only the first ``num_tokens`` rows are read).  Buffers (capacity C rows each,
    ``C >= num_tokens``, last dimension contiguous):

    - ``buf_x``: E4M3 [C, hidden], or with ``use_fp4_acts`` packed E2M1 uint8 [C, hidden / 2] (two codes a
      byte, the even column in the low nibble; ``torch.float4_e2m1fn_x2`` is accepted too);
    - ``buf_x_sf``: UE8M0 scale bytes uint8 [C, hidden / group_size]; with ``fp32_scales`` (FP8 only,
      ``group_size`` 128) FP32 [C, hidden / 128], the 1D2D GEMMs' activation scales;
    - ``buf_topk_idx``: int64 or int32 [C, topk] (ids are converted to the buffer's dtype);
    - ``buf_topk_weights``: FP32 [C, topk].

    Rows ``< num_tokens`` get exactly :func:`fp8gemm.per_token_cast_to_fp8` (``use_ue8m0``, default True,
    ``gran_k=group_size``; the bytes of its scales) or :func:`fp8gemm.per_token_cast_to_fp4`, and the
    token's routing; rows ``num_tokens .. C-1`` are padding: ids -1, weights 0, activation and scale bytes 0.
    ``group_size`` is 32 or 128 and divides ``hidden``.  With ``num_experts`` the first ``num_tokens`` ids
    are checked to lie in ``[-1, num_experts)`` (a host synchronisation, skipped under CUDA-graph capture).
    Reference: :func:`fp8gemm.reference.mega_moe_pre_dispatch`.
    """
    check_tensor("x", x, dtype=torch.bfloat16, ndim=2)
    check_tensor("topk_idx", topk_idx, dtype=_IDX_DTYPES, ndim=2)
    check_tensor("topk_weights", topk_weights, dtype=_W_DTYPES, shape=tuple(topk_idx.shape))
    num_tokens = check_int("num_tokens", num_tokens)
    check_int("group_size", group_size)
    if group_size not in (32, 128):
        raise ValueError(f"group_size must be 32 or 128, got {group_size}")
    check_bool("use_fp4_acts", use_fp4_acts)
    check_bool("fp32_scales", fp32_scales)
    check_bool("use_ue8m0", use_ue8m0)
    hidden, topk = x.shape[1], topk_idx.shape[1]
    if hidden % group_size != 0:
        raise ValueError(f"hidden (x.shape[1] = {hidden}) must be a multiple of group_size = {group_size}")
    if x.shape[0] < num_tokens:
        raise ValueError(f"x has {x.shape[0]} rows, fewer than num_tokens = {num_tokens}")
    if topk_idx.shape[0] < num_tokens:
        raise ValueError(f"topk_idx has {topk_idx.shape[0]} rows, fewer than num_tokens = {num_tokens}")
    if fp32_scales and (use_fp4_acts or group_size != 128):
        raise ValueError(f"fp32_scales needs FP8 activations with group_size 128, got use_fp4_acts={use_fp4_acts}, "
                         f"group_size={group_size}")
    if use_fp4_acts and not use_ue8m0:
        raise ValueError("use_fp4_acts needs use_ue8m0=True (FP4 scales are UE8M0 bytes)")
    if not fp32_scales and not use_ue8m0:
        raise ValueError("use_ue8m0=False needs fp32_scales=True (only power-of-two scales have a UE8M0 byte)")

    capacity = buf_x.shape[0] if isinstance(buf_x, torch.Tensor) and buf_x.dim() >= 1 else None
    if use_fp4_acts:
        check_tensor("buf_x", buf_x, dtype=_FP4_DTYPES, shape=(capacity, hidden // 2))
        buf_x = buf_x.view(torch.uint8)
    else:
        check_tensor("buf_x", buf_x, dtype=FP8, shape=(capacity, hidden))
    if fp32_scales:
        check_tensor("buf_x_sf", buf_x_sf, dtype=torch.float32, shape=(capacity, hidden // 128))
    else:
        check_tensor("buf_x_sf", buf_x_sf, dtype=torch.uint8, shape=(capacity, hidden // group_size))
    check_tensor("buf_topk_idx", buf_topk_idx, dtype=_IDX_DTYPES, shape=(capacity, topk))
    check_tensor("buf_topk_weights", buf_topk_weights, dtype=torch.float32, shape=(capacity, topk))
    if capacity < num_tokens:
        raise ValueError(f"the buffers hold {capacity} rows, fewer than num_tokens = {num_tokens}")
    for name, t in (("buf_x", buf_x), ("buf_x_sf", buf_x_sf), ("buf_topk_idx", buf_topk_idx),
                    ("buf_topk_weights", buf_topk_weights)):
        check_unit_stride(name, t, 1, "contiguous along its last dimension")
    device = check_same_device(x=x, topk_idx=topk_idx, topk_weights=topk_weights, buf_x=buf_x, buf_x_sf=buf_x_sf,
                               buf_topk_idx=buf_topk_idx, buf_topk_weights=buf_topk_weights)
    check_cuda_or_interpreter(device)
    outs = dict(buf_x=buf_x, buf_x_sf=buf_x_sf, buf_topk_idx=buf_topk_idx, buf_topk_weights=buf_topk_weights)
    for out_name, out in outs.items():
        check_no_overlap(out_name, out, x=x, topk_idx=topk_idx, topk_weights=topk_weights,
                         **{n: o for n, o in outs.items() if n != out_name})
    if num_experts is not None:
        check_int("num_experts", num_experts, 1)
        if num_tokens and not _capturing():
            ids = topk_idx[:num_tokens]
            bad = (ids < -1) | (ids >= num_experts)
            if bool(bad.any()):
                where = bad.nonzero()[0].tolist()
                raise ValueError(f"topk_idx must hold expert ids in [-1, {num_experts}) (num_experts = "
                                 f"{num_experts}), got {int(ids[where[0], where[1]])} at {where}")
    if capacity == 0:
        return
    K.launch_pre_dispatch(x, topk_idx, topk_weights, buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights,
                          num_tokens, group_size, use_fp4_acts, fp32_scales, use_ue8m0, runtime.interpreting())


def quantize_combine_payload(x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Quantise BF16 expert outputs ``x`` [..., hidden] into the FP8 combine payload.

    Returns ``(q, sf)``: ``q`` E4M3 [..., hidden] and ``sf`` uint8 [..., ceil(hidden / 128)], one UE8M0 scale
    byte per (token, 128 columns): :func:`fp8gemm.per_token_cast_to_fp8` with ``use_ue8m0=True``,
    ``gran_k=128`` over the rows of ``x``, scales as bytes -- half the bytes of BF16 on the wire.  With
    ``out=(q, sf)`` (contiguous) the results go there and nothing is allocated.
    Reference: :func:`fp8gemm.reference.quantize_combine_payload`.
    """
    check_tensor("x", x, dtype=torch.bfloat16)
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension, got shape {list(x.shape)}")
    hidden = x.shape[-1]
    sf_shape = (*x.shape[:-1], math.ceil(hidden / 128))
    if out is None:
        q = torch.empty(x.shape, dtype=FP8, device=x.device)
        sf = torch.empty(sf_shape, dtype=torch.uint8, device=x.device)
    else:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"out must be a (q, sf) pair, got {type(out).__name__}")
        q, sf = out
        check_tensor("out[0]", q, dtype=FP8, shape=tuple(x.shape))
        check_tensor("out[1]", sf, dtype=torch.uint8, shape=sf_shape)
        for name, t in (("out[0]", q), ("out[1]", sf)):
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())}")
        check_no_overlap("out[0]", q, x=x, sf=sf)
        check_no_overlap("out[1]", sf, x=x)
    check_same_device(x=x, q=q, sf=sf)
    check_cuda_or_interpreter(x.device)
    rows = x.reshape(-1, hidden)
    if rows.shape[0] and hidden:
        KQ.launch_per_token(rows, q.view(-1, hidden), sf.view(-1, sf_shape[-1]), 128, True,
                            runtime.interpreting())
    return q, sf


def combine_reduce(payload: torch.Tensor, sf: torch.Tensor, weights: torch.Tensor,
                   topk_idx: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """De-quantise each token's top-k FP8 payloads and sum them with their weights into BF16.

    ``payload`` E4M3 [T, topk, hidden] (last dimension contiguous), ``sf`` UE8M0 bytes uint8
    [T, topk, ceil(hidden / 128)] (as :func:`quantize_combine_payload` makes them), ``weights`` FP32 or BF16
    [T, topk]; ``topk_idx`` (optional, int64/int32 [T, topk]): slots with a negative id are skipped, their
    payload never read into the sum (it may be garbage).  Returns ``out`` (BF16 [T, hidden], allocated if not
    given): ``sum_k weights[t, k] * payload[t, k] * 2^(sf[t, k] - 127)``, accumulated in FP32 in slot order
    (each product rounded, then added), cast once to BF16 (nearest even).
    Reference: :func:`fp8gemm.reference.combine_reduce`.
    """
    check_tensor("payload", payload, dtype=FP8, ndim=3)
    t, topk, hidden = payload.shape
    check_tensor("sf", sf, dtype=torch.uint8, shape=(t, topk, math.ceil(hidden / 128)))
    check_tensor("weights", weights, dtype=_W_DTYPES, shape=(t, topk))
    if topk_idx is not None:
        check_tensor("topk_idx", topk_idx, dtype=_IDX_DTYPES, shape=(t, topk))
    check_unit_stride("payload", payload, 2, "contiguous along hidden")
    check_unit_stride("sf", sf, 2, "contiguous along its last dimension")
    if out is None:
        out = torch.empty(t, hidden, dtype=torch.bfloat16, device=payload.device)
    else:
        check_tensor("out", out, dtype=torch.bfloat16, shape=(t, hidden))
        check_unit_stride("out", out, 1, "contiguous along hidden")
        check_no_overlap("out", out, payload=payload, sf=sf, weights=weights, topk_idx=topk_idx)
    device = check_same_device(payload=payload, sf=sf, weights=weights, topk_idx=topk_idx, out=out)
    check_cuda_or_interpreter(device)
    if t and hidden:
        if topk == 0:
            out.zero_()
        else:
            K.launch_combine_reduce(payload, sf, weights, topk_idx, out, runtime.interpreting())
    return out
