"""Dense GEMMs: ``D = C + A @ B.T`` in FP8 (1D2D / 1D1D scaling) and BF16, DeepGEMM's names.

Semantics: :func:`fp8gemm.reference.fp8_gemm_nt` and :func:`fp8gemm.reference.bf16_gemm_nt`.
The two letters say how A and B enter the product, BLAS-style on row-major tensors:
``nt``: ``A @ B.T`` (A [M, K], B [N, K], both K-major, the native form); ``nn``: ``A @ B`` (B [K, N]);
``tn``: ``A.T @ B`` (A [K, M], B [K, N]); ``tt``: ``A.T @ B.T`` (A [K, M], B [N, K]).  A transposed
operand's scale tensor is transposed likewise.  All reduce to the ``nt`` kernel through strided views.
"""
from __future__ import annotations

import math

import torch

from ._checks import FP8, check_cuda_or_interpreter, check_pair, check_same_device, check_tensor
from .kernels import gemm_dispatch

_OUT_DTYPES = (torch.bfloat16, torch.float32)


def resolve_recipe(recipe, sfb: torch.Tensor, n: int, k: int, name: str = "b") -> int:
    """The B-scale granularity along N: 128 (1D2D, recipe (1, 128, 128)) or 1 (1D1D, recipe (1, 1, 128))."""
    if recipe is not None:
        if tuple(recipe) == (1, 128, 128):
            return 128
        if tuple(recipe) == (1, 1, 128):
            return 1
        raise ValueError(f"recipe must be (1, 128, 128), (1, 1, 128) or None, got {tuple(recipe)}")
    rows = sfb.shape[-2]
    if rows == math.ceil(n / 128):
        return 128
    if rows == n:
        return 1
    raise ValueError(f"{name} scale factors must have {math.ceil(n / 128)} (128x128 blocks) or {n} (per-row) rows "
                     f"for N = {n}, got shape {list(sfb.shape)}")


def check_scales(name: str, sf: torch.Tensor, lead: tuple, rows: int, k: int, gran_rows: int) -> None:
    """FP32 scales [*lead, ceil(rows/gran_rows), ceil(K/128)] in any strides, or packed UE8M0 int32 words."""
    check_tensor(name, sf, dtype=(torch.float32, torch.int32))
    kb = math.ceil(k / 128)
    cols = kb if sf.dtype == torch.float32 else math.ceil(kb / 4)
    check_tensor(name, sf, shape=(*lead, math.ceil(rows / gran_rows), cols))


def check_fp8_operand(name: str, x: torch.Tensor, shape: tuple) -> None:
    check_tensor(name, x, dtype=FP8, shape=shape)


def _validate_dense(a, b, d, c, recipe, scaled: bool):
    if scaled:
        a, sfa = check_pair("a", a)
        b, sfb = check_pair("b", b)
        check_tensor("a[0]", a, dtype=FP8, ndim=2)
        check_tensor("b[0]", b, dtype=FP8, ndim=2)
    else:
        sfa = sfb = None
        check_tensor("a", a, dtype=torch.bfloat16, ndim=2)
        check_tensor("b", b, dtype=torch.bfloat16, ndim=2)
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"b must have shape [N, K] with K = {k} (from a), got {list(b.shape)}")
    if k % 16 != 0:
        raise ValueError(f"K (= {k}) must be a multiple of 16")
    check_tensor("d", d, dtype=_OUT_DTYPES, shape=(m, n))
    gran_n = 128
    if scaled:
        gran_n = resolve_recipe(recipe, sfb, n, k)
        check_scales("a[1]", sfa, (), m, k, 1)
        check_scales("b[1]", sfb, (), n, k, gran_n)
    if c is not None:
        check_tensor("c", c, dtype=torch.float32, shape=(m, n))
        if d.dtype != torch.float32:
            raise TypeError(f"d must be float32 when c is given (FP32 accumulation), got {d.dtype}")
    check_cuda_or_interpreter(check_same_device(a=a, b=b, d=d, c=c, sfa=sfa, sfb=sfb))
    return a, sfa, b, sfb, gran_n


def fp8_gemm_nt(a, b, d: torch.Tensor, c: torch.Tensor | None = None, recipe=None,
                compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """``d = c + a @ b.T`` for FP8 operands ``a = (A [M, K], sfa)``, ``b = (B [N, K], sfb)``.

    Scales: ``sfa`` FP32 [M, ceil(K/128)] (one per row per 128 K); ``sfb`` FP32 [ceil(N/128), ceil(K/128)]
    (recipe (1, 128, 128), the default) or [N, ceil(K/128)] (recipe (1, 1, 128)).  Scales may be in the
    plain row-major layout or already transformed (MN-major, TMA-aligned; see
    :func:`fp8gemm.get_mn_major_tma_aligned_tensor`); neither is copied.  Packed UE8M0 scales (int32, four
    exponent bytes per word, :func:`fp8gemm.pack_ue8m0_to_int`) are accepted too.
    ``d`` is BF16 or FP32 [M, N]; with ``c`` (FP32 [M, N], may be ``d`` itself) ``d`` must be FP32.
    K must be a multiple of 16; a partial last 128-K block uses its scale for the remaining elements.
    ``compiled_dims`` and ``disable_ue8m0_cast`` are accepted for DeepGEMM compatibility (on SM90 the
    scales are used in FP32 as given).  Reference: :func:`fp8gemm.reference.fp8_gemm_nt`.
    """
    a_t, sfa, b_t, sfb, gran_n = _validate_dense(a, b, d, c, recipe, scaled=True)
    if a_t.shape[0] == 0 or b_t.shape[0] == 0:
        return
    gemm_dispatch.run_m_grouped("dense", a_t, sfa, b_t, sfb, d, c=c, gran_n_b=gran_n)


def _t(name: str, pair):
    x, sf = check_pair(name, pair)
    check_tensor(f"{name}[0]", x, ndim=2)
    check_tensor(f"{name}[1]", sf, ndim=2)
    return x.transpose(0, 1), sf.transpose(0, 1)


def fp8_gemm_nn(a, b, d, c=None, recipe=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """``d = c + A @ B`` with ``b = (B [K, N], sfb [ceil(K/128), ceil(N/128)])``."""
    fp8_gemm_nt(a, _t("b", b), d, c, recipe, compiled_dims, disable_ue8m0_cast)


def fp8_gemm_tn(a, b, d, c=None, recipe=None, compiled_dims: str = "mn", disable_ue8m0_cast: bool = False) -> None:
    """``d = c + A.T @ B`` with ``a = (A [K, M], sfa [ceil(K/128), M])`` and ``b = (B [K, N], sfb [ceil(K/128), ceil(N/128)])``."""
    fp8_gemm_nt(_t("a", a), _t("b", b), d, c, recipe, compiled_dims, disable_ue8m0_cast)


def fp8_gemm_tt(a, b, d, c=None, recipe=None, compiled_dims: str = "mn", disable_ue8m0_cast: bool = False) -> None:
    """``d = c + A.T @ B.T`` with ``a = (A [K, M], sfa [ceil(K/128), M])`` and ``b`` as in :func:`fp8_gemm_nt`."""
    fp8_gemm_nt(_t("a", a), b, d, c, recipe, compiled_dims, disable_ue8m0_cast)


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None,
                 compiled_dims: str = "nk") -> None:
    """``d = c + a @ b.T`` for BF16 ``a`` [M, K] and ``b`` [N, K]; FP32 accumulation.

    Reference: :func:`fp8gemm.reference.bf16_gemm_nt`.
    """
    a, _, b, _, _ = _validate_dense(a, b, d, c, None, scaled=False)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return
    gemm_dispatch.run_m_grouped("dense", a, None, b, None, d, c=c)


def bf16_gemm_nn(a, b, d, c=None, compiled_dims: str = "nk") -> None:
    """``d = c + a @ b`` with ``b`` [K, N]."""
    check_tensor("b", b, ndim=2)
    bf16_gemm_nt(a, b.transpose(0, 1), d, c, compiled_dims)


def bf16_gemm_tn(a, b, d, c=None, compiled_dims: str = "mn") -> None:
    """``d = c + a.T @ b`` with ``a`` [K, M] and ``b`` [K, N]."""
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2)
    bf16_gemm_nt(a.transpose(0, 1), b.transpose(0, 1), d, c, compiled_dims)


def bf16_gemm_tt(a, b, d, c=None, compiled_dims: str = "mn") -> None:
    """``d = c + a.T @ b.T`` with ``a`` [K, M] and ``b`` [N, K]."""
    check_tensor("a", a, ndim=2)
    bf16_gemm_nt(a.transpose(0, 1), b, d, c, compiled_dims)
