"""Grouped GEMMs for mixture-of-experts layers, DeepGEMM's names and argument conventions.

- contiguous (prefill): the rows of all experts concatenated, one expert id per row;
- masked (decode): ``[G, max_m, K]`` with a per-expert valid-row count on the device, CUDA-graph
  friendly, with the Single Batch Overlap signals of DESIGN.md §3;
- K-grouped (weight gradients).

Semantics: the grouped functions of :mod:`fp8gemm.reference`.  Every launch is free of host
synchronisation, so it can be captured in a CUDA graph; only FP4 activations on the Gluon route allocate
(their FP8 operand, per call, from torch's caching allocator -- static sizes keep that graph-safe).
"""
from __future__ import annotations

import math

import torch

from . import runtime
from ._checks import FP8, check_cuda_or_interpreter, check_pair, check_same_device, check_tensor
from .gemm import check_scales, resolve_recipe
from .kernels import gemm_dispatch

_OUT_DTYPES = (torch.bfloat16, torch.float32)



_FP4_DTYPES = tuple(t for t in (torch.uint8, getattr(torch, "float4_e2m1fn_x2", None)) if t is not None)


def _operands(a, b, scaled: bool, a_ndim: int):
    """Validated (a, sfa, b, sfb); FP4 activations come back as uint8 codes with their scale bytes."""
    if scaled:
        a, sfa = check_pair("a", a)
        b, sfb = check_pair("b", b)
        check_tensor("a[0]", a, dtype=(FP8,) + _FP4_DTYPES, ndim=a_ndim)
        check_tensor("b[0]", b, dtype=FP8, ndim=3)
    else:
        sfa = sfb = None
        check_tensor("a", a, dtype=torch.bfloat16, ndim=a_ndim)
        check_tensor("b", b, dtype=torch.bfloat16, ndim=3)
    k = b.shape[-1]
    if a.dtype in _FP4_DTYPES:
        a = a.view(torch.uint8)
        if a.shape[-1] * 2 != k:
            raise ValueError(f"a[0] holds two E2M1 codes per byte: its last dim must be K/2 = {k // 2} "
                             f"(K = {k} from b), got {list(a.shape)}")
        if k % 32 != 0:
            raise ValueError(f"K (= {k}) must be a multiple of 32 for FP4 activations (one scale per 32)")
        check_tensor("a[1]", sfa, dtype=torch.uint8, shape=(*a.shape[:-1], k // 32))
    elif a.shape[-1] != k:
        raise ValueError(f"b must have shape [G, N, K] with K = {a.shape[-1]} (from a), got {list(b.shape)}")
    if k % 16 != 0:
        raise ValueError(f"K (= {k}) must be a multiple of 16")
    return a, sfa, b, sfb


def _check_sfa(sfa, lead, rows, k):
    if sfa.dtype != torch.uint8:  # FP4 scale bytes were checked with their codes
        check_scales("a[1]", sfa, lead, rows, k, 1)


# ------------------------------------------------------------------------------------------------
# Contiguous layout
# ------------------------------------------------------------------------------------------------

def _contiguous(a, b, d, m_indices, recipe, scaled: bool) -> None:
    a, sfa, b, sfb = _operands(a, b, scaled, 2)
    m = a.shape[0]
    g, n, k = b.shape
    check_tensor("d", d, dtype=_OUT_DTYPES, shape=(m, n))
    check_tensor("m_indices", m_indices, dtype=torch.int32, shape=(m,))
    alignment = runtime.get_mk_alignment_for_contiguous_layout()
    if m % alignment != 0:
        raise ValueError(f"the contiguous layout's row count (a rows = {m}) must be a multiple of "
                         f"get_mk_alignment_for_contiguous_layout() = {alignment}")
    gran_n = 128
    if scaled:
        gran_n = resolve_recipe(recipe, sfb, n, k)
        _check_sfa(sfa, (), m, k)
        check_scales("b[1]", sfb, (g,), n, k, gran_n)
    check_cuda_or_interpreter(check_same_device(a=a, b=b, d=d, m_indices=m_indices, sfa=sfa, sfb=sfb))
    if m == 0 or n == 0:
        return
    if runtime.debug_checks():
        _debug_check_contiguous(m_indices, g, alignment)
    gemm_dispatch.run_m_grouped("contiguous", a, sfa, b, sfb, d, m_indices=m_indices, gran_n_b=gran_n,
                                force_block_m=64 if alignment == 64 else None)


def _debug_check_contiguous(m_indices: torch.Tensor, num_groups: int, alignment: int) -> None:
    ids = m_indices.view(-1, alignment)
    bad = (ids >= num_groups) | (ids < -1)
    if bool(bad.any()):
        raise ValueError(f"m_indices holds ids outside [-1, {num_groups}) (FP8GEMM_DEBUG check)")
    top = ids.max(dim=1, keepdim=True).values
    if bool(((ids != top) & (ids != -1)).any()):
        raise ValueError(f"each aligned block of {alignment} rows of m_indices must hold one expert id "
                         f"(plus -1 padding) (FP8GEMM_DEBUG check)")


def m_grouped_fp8_gemm_nt_contiguous(a, b, d: torch.Tensor, m_indices: torch.Tensor, recipe=None,
                                     compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """MoE prefill GEMM: ``d[r] = A[r] @ B[m_indices[r]].T`` for every row r with ``m_indices[r] >= 0``.

    ``a = (A [M, K] FP8, sfa [M, ceil(K/128)])``, ``b = (B [G, N, K] FP8, sfb [G, ceil(N/128), ceil(K/128)])``,
    ``d`` BF16/FP32 [M, N], ``m_indices`` int32 [M].  Each expert's rows form one segment whose length is
    padded to a multiple of :func:`fp8gemm.get_mk_alignment_for_contiguous_layout` with ``-1`` rows.
    **Rows with id -1 are left untouched in ``d``** (never written), as are rows of a block whose id is
    not below G (out-of-range ids are not read from B).  A block of aligned rows must hold one expert
    (plus -1 rows); ``FP8GEMM_DEBUG=1`` checks that (with a host sync).
    Reference: :func:`fp8gemm.reference.m_grouped_fp8_gemm_nt_contiguous`.
    """
    _contiguous(a, b, d, m_indices, recipe, scaled=True)


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, m_indices: torch.Tensor,
                                      compiled_dims: str = "nk") -> None:
    """BF16 twin of :func:`m_grouped_fp8_gemm_nt_contiguous` (``a`` [M, K], ``b`` [G, N, K] BF16)."""
    _contiguous(a, b, d, m_indices, None, scaled=False)


# ------------------------------------------------------------------------------------------------
# Masked layout (decode), with SBO signals
# ------------------------------------------------------------------------------------------------

MIN_SIGNAL_BLOCK_M = 16


def get_masked_signal_size(num_groups: int, max_m: int, block_m: int = MIN_SIGNAL_BLOCK_M) -> int:
    """Counters a masked GEMM with ``enable_overlap=True`` may use: ``num_groups * ceil(max_m / block_m)``.

    With the default (the smallest block_m any kernel picks) the array fits every configuration.
    """
    return num_groups * math.ceil(max_m / block_m)


def alloc_signal(num_groups: int, max_m: int, device) -> torch.Tensor:
    """A zeroed int32 signal array large enough for any masked-GEMM configuration."""
    return torch.zeros(get_masked_signal_size(num_groups, max_m), dtype=torch.int32, device=device)


def _masked(a, b, d, masked_m, expected_m, recipe, max_block_n, enable_overlap, signal, scaled: bool,
            d_sf=None):
    a, sfa, b, sfb = _operands(a, b, scaled, 3)
    g, max_m = a.shape[:2]
    k = b.shape[-1]
    if b.shape[0] != g:
        raise ValueError(f"b must have {g} groups (from a), got shape {list(b.shape)}")
    n = b.shape[1]
    if d_sf is None:
        check_tensor("d", d, dtype=_OUT_DTYPES, shape=(g, max_m, n))
    else:
        if not scaled:
            raise ValueError("d_sf (the FP8 combine payload) needs the FP8 GEMM")
        if n % 128:
            raise ValueError(f"d_sf needs N (b[0].shape[1] = {n}) to be a multiple of 128")
        check_tensor("d", d, dtype=FP8, shape=(g, max_m, n))
        check_tensor("d_sf", d_sf, dtype=torch.uint8, shape=(g, max_m, n // 128))
        if d.stride(-1) != 1 or d_sf.stride(-1) != 1:
            raise ValueError("d and d_sf must be row-major (unit stride along the last dim)")
    check_tensor("masked_m", masked_m, dtype=torch.int32, shape=(g,))
    if not isinstance(expected_m, int) or isinstance(expected_m, bool) or expected_m < 0:
        raise TypeError(f"expected_m must be a non-negative int (a hint for the tile choice), got {expected_m!r}")
    if not isinstance(max_block_n, int) or not 16 <= max_block_n <= 256 or max_block_n % 16:
        raise ValueError(f"max_block_n must be a multiple of 16 in [16, 256], got {max_block_n!r}")
    gran_n = 128
    if scaled:
        gran_n = resolve_recipe(recipe, sfb, n, k)
        _check_sfa(sfa, (g,), max_m, k)
        check_scales("b[1]", sfb, (g,), n, k, gran_n)
    device = check_same_device(a=a, b=b, d=d, masked_m=masked_m, sfa=sfa, sfb=sfb, signal=signal, d_sf=d_sf)
    check_cuda_or_interpreter(device)
    expected_m = max(expected_m, 1)
    if enable_overlap:
        if signal is None:
            raise ValueError("signal must be given when enable_overlap=True (an int32 tensor, see alloc_signal)")
        check_tensor("signal", signal, dtype=torch.int32, ndim=1)
        if not signal.is_contiguous():
            raise ValueError("signal must be contiguous")
        block_m, block_n = gemm_dispatch.plan_tiles("masked", a, sfa, b, sfb, d, expected_m=expected_m,
                                                    gran_n_b=gran_n, max_block_n=max_block_n)
        need = g * math.ceil(max_m / block_m)
        if signal.numel() < need:
            raise ValueError(f"signal must hold at least num_groups * ceil(max_m / block_m) = {g} * "
                             f"ceil({max_m} / {block_m}) = {need} counters, got {signal.numel()}")
    elif signal is not None:
        raise ValueError("signal is only used with enable_overlap=True")
    if max_m == 0 or n == 0 or g == 0:
        return (block_m, math.ceil(n / block_n)) if enable_overlap else None
    used = gemm_dispatch.run_m_grouped(
        "masked", a, sfa, b, sfb, d, masked_m=masked_m, signal=signal if enable_overlap else None,
        expected_m=expected_m, gran_n_b=gran_n, max_block_n=max_block_n, d_sf=d_sf)
    if enable_overlap:
        # The signal array was checked against the planned tiles: the launch must have used them.
        assert used == (block_m, block_n), f"masked GEMM planned tiles {(block_m, block_n)} but ran {used}"
        return block_m, math.ceil(n / block_n)
    return None


def m_grouped_fp8_gemm_nt_masked(a, b, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int, recipe=None,
                                 compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
                                 max_block_n: int = 256, enable_overlap: bool = False,
                                 signal: torch.Tensor | None = None, d_sf: torch.Tensor | None = None):
    """MoE decode GEMM: ``d[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g].T``; other rows untouched.

    ``a = (A [G, max_m, K] FP8, sfa [G, max_m, ceil(K/128)])``, ``b = (B [G, N, K], sfb [G, ceil(N/128), ceil(K/128)])``,
    ``d`` [G, max_m, N] BF16/FP32, ``masked_m`` int32 [G] on the device (values above max_m count as max_m),
    ``expected_m`` a host-side hint of the typical ``masked_m`` (picks the tiles; results never depend on it).

    FP4 activations: ``a = (codes uint8 [G, max_m, K/2], scale bytes uint8 [G, max_m, K/32])`` -- E2M1
    codes two per byte (low nibble = even column) with one UE8M0 exponent byte per 32 values, as
    :func:`fp8gemm.per_token_cast_to_fp4` makes them.  They become E4M3 with one FP32 scale per 128
    (exact while a 32-chunk's scale is within 2^8 of its 128-block's largest): on SM90 with the Gluon
    kernel, one fused convert launch (:mod:`fp8gemm.kernels.fp4_convert`, rows below ``masked_m`` only)
    writes a temporary FP8 operand ``[G, max_m, K]`` that the Gluon GEMM reads; elsewhere (and with
    ``FP8GEMM_BACKEND=triton``) the Triton kernel converts inside its A-load; both give the same values
    (see :mod:`fp8gemm.kernels.gemm_dispatch`).  The same form is accepted by
    :func:`m_grouped_fp8_gemm_nt_contiguous`.  Reference: :func:`fp8gemm.reference.dequantize_fp4`.

    With ``enable_overlap=True`` (Single Batch Overlap, DESIGN.md §3) the kernel increments
    ``signal[g * ceil(max_m / block_m) + i]`` once per N-tile of m-block i of group g, after that
    tile's stores, with release ordering; counters of blocks at or past ``masked_m[g]`` are not
    touched.  The call returns ``(block_m, threshold)``: rows ``[i*block_m, (i+1)*block_m)`` of group g
    are final once the counter equals ``threshold = ceil(N / block_n)``.  **The caller zeroes
    ``signal`` before each call** (``signal.zero_()``; :func:`alloc_signal` sizes one for any
    configuration).  Without overlap the call returns ``None``.
    Reference: :func:`fp8gemm.reference.m_grouped_fp8_gemm_nt_masked`, :func:`fp8gemm.reference.masked_signal_counts`.

    ``d_sf`` (an fp8gemm extension, for the expert-parallel layer's FP8 combine): with ``d`` FP8 E4M3
    ``[G, max_m, N]`` and ``d_sf`` uint8 ``[G, max_m, N / 128]`` (N a multiple of 128) the kernel writes the FP8
    combine payload of the BF16 result instead of the result -- ``d, d_sf =
    quantize_combine_payload(bf16 result)`` (:func:`fp8gemm.reference.quantize_combine_payload`) on the
    rows below ``masked_m`` -- from 128-column tiles (so the SBO threshold is ``N / 128``).
    """
    return _masked(a, b, d, masked_m, expected_m, recipe, max_block_n, enable_overlap, signal, scaled=True,
                   d_sf=d_sf)


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                                  expected_m: int, compiled_dims: str = "nk", max_block_n: int = 256,
                                  enable_overlap: bool = False, signal: torch.Tensor | None = None):
    """BF16 twin of :func:`m_grouped_fp8_gemm_nt_masked` (``a`` [G, max_m, K], ``b`` [G, N, K] BF16)."""
    return _masked(a, b, d, masked_m, expected_m, None, max_block_n, enable_overlap, signal, scaled=False)


# ------------------------------------------------------------------------------------------------
# K-grouped (weight gradients)
# ------------------------------------------------------------------------------------------------

def k_grouped_fp8_gemm_tn_contiguous(a, b, d: torch.Tensor, ks: list[int], ks_tensor: torch.Tensor,
                                     c: torch.Tensor | None = None, recipe=(1, 1, 128),
                                     compiled_dims: str = "mn") -> None:
    """MoE weight-gradient GEMM: ``d[g] = c[g] + A_g.T @ B_g``, group g owning K-rows ``sum(ks[:g])`` on.

    ``a = (A [sum(ks), M] FP8, sfa [sum(ks)/128, M] FP32)``, ``b = (B [sum(ks), N], sfb [sum(ks)/128, N])``
    (one scale per 128 K-rows per column, as :func:`fp8gemm.per_channel_cast_to_fp8` makes them);
    ``d`` FP32 [G, M, N]; ``c`` FP32 [G, M, N] or None (may be ``d``).  Every ``ks[g]`` is a multiple of 128;
    ``ks_tensor`` is ``ks`` as an int32 device tensor (the kernel reads it, so a graph replay may change it).
    Reference: :func:`fp8gemm.reference.k_grouped_fp8_gemm_tn_contiguous`.
    """
    if recipe is not None and tuple(recipe) != (1, 1, 128):
        raise ValueError(f"recipe must be (1, 1, 128) for the K-grouped GEMM, got {tuple(recipe)}")
    a, sfa = check_pair("a", a)
    b, sfb = check_pair("b", b)
    check_tensor("a[0]", a, dtype=FP8, ndim=2)
    check_tensor("b[0]", b, dtype=FP8, ndim=2)
    total_k, m = a.shape
    n = b.shape[1]
    if b.shape[0] != total_k:
        raise ValueError(f"b must have shape [sum(ks) = {total_k}, N], got {list(b.shape)}")
    if not isinstance(ks, (list, tuple)) or not all(isinstance(x, int) and x >= 0 for x in ks):
        raise TypeError(f"ks must be a list of non-negative ints, got {ks!r}")
    bad = [x for x in ks if x % 128]
    if bad:
        raise ValueError(f"every ks[g] must be a multiple of 128, got {bad[0]}")
    if sum(ks) != total_k:
        raise ValueError(f"sum(ks) = {sum(ks)} must equal a's row count {total_k}")
    g = len(ks)
    check_tensor("ks_tensor", ks_tensor, dtype=torch.int32, shape=(g,))
    check_tensor("a[1]", sfa, dtype=torch.float32, shape=(total_k // 128, m))
    check_tensor("b[1]", sfb, dtype=torch.float32, shape=(total_k // 128, n))
    check_tensor("d", d, dtype=torch.float32, shape=(g, m, n))
    if c is not None:
        check_tensor("c", c, dtype=torch.float32, shape=(g, m, n))
    check_cuda_or_interpreter(check_same_device(a=a, b=b, d=d, c=c, ks_tensor=ks_tensor, sfa=sfa, sfb=sfb))
    gemm_dispatch.run_k_grouped(a, sfa, b, sfb, d, c, ks_tensor, g)
