"""MQA logits for DeepSeek-V3.2's lightning indexer: prefill and paged decode, DeepGEMM's names.

For query token i and key j it sees::

    logit[i, j] = sum_h relu(q[i, h, :] . (kv[j, :] * kv_scale[j])) * weights[i, h]

Semantics (and which keys each query sees): :func:`fp8gemm.reference.fp8_mqa_logits` and
:func:`fp8gemm.reference.fp8_paged_mqa_logits`.  Kernels: :mod:`fp8gemm.kernels.mqa`.

Supported: ``num_heads`` 16, 32 or 64; ``head_dim`` 32, 64 or 128; FP32 logits.  KV scales must be
non-negative (absmax scales are): the kernels apply them after the ReLU.

Like DeepGEMM, the functions allocate their output with a padded row stride (rows start on 1024-byte
boundaries) and return the ``[rows, width]`` view of it, so the result is not ``contiguous()``.
Supersets of DeepGEMM, where DeepGEMM refuses the call: ``clean_logits=True`` is also accepted with the
compressed prefill form and with 2-D ``context_lens``.
"""
from __future__ import annotations

import torch

from ._checks import (FP8, check_bool, check_cuda_or_interpreter, check_int, check_pair, check_same_device,
                      check_tensor)
from . import runtime
from .kernels import mqa as K
from .kernels import mqa_gluon

_ROW_ALIGN = 256    # FP32 elements: 1024-byte aligned output rows, as DeepGEMM allocates them


def _check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {list(t.shape)} with strides {tuple(t.stride())}")




def _check_heads_dim(name: str, num_heads: int, head_dim: int) -> None:
    if num_heads not in K.NUM_HEADS:
        raise ValueError(f"{name}: num_heads must be one of {K.NUM_HEADS}, got {num_heads}")
    if head_dim not in K.HEAD_DIMS:
        raise ValueError(f"{name}: head_dim must be one of {K.HEAD_DIMS}, got {head_dim}")



def _padded_output(rows: int, width: int, device: torch.device) -> torch.Tensor:
    stride = max(_ROW_ALIGN, -(-width // _ROW_ALIGN) * _ROW_ALIGN)
    return torch.empty(rows, stride, dtype=torch.float32, device=device)[:, :width]


def fp8_mqa_logits(q: torch.Tensor, kv, weights: torch.Tensor, cu_seq_len_k_start: torch.Tensor,
                   cu_seq_len_k_end: torch.Tensor, clean_logits: bool = True, max_seqlen_k: int = 0) -> torch.Tensor:
    """Prefill MQA logits: each query token against its own range of keys.

    Args:
        q: FP8 E4M3 ``[seq_len, num_heads, head_dim]``, contiguous.
        kv: ``(FP8 E4M3 [seq_len_kv, head_dim], FP32 scales [seq_len_kv])``, both contiguous; key j is
            ``kv[0][j] * kv[1][j]`` (scales must be >= 0).
        weights: FP32 ``[seq_len, num_heads]`` with unit stride along heads.
        cu_seq_len_k_start, cu_seq_len_k_end: int32 ``[seq_len]``: query i sees keys ``[ks[i], ke[i])``
            (clipped to ``[0, seq_len_kv)``; an empty range is allowed).
        clean_logits: write -inf on every position a query does not see.  Without it those positions are
            unspecified (the kernel leaves most of them untouched).
        max_seqlen_k: 0 for the plain output FP32 ``[seq_len, seq_len_kv]``; > 0 for DeepGEMM's compressed
            output FP32 ``[seq_len, max_seqlen_k]`` whose column c of row i holds key ``ks[i] + c`` (use
            ``max(ke - ks)``; keys past ``ks[i] + max_seqlen_k`` are dropped).  In the compressed form
            DeepGEMM requires ``clean_logits=False``; here ``True`` fills the columns past each row's
            range with -inf.

    Returns:
        The logits, a view of a buffer with 1024-byte aligned rows.
        Reference: :func:`fp8gemm.reference.fp8_mqa_logits`.
    """
    check_tensor("q", q, dtype=FP8, ndim=3)
    seq_len, num_heads, head_dim = q.shape
    _check_heads_dim("q", num_heads, head_dim)
    _check_contiguous("q", q)
    kv_t, kv_sf = check_pair("kv", kv)
    check_tensor("kv[0]", kv_t, dtype=FP8, ndim=2)
    seq_len_kv = kv_t.shape[0]
    check_tensor("kv[0]", kv_t, shape=(seq_len_kv, head_dim))
    check_tensor("kv[1]", kv_sf, dtype=torch.float32, shape=(seq_len_kv,))
    _check_contiguous("kv[0]", kv_t)
    _check_contiguous("kv[1]", kv_sf)
    check_tensor("weights", weights, dtype=torch.float32, shape=(seq_len, num_heads))
    if weights.stride(1) != 1 and num_heads > 1:
        raise ValueError(f"weights must have unit stride along heads, got strides {tuple(weights.stride())}")
    check_tensor("cu_seq_len_k_start", cu_seq_len_k_start, dtype=torch.int32, shape=(seq_len,))
    check_tensor("cu_seq_len_k_end", cu_seq_len_k_end, dtype=torch.int32, shape=(seq_len,))
    _check_contiguous("cu_seq_len_k_start", cu_seq_len_k_start)
    _check_contiguous("cu_seq_len_k_end", cu_seq_len_k_end)
    clean_logits = check_bool("clean_logits", clean_logits)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, 0)
    device = check_same_device(q=q, kv_0=kv_t, kv_1=kv_sf, weights=weights, cu_seq_len_k_start=cu_seq_len_k_start,
                               cu_seq_len_k_end=cu_seq_len_k_end)
    check_cuda_or_interpreter(device)

    return _run_prefill(q, kv_t, kv_sf, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k)


def _run_prefill(q, kv_t, kv_sf, weights, ks, ke, clean_logits: bool, max_seqlen_k: int,
                 cfg: K.PrefillConfig | None = None) -> torch.Tensor:
    """Allocate the output and launch the prefill kernel on validated arguments (``cfg``: tile override)."""
    seq_len, num_heads, head_dim = q.shape
    compressed = max_seqlen_k > 0
    width = max_seqlen_k if compressed else kv_t.shape[0]
    out = _padded_output(seq_len, width, q.device)
    if seq_len == 0 or width == 0:
        return out
    # The warp-specialised Gluon kernel only when asked for (FP8GEMM_BACKEND=gluon; it raises where it does
    # not apply: SM90, plain form, H 32/64, D 64/128, TMA-able inputs).  "auto" keeps the Triton kernel:
    # measured on an H100 (benchmarks/RESULTS.md, session 7) the Gluon kernel is 0.67-0.95x the Triton one on
    # the anchor rows (every variant tried), and the Triton one also covers H16, D32 and the compressed form.
    if cfg is None and runtime.backend() == "gluon":
        if mqa_gluon.supports(q, kv_t, kv_sf, weights, ks, ke, clean_logits, max_seqlen_k):
            mqa_gluon.launch(q, kv_t, kv_sf, weights, ks, ke, out, clean_logits, runtime.get_num_sms())
            return out
        raise RuntimeError("FP8GEMM_BACKEND=gluon but the Gluon MQA-logits kernel does not support this call "
                           "(it needs an SM90 GPU, the plain form, num_heads 32/64 and head_dim 64/128)")
    cfg = cfg or K.prefill_config(num_heads, head_dim)
    grid = (_cdiv(seq_len, cfg.block_q),)
    K.mqa_logits_kernel[grid](
        q, kv_t, kv_sf, weights, ks, ke, out,
        seq_len, kv_t.shape[0], max_seqlen_k, weights.stride(0), out.stride(0),
        H=num_heads, D=head_dim, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k,
        COMPRESSED=compressed, CLEAN=clean_logits, CLEAN_BLOCK=K.CLEAN_BLOCK, INTERIOR=cfg.interior,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}))
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_context_lens(context_lens, batch: int | None) -> None:
    check_tensor("context_lens", context_lens, dtype=torch.int32)
    if context_lens.dim() not in (1, 2):
        raise ValueError(f"context_lens must be 1-D [batch] or 2-D [batch, next_n], got shape {list(context_lens.shape)}")
    if batch is not None and context_lens.shape[0] != batch:
        raise ValueError(f"context_lens must have {batch} rows (batch, from q), got shape {list(context_lens.shape)}")
    _check_contiguous("context_lens", context_lens)


def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int, num_sms: int) -> torch.Tensor:
    """The schedule of :func:`fp8_paged_mqa_logits`: a persistent-SM split of the sequences' KV blocks.

    Args:
        context_lens: int32 ``[batch]`` or ``[batch, next_n]`` (the same tensor the logits call gets).
        block_kv: tokens per KV-cache block (16, 32, 64 or 128; DeepGEMM's SM90 kernel takes 64).
        num_sms: how many workers to split the work over (pass :func:`fp8gemm.get_num_sms`).

    Returns:
        int32 ``[num_sms + 1, 2]`` on ``context_lens``' device, DeepGEMM's layout: each sequence is cut
        into splits of ``4 * block_kv`` keys, and row s is the (sequence, split) where worker s starts;
        the last row is ``(batch, 0)``.  Computed on the device in one launch (no host sync), so it can
        be captured in a CUDA graph.  Reference: :func:`fp8gemm.reference.paged_mqa_logits_metadata`.
    """
    _check_context_lens(context_lens, None)
    block_kv = check_int("block_kv", block_kv, 1)
    if block_kv not in K.BLOCK_KVS:
        raise ValueError(f"block_kv must be one of {K.BLOCK_KVS}, got {block_kv}")
    num_sms = check_int("num_sms", num_sms, 1)
    check_cuda_or_interpreter(context_lens.device)
    batch = context_lens.shape[0]
    next_n = context_lens.shape[1] if context_lens.dim() == 2 else 1
    if context_lens.dim() == 2 and next_n not in K.NEXT_NS:
        raise ValueError(f"context_lens: next_n (dim 1) must be one of {K.NEXT_NS}, got {next_n}")
    meta = torch.empty(num_sms + 1, 2, dtype=torch.int32, device=context_lens.device)
    K.paged_mqa_metadata_kernel[(1,)](
        context_lens, meta, batch, num_sms, SPLIT=K.SPLIT_PAGES * block_kv, NEXT_N=next_n,
        CTX_2D=context_lens.dim() == 2, BLOCK_B=K.META_BLOCK_B, BLOCK_S=K.META_BLOCK_S,
        num_warps=K.META_WARPS)
    return meta


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor, schedule_meta: torch.Tensor,
                         max_context_len: int, clean_logits: bool = False) -> torch.Tensor:
    """Decode MQA logits over a paged FP8 KV cache, all ``next_n`` tokens of a sequence at once.

    Args:
        q: FP8 E4M3 ``[batch, next_n, num_heads, head_dim]``, contiguous; next_n 1 or 2.
        kv_cache: uint8 ``[num_blocks, block_kv, 1, head_dim + 4]``, DeepGEMM's fused layout: each block
            holds its ``block_kv`` tokens' FP8 values (``block_kv * head_dim`` bytes) and then their FP32
            scales (see :func:`fp8gemm.reference.pack_paged_kv_cache`).  Strides ``(>= block_kv * (head_dim + 4),
            head_dim + 4, *, 1)``, the block stride a multiple of 4.
        weights: FP32 ``[batch * next_n, num_heads]``, contiguous.
        context_lens: int32 ``[batch]``: row ``b * next_n + t`` sees keys ``[0, context_lens[b] - next_n + t + 1)``
            (causal); or ``[batch, next_n]``: it sees ``[0, context_lens[b, t])``.
        block_table: int32 ``[batch, max_blocks]`` (unit stride along blocks): key j of sequence b is slot
            ``j % block_kv`` of block ``block_table[b, j // block_kv]``; only the blocks a sequence needs are read.
        schedule_meta: from :func:`get_paged_mqa_logits_metadata` for these ``context_lens`` and ``block_kv``.
        max_context_len: width of the output (keys at and past it are not computed).
        clean_logits: write -inf on every position a row does not see.  Without it, positions inside the
            KV tiles a sequence needs are -inf too, and the rest of the row is unspecified.

    Returns:
        FP32 ``[batch * next_n, max_context_len]``, a view of a buffer with 1024-byte aligned rows.

    The launch does no host synchronisation and allocates only the output, so the call can be captured in a
    CUDA graph and replayed with new ``context_lens``/``block_table``/``schedule_meta`` contents.
    Reference: :func:`fp8gemm.reference.fp8_paged_mqa_logits`.
    """
    check_tensor("q", q, dtype=FP8, ndim=4)
    batch, next_n, num_heads, head_dim = q.shape
    if next_n not in K.NEXT_NS:
        raise ValueError(f"q: next_n (dim 1) must be one of {K.NEXT_NS}, got {next_n}")
    _check_heads_dim("q", num_heads, head_dim)
    _check_contiguous("q", q)
    check_tensor("kv_cache", kv_cache, dtype=torch.uint8, ndim=4)
    num_blocks, block_kv, kv_heads, dp4 = kv_cache.shape
    if kv_heads != 1 or dp4 != head_dim + 4:
        raise ValueError(f"kv_cache must have shape [num_blocks, block_kv, 1, {head_dim + 4}] (head_dim + 4 bytes "
                         f"per token), got {list(kv_cache.shape)}")
    if block_kv not in K.BLOCK_KVS:
        raise ValueError(f"kv_cache: block_kv (dim 1) must be one of {K.BLOCK_KVS}, got {block_kv}")
    s0, s1, _, s3 = kv_cache.stride()
    if s3 != 1 or s1 != dp4 or (num_blocks > 1 and (s0 < block_kv * dp4 or s0 % 4 != 0)):
        raise ValueError(f"kv_cache must have strides (k * 4 >= {block_kv * dp4}, {dp4}, *, 1) (blocks of "
                         f"packed FP8 values + FP32 scales), got {tuple(kv_cache.stride())}")
    if kv_cache.storage_offset() % 4 != 0:
        raise ValueError(f"kv_cache must start on a 4-byte boundary (its FP32 scales are read in place), "
                         f"got storage offset {kv_cache.storage_offset()}")
    check_tensor("weights", weights, dtype=torch.float32, shape=(batch * next_n, num_heads))
    _check_contiguous("weights", weights)
    _check_context_lens(context_lens, batch)
    if context_lens.dim() == 2 and context_lens.shape[1] != next_n:
        raise ValueError(f"context_lens must have shape [{batch}, {next_n}] (batch, next_n from q), "
                         f"got {list(context_lens.shape)}")
    check_tensor("block_table", block_table, dtype=torch.int32, ndim=2)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (batch, from q), got shape {list(block_table.shape)}")
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        raise ValueError(f"block_table must have unit stride along blocks, got strides {tuple(block_table.stride())}")
    check_tensor("schedule_meta", schedule_meta, dtype=torch.int32, ndim=2)
    if schedule_meta.shape[0] < 2 or schedule_meta.shape[1] != 2:
        raise ValueError(f"schedule_meta must have shape [num_sms + 1, 2] (from get_paged_mqa_logits_metadata), "
                         f"got {list(schedule_meta.shape)}")
    _check_contiguous("schedule_meta", schedule_meta)
    max_context_len = check_int("max_context_len", max_context_len, 0)
    clean_logits = check_bool("clean_logits", clean_logits)
    device = check_same_device(q=q, kv_cache=kv_cache, weights=weights, context_lens=context_lens,
                               block_table=block_table, schedule_meta=schedule_meta)
    check_cuda_or_interpreter(device)

    return _run_paged(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits)


def _run_paged(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len: int,
               clean_logits: bool, cfg: K.PagedConfig | None = None) -> torch.Tensor:
    """Allocate the output and launch the paged kernel on validated arguments (``cfg``: tile override)."""
    batch, next_n, num_heads, head_dim = q.shape
    num_blocks, block_kv, _, dp4 = kv_cache.shape
    out = _padded_output(batch * next_n, max_context_len, q.device)
    if batch == 0 or max_context_len == 0:
        return out
    cfg = cfg or K.paged_config(num_heads, head_dim, next_n, block_kv)
    workers = schedule_meta.shape[0] - 1
    block_stride = kv_cache.stride(0) if num_blocks > 1 else block_kv * dp4
    # The FP8 values and the FP32 scales are two typed views of the same bytes (no copy).
    K.paged_mqa_logits_kernel[(workers * cfg.sub,)](
        q, kv_cache.view(FP8), kv_cache.view(torch.float32), weights, context_lens, block_table, schedule_meta, out,
        batch, max_context_len, block_table.shape[1], block_stride, block_table.stride(0), out.stride(0),
        NEXT_N=next_n, H=num_heads, D=head_dim, BLOCK_KV=block_kv, CTX_2D=context_lens.dim() == 2,
        CLEAN=clean_logits, TILE=cfg.tile, SUB=cfg.sub, CLEAN_BLOCK=K.CLEAN_BLOCK,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
