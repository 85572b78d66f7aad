"""Quantisation helpers and scale-factor layouts, DeepGEMM's names and semantics.

Casts (one fused Triton launch each: load a tile once, reduce the group amaxes, write codes and scales):

- :func:`per_token_cast_to_fp8`: E4M3 + one FP32 scale per (row, ``gran_k`` columns) -- GEMM operand A;
- :func:`per_block_cast_to_fp8`: E4M3 + one FP32 scale per 128 x ``gran_k`` block -- GEMM operand B;
- :func:`per_channel_cast_to_fp8`: E4M3 + one FP32 scale per (``gran_k`` rows, column) -- K-grouped GEMM;
- :func:`per_token_cast_to_fp4`: packed E2M1 + one power-of-two scale per (row, ``gran_k`` columns).

Scale helpers: :func:`ceil_to_ue8m0`, :func:`pack_ue8m0_to_int`, :func:`get_mn_major_tma_aligned_tensor`,
:func:`transform_sf_into_required_layout`.

The semantics -- the amax clamp, the rounding, what inf and NaN inputs give -- are defined once, in the
"Scale factors and quantisation" section of :mod:`fp8gemm.reference`; the kernels reproduce it bit for bit
(same E4M3 / E2M1 bytes, same scale bits).  In short: a NaN in a group makes the group's scale NaN and its
E4M3 codes NaN (0x7F); an inf makes the scale inf, the inf elements NaN and the finite ones zero; all-zero
groups get the scale ``1e-4 / 448`` (``1e-4 / 6`` for FP4) and zero codes.

The casts allocate their outputs; they run on CUDA tensors, or on CPU tensors when Triton's interpreter is
on (``TRITON_INTERPRET=1``).  Inputs may have any strides.
"""
from __future__ import annotations

import math

import torch

from . import reference as R
from . import runtime
from ._checks import FP8, check_bool, check_int, check_tensor
from .kernels import quant as K

_X_DTYPES = (torch.bfloat16, torch.float32, torch.float16)
_GRANS_FP8 = (32, 64, 128)
_GRANS_FP4 = (16, 32, 64, 128)
_TMA_ALIGN_BYTES = 16




def _check_gran(value, allowed: tuple) -> int:
    check_int("gran_k", value)
    if value not in allowed:
        raise ValueError(f"gran_k must be one of {allowed}, got {value}")
    return value


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not runtime.interpreting():
        raise ValueError(f"{name} must be on a CUDA device (or run with TRITON_INTERPRET=1), got {t.device}")


def _check_input(x) -> torch.Tensor:
    check_tensor("x", x, dtype=_X_DTYPES, ndim=2)
    _check_device("x", x)
    return x


def _soft_cvt() -> bool:
    # The interpreter's own fp32 -> fp8 conversion does not round to nearest even (see kernels/quant.py).
    return runtime.interpreting()


# -------------------------------------------------------------------------------------
# Casts
# -------------------------------------------------------------------------------------

def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """Quantise ``x`` [M, K] (BF16 / FP32 / FP16) to E4M3 with one scale per row per ``gran_k`` columns.

    Returns ``(q, sf)``: ``q`` E4M3 [M, K] (contiguous), ``sf`` FP32 [M, ceil(K / gran_k)] (contiguous)
    with ``x ~= q * sf`` group-wise.  ``sf = max(amax, 1e-4) / 448`` over each group (rounded up to a
    power of two with ``use_ue8m0``), ``q = x * (1 / sf)`` rounded to nearest even.  K need not be a
    multiple of ``gran_k`` (the last group of each row is partial).  ``gran_k``: 32, 64 or 128.
    Reference (bit-exact): :func:`fp8gemm.reference.per_token_cast_to_fp8`, including inf/NaN handling.
    """
    x = _check_input(x)
    check_bool("use_ue8m0", use_ue8m0)
    gran_k = _check_gran(gran_k, _GRANS_FP8)
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    sf = torch.empty(m, math.ceil(k / gran_k), dtype=torch.float32, device=x.device)
    if m and k:
        K.launch_per_token(x, q, sf, gran_k, use_ue8m0, _soft_cvt())
    return q, sf


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """Quantise ``x`` [M, K] to E4M3 with one scale per block of 128 rows x ``gran_k`` columns.

    Returns ``(q, sf)``: ``q`` E4M3 [M, K], ``sf`` FP32 [ceil(M / 128), ceil(K / gran_k)]; edge blocks
    are partial.  Same scale and rounding rules as :func:`per_token_cast_to_fp8`.
    Reference (bit-exact): :func:`fp8gemm.reference.per_block_cast_to_fp8`.
    """
    x = _check_input(x)
    check_bool("use_ue8m0", use_ue8m0)
    gran_k = _check_gran(gran_k, _GRANS_FP8)
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    sf = torch.empty(math.ceil(m / 128), math.ceil(k / gran_k), dtype=torch.float32, device=x.device)
    if m and k:
        K.launch_per_block(x, q, sf, gran_k, use_ue8m0, _soft_cvt())
    return q, sf


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """Quantise ``x`` [M, N] to E4M3 with one scale per column per ``gran_k`` rows.

    Returns ``(q, sf)``: ``q`` E4M3 [M, N], ``sf`` FP32 [ceil(M / gran_k), N] -- the layout of the
    K-grouped GEMM's operands (M is the K dimension there).  Same scale and rounding rules as
    :func:`per_token_cast_to_fp8`.  Reference (bit-exact): :func:`fp8gemm.reference.per_channel_cast_to_fp8`.
    """
    x = _check_input(x)
    check_bool("use_ue8m0", use_ue8m0)
    gran_k = _check_gran(gran_k, _GRANS_FP8)
    m, n = x.shape
    q = torch.empty(m, n, dtype=FP8, device=x.device)
    sf = torch.empty(math.ceil(m / gran_k), n, dtype=torch.float32, device=x.device)
    if m and n:
        K.launch_per_channel(x, q, sf, gran_k, use_ue8m0, _soft_cvt())
    return q, sf


def per_token_cast_to_fp4(x: torch.Tensor, use_ue8m0: bool = True, gran_k: int = 32, ue8m0_bytes: bool = False):
    """Quantise ``x`` [M, K] (K even) to E2M1 (FP4), two codes a byte, one scale per row per ``gran_k`` columns.

    Returns ``(q, sf)``:

    - ``q`` uint8 [M, K / 2]: byte j of a row holds column 2j in its low nibble and column 2j+1 in its
      high nibble; a code is ``sign << 3 | index`` into the E2M1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6}
      (``q.view(torch.float4_e2m1fn_x2)`` gives torch's packed FP4 type where it exists).
    - ``sf`` [M, ceil(K / gran_k)]: ``max(amax, 1e-4) / 6``, rounded up to a power of two when
      ``use_ue8m0`` (the default; the FP4 GEMMs need it).  FP32 by default; with ``ue8m0_bytes=True``
      (requires ``use_ue8m0``) the uint8 UE8M0 bytes instead (``2^(byte - 127)``), the form
      :func:`fp8gemm.m_grouped_fp8_gemm_nt_masked` takes with FP4 activations.

    Rounding: to the nearest E2M1 value, a tie going to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4, IEEE-style), magnitudes above 6 saturate, zero carries no sign.
    E2M1 has no NaN: NaN elements get code 0 and the group's scale is NaN (UE8M0 byte 0xFF).
    Reference (bit-exact): :func:`fp8gemm.reference.per_token_cast_to_fp4`.
    """
    x = _check_input(x)
    check_bool("use_ue8m0", use_ue8m0)
    check_bool("ue8m0_bytes", ue8m0_bytes)
    gran_k = _check_gran(gran_k, _GRANS_FP4)
    if ue8m0_bytes and not use_ue8m0:
        raise ValueError("ue8m0_bytes=True needs use_ue8m0=True (only power-of-two scales have a UE8M0 byte)")
    m, k = x.shape
    if k % 2 != 0:
        raise ValueError(f"K (x.shape[1] = {k}) must be even: two E2M1 codes are packed per byte")
    q = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    sf = torch.empty(m, math.ceil(k / gran_k), dtype=torch.uint8 if ue8m0_bytes else torch.float32,
                     device=x.device)
    if m and k:
        K.launch_per_token_fp4(x, q, sf, gran_k, use_ue8m0)
    return q, sf


# -------------------------------------------------------------------------------------
# Scale helpers
# -------------------------------------------------------------------------------------

def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``>= |x|`` elementwise, as FP32 (rounding a scale up to UE8M0).

    Exact: defined on the FP32 bits (``(bits(|x|) + 0x7FFFFF) & 0x7F800000``), not through ``log2``,
    which rounds down for some large inputs.  0 -> 0, subnormals -> 2^-126, > 2^127 and inf -> inf,
    NaN -> NaN.  See :func:`fp8gemm.reference.ceil_to_ue8m0` (this is that function, validated).
    """
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16))
    return R.ceil_to_ue8m0(x)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def pack_ue8m0_to_int(x: torch.Tensor) -> torch.Tensor:
    """Pack FP32 power-of-two scales ``[..., n]`` into int32 ``[..., ceil(n / 4)]``, four UE8M0 bytes a word.

    The exponent byte of element ``4j + i`` is byte ``i`` (bits ``8i .. 8i+7``, little endian) of word
    ``j``; the missing bytes of a last, partial word are 0.  Inverse:
    :func:`fp8gemm.reference.unpack_ue8m0_from_int`.  The values must be powers of two in
    ``[2^-126, 2^127]`` (what :func:`ceil_to_ue8m0` and the ``use_ue8m0`` casts produce); this is checked
    (a host synchronisation) except while a CUDA graph is being captured.
    """
    check_tensor("x", x, dtype=torch.float32)
    if x.dim() == 0:
        raise ValueError(f"x must have at least one dimension, got shape {list(x.shape)}")
    if x.numel() and not _capturing():
        bits = x.view(torch.int32)
        bad = ((bits & 0x807FFFFF) != 0) | (bits == 0) | (bits == 0x7F800000)
        if bool(bad.any()):
            first = x.flatten()[bad.flatten().nonzero()[0, 0]].item()
            raise ValueError(f"x must hold positive powers of two in [2^-126, 2^127] (use ceil_to_ue8m0), "
                             f"got {first!r}")
    return R.pack_ue8m0_to_int(x)


def _aligned_mn(mn: int, element_size: int) -> int:
    per = _TMA_ALIGN_BYTES // element_size
    return -(-mn // per) * per


def _is_mn_major_tma_aligned(sf: torch.Tensor) -> bool:
    mn, k = sf.shape[-2], sf.shape[-1]
    aligned = _aligned_mn(mn, sf.element_size())
    if mn > 1 and sf.stride(-2) != 1:
        return False
    if k > 1 and sf.stride(-1) != aligned:
        return False
    if sf.dim() == 3 and sf.shape[0] > 1 and sf.stride(0) != aligned * k:
        return False
    # A size-1 dimension's stride does not matter for the values, but TMA needs every stride of the
    # storage 16-byte aligned and the base too.
    return sf.data_ptr() % _TMA_ALIGN_BYTES == 0


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """The same scales, MN-major, with the MN dimension padded to 16 bytes (4 elements) in the storage.

    ``sf`` is FP32 (or packed-UE8M0 int32) ``[mn, k]`` or ``[G, mn, k]``.  The result has the same shape
    and values and strides ``(1, aligned_mn)`` (``(aligned_mn * k, 1, aligned_mn)`` for 3-D), with
    ``aligned_mn = ceil(mn / 4) * 4``: the layout TMA loads the per-row scales of a GEMM operand from.
    The padding elements are zero.  If ``sf`` already has this layout it is returned itself (no copy).
    """
    check_tensor("sf", sf, dtype=(torch.float32, torch.int32))
    if sf.dim() not in (2, 3):
        raise ValueError(f"sf must be 2-D [mn, k] or 3-D [G, mn, k], got shape {list(sf.shape)}")
    if _is_mn_major_tma_aligned(sf):
        return sf
    return mn_major_copy(sf, zero_pad=True)


def empty_mn_major(groups: int, mn: int, k: int, dtype=torch.float32, device=None,
                   zero_pad: bool = False) -> torch.Tensor:
    """An uninitialised ``[groups, mn, k]`` tensor in the MN-major, TMA-aligned layout of
    :func:`get_mn_major_tma_aligned_tensor` (strides ``(aligned_mn * k, 1, aligned_mn)``); ``zero_pad``: the
    storage starts zeroed (the padding then reads 0)."""
    aligned = _aligned_mn(mn, torch.empty((), dtype=dtype).element_size())
    storage = (torch.zeros if zero_pad else torch.empty)(groups, k, aligned, dtype=dtype, device=device)
    return storage.transpose(1, 2)[:, :mn, :]


def mn_major_copy(sf: torch.Tensor, zero_pad: bool = False) -> torch.Tensor:
    """A copy of 2-D or 3-D scales in the layout of :func:`empty_mn_major` (one copy kernel; with ``zero_pad`` a
    fill too).  For callers that need a copy whatever ``sf``'s layout."""
    squeeze = sf.dim() == 2
    src = sf.unsqueeze(0) if squeeze else sf
    out = empty_mn_major(*src.shape, dtype=sf.dtype, device=sf.device, zero_pad=zero_pad)
    out.copy_(src)
    return out[0] if squeeze else out


def _check_recipe(recipe, is_sfa: bool) -> tuple[int, int]:
    if not isinstance(recipe, (tuple, list)) or len(recipe) not in (2, 3) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in recipe):
        raise ValueError(f"recipe must be a tuple of 3 positive ints (gran_m_a, gran_n_b, gran_k) or of 2 "
                         f"(gran_mn, gran_k), got {recipe!r}")
    if len(recipe) == 2:
        return recipe[0], recipe[1]
    return (recipe[0] if is_sfa else recipe[1]), recipe[2]


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe, num_groups: int | None = None,
                                      is_sfa: bool = False, disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """Validate scale factors against ``(mn, k, recipe)`` and put them in the layout the SM90 GEMMs load.

    ``recipe`` is DeepGEMM's ``(gran_m_a, gran_n_b, gran_k)`` -- ``gran_mn`` is ``recipe[0]`` for A's
    scales (``is_sfa=True``) and ``recipe[1]`` for B's -- or directly ``(gran_mn, gran_k)``.  ``sf`` must be
    FP32 ``[ceil(mn / gran_mn), ceil(k / gran_k)]`` (packed UE8M0 int32: ``[.., ceil(ceil(k / gran_k) / 4)]``),
    with a leading ``num_groups`` dimension when ``num_groups`` is given.

    On SM90 (DeepGEMM's rules): per-row scales (``gran_mn == 1``) become MN-major and TMA aligned
    (:func:`get_mn_major_tma_aligned_tensor`, no copy if they already are); block scales
    (``gran_mn > 1``) are returned as they are (the GEMMs read them with plain loads, any strides).
    ``disable_ue8m0_cast`` is accepted for compatibility: on SM90 scales stay FP32 either way.
    """
    check_tensor("sf", sf, dtype=(torch.float32, torch.int32))
    check_int("mn", mn)
    check_int("k", k)
    check_bool("is_sfa", is_sfa)
    check_bool("disable_ue8m0_cast", disable_ue8m0_cast)
    gran_mn, gran_k = _check_recipe(recipe, is_sfa)
    kb = math.ceil(k / gran_k)
    cols = kb if sf.dtype == torch.float32 else math.ceil(kb / 4)
    rows = math.ceil(mn / gran_mn)
    if num_groups is None:
        check_tensor("sf", sf, shape=(rows, cols))
    else:
        check_int("num_groups", num_groups, 1)
        check_tensor("sf", sf, shape=(num_groups, rows, cols))
    if gran_mn == 1:
        return get_mn_major_tma_aligned_tensor(sf)
    return sf
