"""The semantics of every fp8gemm operation, in plain PyTorch.

This module is the single source of truth: each kernel's docstring points here, every test
compares against these functions, and where a kernel and this module disagree the kernel is wrong.
The references favour clarity over speed: de-quantise, compute in float32 (float64 where noted),
cast once at the end.

Sections: scale factors and quantisation · GEMMs · grouped GEMMs · MQA logits · MoE activations.
"""
from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

# =====================================================================================
# Scale factors and quantisation
# =====================================================================================
# Conventions shared by every cast (DeepGEMM's, made exact where DeepGEMM leaves room):
#
# * a "group" is the block of elements that shares one scale; the tensor is zero-padded up to
#   whole groups first (padding never changes an amax, it is |x| >= 0);
# * amax = max |x| over the group in FP32, clamped below at 1e-4 (so all-zero groups get a
#   finite, non-zero scale); sf = amax / fmt_max (448 for E4M3, 6 for E2M1), IEEE division;
# * with UE8M0, sf is rounded up to a power of two by :func:`ceil_to_ue8m0`;
# * codes = cast(x_fp32 * (1 / sf)): the reciprocal is taken once (IEEE division) and multiplied,
#   as DeepGEMM does; the product is cast with round-to-nearest-even;
# * inf / NaN: NaN propagates: a group holding a NaN gets a NaN scale (canonical bits 0x7FC00000)
#   and NaN codes throughout (E4M3 NaN is the positive code 0x7F); a group holding +-inf (and no
#   NaN) gets an inf scale, its infinite elements become NaN (inf * 1/inf = inf * 0) and its finite
#   elements 0 (signed zero, E4M3 0x00 / 0x80).  E2M1 has no NaN: NaN values become code 0 and the
#   scale carries the NaN (its UE8M0 byte is 0xFF).
#
# The E4M3 codes never need saturation: |x * (1/sf)| <= amax * (1/sf) <= 448 * (1 + 2^-22), which
# rounds to 448.

_NAN_BITS = 0x7FC00000      # the canonical (quiet, positive) FP32 NaN every scale NaN is written as
E4M3_NAN = 0x7F             # the E4M3 NaN code every NaN code is written as (positive sign)
AMAX_FLOOR = 1e-4           # DeepGEMM's clamp of the group amax
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # magnitudes of the codes 0..7 (bit 3 is the sign)


def _canonical_nan(sf: torch.Tensor) -> torch.Tensor:
    nan = torch.tensor(_NAN_BITS, dtype=torch.int32, device=sf.device).view(torch.float32)
    return torch.where(sf.isnan(), nan, sf)


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``>= |x|``, elementwise, as FP32 (the UE8M0 rounding of a scale).

    Defined on the bits, not through ``log2`` (a float ``log2`` of ``2^k * (1 + 2^-23)`` rounds to
    ``k`` for large ``k`` and would round down): with ``b`` the bits of ``|x|`` as FP32,
    ``result_bits = (b + 0x007FFFFF) & 0x7F800000`` -- any non-zero mantissa carries into the exponent
    and the mantissa is cleared.  Hence: exact powers of two map to themselves; values above
    ``2^127`` and ``inf`` give ``inf``; ``0`` gives ``0``; subnormals give ``2^-126`` (the smallest
    normal power of two, so every non-zero result has a UE8M0 byte); NaN gives NaN (0x7FC00000).
    The sign is dropped.  The casts never feed it zeros or subnormals (amax >= 1e-4).
    """
    bits = x.float().abs().view(torch.int32).to(torch.int64)
    out = ((bits + 0x007FFFFF) & 0x7F800000).to(torch.int32).view(torch.float32)
    return _canonical_nan(torch.where(x.isnan(), float("nan"), out))


def to_ue8m0_bytes(sf: torch.Tensor) -> torch.Tensor:
    """The UE8M0 byte of FP32 scales: the FP32 exponent field, uint8 (``2^(byte - 127)``).

    Exact for (non-negative) powers of two in ``[2^-126, 2^127]``; ``inf`` and NaN give 0xFF, 0 gives 0.
    """
    return ((sf.float().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def pack_ue8m0_to_int(sf: torch.Tensor) -> torch.Tensor:
    """FP32 powers of two ``[..., n]`` -> int32 ``[..., ceil(n / 4)]``, four UE8M0 bytes a word.

    The byte of element ``4j + i`` is byte ``i`` (little endian: bits ``8i .. 8i+7``) of word ``j``;
    missing elements of the last word are 0 bytes.  Inverse: :func:`unpack_ue8m0_from_int`.
    """
    b = to_ue8m0_bytes(sf)
    pad = (-b.shape[-1]) % 4
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    words = b.to(torch.int64).reshape(*b.shape[:-1], -1, 4)
    packed = words[..., 0] | (words[..., 1] << 8) | (words[..., 2] << 16) | (words[..., 3] << 24)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)     # the uint32 word read as int32


def to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """FP32 -> E4M3 with round-to-nearest-even (torch's cast), every NaN written as the code 0x7F."""
    q = y.float().to(FP8)
    bits = q.view(torch.uint8)
    return torch.where(y.isnan(), torch.full_like(bits, E4M3_NAN), bits).view(FP8)


def _group_scales(x: torch.Tensor, rows: int, cols: int, fmt_max: float, use_ue8m0: bool):
    """Zero-padded ``x`` as ``[Mb, rows, Kb, cols]`` (FP32) and its scales ``[Mb, Kb]``."""
    m, k = x.shape
    mp, kp = -(-m // rows) * rows, -(-k // cols) * cols
    xp = torch.zeros(mp, kp, dtype=torch.float32, device=x.device)
    xp[:m, :k] = x.float()
    xv = xp.view(mp // rows, rows, kp // cols, cols)
    if xv.numel() == 0:
        return xv, torch.zeros(mp // rows, kp // cols, dtype=torch.float32, device=x.device)
    amax = xv.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR)      # amax and clamp both propagate NaN
    # Tensor-by-tensor division: PyTorch's CUDA kernels turn division by a Python scalar into a
    # multiplication by its reciprocal, which is not IEEE division and would make the reference
    # depend on the device it runs on.
    sf = amax / torch.full_like(amax, fmt_max)
    if use_ue8m0:
        sf = ceil_to_ue8m0(sf)
    return xv, _canonical_nan(sf)


def _cast_fp8(x, rows, cols, use_ue8m0):
    m, k = x.shape
    xv, sf = _group_scales(x, rows, cols, FP8_MAX, use_ue8m0)
    inv = torch.ones_like(sf) / sf
    y = xv * inv[:, None, :, None]
    q = to_e4m3(y.reshape(xv.shape[0] * rows, xv.shape[2] * cols)[:m, :k])
    return q.contiguous(), sf


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """``x`` [M, K] -> (E4M3 [M, K], FP32 scales [M, ceil(K / gran_k)]): one scale per row per ``gran_k`` columns.

    The last group of a row may be partial (K need not be a multiple of ``gran_k``).  See the
    section's conventions for the scale, the rounding and inf/NaN.
    """
    return _cast_fp8(x, 1, gran_k, use_ue8m0)


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """``x`` [M, K] -> (E4M3 [M, K], FP32 scales [ceil(M / 128), ceil(K / gran_k)]): one scale per 128 x gran_k block."""
    return _cast_fp8(x, 128, gran_k, use_ue8m0)


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """``x`` [M, N] -> (E4M3 [M, N], FP32 scales [ceil(M / gran_k), N]): one scale per column per ``gran_k`` rows.

    The layout the K-grouped GEMM takes (M is the K dimension there).
    """
    return _cast_fp8(x, gran_k, 1, use_ue8m0)


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """FP32 -> E2M1 codes (uint8 0..15: bit 3 the sign, bits 0-2 the index into ``E2M1_VALUES``).

    Definition: the magnitude goes to the nearest of {0, 0.5, 1, 1.5, 2, 3, 4, 6}; a value exactly
    half-way between two goes to the one with the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), as IEEE round-to-nearest-even does; magnitudes above 6
    (and inf) saturate to 6.  A result of magnitude 0 is always code 0 (no negative zero).  NaN -> 0.
    """
    mag = y.double().abs().clamp(max=E2M1_MAX)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float64, device=y.device)
    dist = (mag.unsqueeze(-1) - table).abs()
    nearest = dist == dist.min(dim=-1, keepdim=True).values
    even = (torch.arange(8, device=y.device) % 2) == 0
    code = (nearest.to(torch.int64) * 2 + (nearest & even).to(torch.int64)).argmax(dim=-1)  # nearest, even first
    code = torch.where(y.isnan(), 0, code)
    negative = (y < 0) & (code != 0)
    return (code | (negative.to(torch.int64) << 3)).to(torch.uint8)


def per_token_cast_to_fp4(x: torch.Tensor, use_ue8m0: bool = True, gran_k: int = 32, ue8m0_bytes: bool = False):
    """``x`` [M, K] (K even) -> (E2M1 codes uint8 [M, K / 2], scales [M, ceil(K / gran_k)]).

    Two codes a byte: the even column in the low nibble, the odd column in the high nibble
    (:func:`e2m1_codes` for the rounding).  sf = max(amax, 1e-4) / 6, rounded up to a power of two
    when ``use_ue8m0`` (the default, what the FP4 GEMMs take).  Scales come back as FP32, or with
    ``ue8m0_bytes=True`` (needs ``use_ue8m0``) as their uint8 UE8M0 bytes (:func:`to_ue8m0_bytes`).
    """
    m, k = x.shape
    xv, sf = _group_scales(x, 1, gran_k, E2M1_MAX, use_ue8m0)
    y = (xv * (torch.ones_like(sf) / sf)[:, None, :, None]).reshape(m, xv.shape[2] * gran_k)[:, :k]
    codes = e2m1_codes(y)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.contiguous(), (to_ue8m0_bytes(sf) if ue8m0_bytes else sf)


# =====================================================================================
# GEMMs: D = C + A @ B.T  (the "NT" form; A is [M, K], B is [N, K])
# =====================================================================================

def expand_scales(sf: torch.Tensor, rows: int, cols: int, gran_rows: int, gran_cols: int) -> torch.Tensor:
    """Broadcast a block-scale tensor ``[ceil(rows/gr), ceil(cols/gc)]`` to one scale per element."""
    sf = sf.float()
    sf = sf.repeat_interleave(gran_rows, dim=-2)[..., :rows, :]
    return sf.repeat_interleave(gran_cols, dim=-1)[..., :cols]


def dequantize(x: torch.Tensor, sf: torch.Tensor, gran_rows: int, gran_cols: int = 128) -> torch.Tensor:
    """FP8 values times their scales (one per ``gran_rows x gran_cols`` block), in float32.

    ``sf`` may be FP32 or packed UE8M0 (int32, four exponent bytes per word along the last dim).
    """
    if sf.dtype == torch.int32:
        sf = unpack_ue8m0_from_int(sf, math.ceil(x.shape[-1] / gran_cols))
    return x.float() * expand_scales(sf, x.shape[-2], x.shape[-1], gran_rows, gran_cols)


def unpack_ue8m0_from_int(packed: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Inverse of ``pack_ue8m0_to_int``: int32 words of four UE8M0 bytes (low byte first) -> FP32 powers of two."""
    b = packed.contiguous().view(torch.uint8).to(torch.int32)   # [..., words * 4], little endian
    b = b[..., :num_cols]
    return torch.pow(2.0, (b - 127).float())


def dequantize_fp4(codes: torch.Tensor, scale_bytes: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Packed E2M1 (two codes a byte, low nibble = even column) times UE8M0 scales (``2^(byte - 127)``
    per ``group`` values) -> float32 ``[..., 2 * codes.shape[-1]]``."""
    c = codes.view(torch.uint8).to(torch.int64)
    nib = torch.stack([c & 0xF, c >> 4], dim=-1).flatten(-2)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    vals = table[nib & 7] * torch.where(nib >= 8, -1.0, 1.0)
    scales = torch.pow(2.0, scale_bytes.to(torch.float32) - 127.0).repeat_interleave(group, dim=-1)
    return vals * scales[..., :vals.shape[-1]]


def fp8_gemm_nt(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                c: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                gran_n_b: int = 128, gran_k: int = 128) -> torch.Tensor:
    """``D = C + dequant(A) @ dequant(B).T`` with FP32 accumulation.

    ``a`` [M, K] FP8 with ``sfa`` [M, ceil(K/gran_k)] (one scale per row per ``gran_k`` K-elements);
    ``b`` [N, K] FP8 with ``sfb`` [ceil(N/gran_n_b), ceil(K/gran_k)] (``gran_n_b`` = 128: 128x128 blocks,
    the "1D2D" recipe; 1: per-row, the "1D1D" recipe).  ``c`` (FP32, optional) is added before the cast.
    """
    da = dequantize(a, sfa, 1, gran_k)
    db = dequantize(b, sfb, gran_n_b, gran_k)
    d = da @ db.T
    if c is not None:
        d = d + c.float()
    return d.to(out_dtype)


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``D = C + A @ B.T`` for BF16 A [M, K] and B [N, K], FP32 accumulation."""
    d = a.float() @ b.float().T
    if c is not None:
        d = d + c.float()
    return d.to(out_dtype)


# =====================================================================================
# Grouped GEMMs (mixture of experts)
# =====================================================================================

def m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, d_init: torch.Tensor,
                                     gran_n_b: int = 128) -> torch.Tensor:
    """Contiguous layout: row r of A belongs to expert ``m_indices[r]``; ``b`` is [G, N, K].

    Rows with ``m_indices[r] == -1`` are padding: their output rows are left exactly as they were
    in ``d_init`` (the kernels never write them).  Returns a new tensor.
    """
    d = d_init.clone()
    if a.shape[0] == 0:
        return d
    da = dequantize_fp4(a, sfa) if a.dtype == torch.uint8 else dequantize(a, sfa, 1)
    for g in range(b.shape[0]):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel() == 0:
            continue
        db = dequantize(b[g], sfb[g], gran_n_b)
        d[rows] = (da[rows] @ db.T).to(d.dtype)
    return d


def m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, d_init: torch.Tensor,
                                 gran_n_b: int = 128) -> torch.Tensor:
    """Masked layout: ``a`` [G, max_m, K]; only rows ``[0, masked_m[g])`` of group g are computed.

    Rows at and past ``masked_m[g]`` keep their ``d_init`` values.  ``a`` may be FP4 (uint8 codes with
    uint8 scale bytes, see :func:`dequantize_fp4`).  Returns a new tensor.
    """
    d = d_init.clone()
    for g in range(a.shape[0]):
        m = int(masked_m[g])
        if m == 0:
            continue
        if a.dtype == torch.uint8:
            da = dequantize_fp4(a[g, :m], sfa[g, :m])
        else:
            da = dequantize(a[g, :m], sfa[g, :m], 1)
        db = dequantize(b[g], sfb[g], gran_n_b)
        d[g, :m] = (da @ db.T).to(d.dtype)
    return d


def masked_signal_counts(masked_m, max_m: int, n: int, block_m: int, block_n: int) -> torch.Tensor:
    """What the SBO signal array holds after a masked GEMM with ``enable_overlap=True`` (DESIGN.md §3).

    ``signal[g * ceil(max_m / block_m) + i] == ceil(n / block_n)`` for every m-block i of group g with
    ``i * block_m < masked_m[g]``, and 0 for every other block.
    """
    blocks = math.ceil(max_m / block_m)
    out = torch.zeros(len(masked_m) * blocks, dtype=torch.int32)
    threshold = math.ceil(n / block_n)
    for g, m in enumerate(masked_m.tolist() if torch.is_tensor(masked_m) else masked_m):
        out[g * blocks: g * blocks + math.ceil(m / block_m)] = threshold
    return out


def k_grouped_fp8_gemm_tn_contiguous(a, sfa, b, sfb, ks, c: torch.Tensor | None, num_groups: int,
                                     m: int, n: int, gran_k: int = 128) -> torch.Tensor:
    """K-grouped ("weight gradient") GEMM: ``D[g] = C[g] + dequant(A_g).T @ dequant(B_g)``.

    ``a`` [sum(ks), M] and ``b`` [sum(ks), N] FP8, the K rows of group g at offset ``sum(ks[:g])``;
    ``sfa`` [sum(ks)/gran_k, M] and ``sfb`` [sum(ks)/gran_k, N]: one scale per ``gran_k`` K-rows per column.
    Each ``ks[g]`` is a multiple of ``gran_k``.  ``D`` is FP32 [G, M, N].
    """
    d = torch.zeros(num_groups, m, n, dtype=torch.float32, device=a.device) if c is None else c.float().clone()
    off = 0
    for g, k in enumerate(ks):
        if k == 0:
            continue
        sa = sfa[off // gran_k:(off + k) // gran_k].float().repeat_interleave(gran_k, 0)
        sb = sfb[off // gran_k:(off + k) // gran_k].float().repeat_interleave(gran_k, 0)
        da = a[off:off + k].float() * sa
        db = b[off:off + k].float() * sb
        d[g] += da.T @ db
        off += k
    return d


# =====================================================================================
# MQA logits (DeepSeek-V3.2 lightning indexer)
# =====================================================================================
# Semantics shared by the prefill and the paged (decode) kernels:
#   logit[i, j] = sum_h relu(q[i, h, :] . (kv[j, :] * kv_scale[j])) * weights[i, h]
# for every key j that query i may see; every other position is -inf (what the kernels write with
# ``clean_logits=True``; without it they leave those positions unspecified).

def quantize_kv_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) absmax FP8 cast of keys ``x [..., D]``: ``(E4M3 [..., D], FP32 scales [...])``.

    ``scale = max(amax, 1e-4) / 448`` and ``x ~= fp8 * scale``: the layout the MQA kernels consume
    (DeepSeek-V3.2's indexer keys are cast this way).  Scales are always positive.
    """
    amax = x.abs().float().amax(dim=-1).clamp(min=1e-4)
    scale = amax / FP8_MAX
    return (x.float() / scale.unsqueeze(-1)).to(FP8), scale


def _weighted_relu_logits(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                          chunk_elems: int = 1 << 27) -> torch.Tensor:
    """``sum_h relu(q[i, h] . k[j]) * weights[i, h]`` for all (i, j): q [M, H, D], k [N, D] (FP32) -> [M, N].

    Chunked over queries so the [H, rows, N] temporary stays under ``chunk_elems`` elements.
    """
    m, h, _ = q.shape
    n = k.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=q.device)
    rows = max(1, chunk_elems // max(1, h * n))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        score = torch.einsum("mhd,nd->mhn", q[r0:r1], k)
        out[r0:r1] = (score.relu() * weights[r0:r1, :, None]).sum(dim=1)
    return out


def mqa_logits_valid_mask(ks: torch.Tensor, ke: torch.Tensor, seq_len_kv: int,
                          max_seqlen_k: int = 0) -> torch.Tensor:
    """Which output positions of :func:`fp8_mqa_logits` hold a logit (the rest are -inf).

    Plain form (``max_seqlen_k == 0``): ``[seq_len, seq_len_kv]``, position (i, j) valid iff
    ``ks[i] <= j < ke[i]`` (j is always in ``[0, seq_len_kv)``).  Compressed form: ``[seq_len, max_seqlen_k]``,
    column c of row i stands for key ``ks[i] + c`` and is valid iff that key is valid for row i.
    """
    ks = ks.long()[:, None]
    ke = ke.long()[:, None]
    if max_seqlen_k == 0:
        j = torch.arange(seq_len_kv, device=ks.device)[None, :]
    else:
        j = ks + torch.arange(max_seqlen_k, device=ks.device)[None, :]
    return (j >= ks) & (j < ke) & (j >= 0) & (j < seq_len_kv)


def fp8_mqa_logits(q: torch.Tensor, kv: torch.Tensor, kv_scales: torch.Tensor, weights: torch.Tensor,
                   ks: torch.Tensor, ke: torch.Tensor, max_seqlen_k: int = 0) -> torch.Tensor:
    """Prefill MQA logits (DeepGEMM's ``fp8_mqa_logits``), all invalid positions -inf.

    ``q`` FP8 [seq_len, H, D]; ``kv`` FP8 [seq_len_kv, D] with ``kv_scales`` FP32 [seq_len_kv];
    ``weights`` FP32 [seq_len, H]; ``ks``/``ke`` int [seq_len]: query i sees keys ``[ks[i], ke[i])``
    (clipped to ``[0, seq_len_kv)``).  ``max_seqlen_k == 0`` gives FP32 ``[seq_len, seq_len_kv]``;
    ``max_seqlen_k > 0`` the compressed form ``[seq_len, max_seqlen_k]`` whose column c of row i holds
    key ``ks[i] + c`` (keys past ``ks[i] + max_seqlen_k`` are dropped).  Inputs may also be
    already-dequantised floats (then pass ``kv_scales`` of ones).
    """
    seq_len_kv = kv.shape[0]
    k = kv.float() * kv_scales.float()[:, None]
    dense = _weighted_relu_logits(q.float(), k, weights.float())
    if max_seqlen_k == 0:
        return dense.masked_fill(~mqa_logits_valid_mask(ks, ke, seq_len_kv), float("-inf"))
    valid = mqa_logits_valid_mask(ks, ke, seq_len_kv, max_seqlen_k)
    cols = (ks.long()[:, None] + torch.arange(max_seqlen_k, device=q.device)[None, :]).clamp(0, max(seq_len_kv - 1, 0))
    if seq_len_kv == 0:
        return torch.full((q.shape[0], max_seqlen_k), float("-inf"), device=q.device)
    return torch.gather(dense, 1, cols).masked_fill(~valid, float("-inf"))


def pack_paged_kv_cache(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's fused paged KV cache: uint8 ``[num_blocks, block_kv, 1, D + 4]``.

    Each block (``block_kv * (D + 4)`` bytes) holds its ``block_kv`` tokens' FP8 values first
    (``block_kv * D`` bytes, token-major) and then their ``block_kv`` FP32 scales; the 4-D shape is
    only a view of those bytes.  ``values`` FP8 [num_blocks, block_kv, D] (or with a 1 at dim 2),
    ``scales`` FP32 [num_blocks, block_kv].
    """
    if values.dim() == 4:
        values = values.squeeze(2)
    nb, bk, d = values.shape
    out = torch.empty(nb, bk * (d + 4), dtype=torch.uint8, device=values.device)
    out[:, :bk * d] = values.reshape(nb, bk * d).view(torch.uint8)
    out[:, bk * d:] = scales.float().reshape(nb, bk).contiguous().view(torch.uint8)
    return out.view(nb, bk, 1, d + 4)


def unpack_paged_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_paged_kv_cache`: ``(FP8 [num_blocks, block_kv, D], FP32 [num_blocks, block_kv])``."""
    nb, bk, _, dp4 = kv_cache.shape
    d = dp4 - 4
    flat = kv_cache.reshape(nb, bk * dp4)
    values = flat[:, :bk * d].contiguous().view(FP8).view(nb, bk, d)
    scales = flat[:, bk * d:].contiguous().view(torch.float32).view(nb, bk)
    return values, scales


def paged_mqa_logits_limits(context_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """How many keys each query row of :func:`fp8_paged_mqa_logits` sees (int64 [batch * next_n]).

    Row ``b * next_n + t`` sees keys ``[0, limit)``: with 1-D ``context_lens`` [batch] the causal rule
    of speculative decoding, ``limit = context_lens[b] - next_n + t + 1`` (the last of the next_n
    tokens sees the whole context, each earlier one a key fewer); with 2-D ``context_lens``
    [batch, next_n] each row's own length, ``limit = context_lens[b, t]``.  Negative limits mean none.
    """
    c = context_lens.long()
    if c.dim() == 2:
        return c.reshape(-1).clamp(min=0)
    t = torch.arange(next_n, device=c.device)
    return (c[:, None] - next_n + 1 + t[None, :]).reshape(-1).clamp(min=0)


def paged_mqa_logits_valid_mask(context_lens: torch.Tensor, next_n: int, max_context_len: int) -> torch.Tensor:
    """Bool ``[batch * next_n, max_context_len]``: positions of the paged logits that hold a logit."""
    lim = paged_mqa_logits_limits(context_lens, next_n)
    return torch.arange(max_context_len, device=lim.device)[None, :] < lim[:, None]


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor,
                         max_context_len: int) -> torch.Tensor:
    """Decode MQA logits over a paged KV cache (DeepGEMM's ``fp8_paged_mqa_logits``), invalid positions -inf.

    ``q`` FP8 [batch, next_n, H, D]; ``kv_cache`` uint8 [num_blocks, block_kv, 1, D + 4] in the layout of
    :func:`pack_paged_kv_cache`; ``weights`` FP32 [batch * next_n, H]; ``context_lens`` int [batch] or
    [batch, next_n] (see :func:`paged_mqa_logits_limits` for which keys each row sees); ``block_table``
    int [batch, max_blocks]: key j of sequence b lives at slot ``j % block_kv`` of block
    ``block_table[b, j // block_kv]``.  Output FP32 [batch * next_n, max_context_len].
    """
    batch, next_n, h, d = q.shape
    values, scales = unpack_paged_kv_cache(kv_cache)
    bk = values.shape[1]
    lim = paged_mqa_logits_limits(context_lens, next_n).view(batch, next_n)
    out = torch.full((batch * next_n, max_context_len), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = min(int(lim[b].max()), max_context_len)
        if n <= 0:
            continue
        blocks = block_table[b, :math.ceil(n / bk)].long()
        k = (values[blocks].float() * scales[blocks].float()[..., None]).reshape(-1, d)[:n]
        rows = _weighted_relu_logits(q[b].float(), k, weights[b * next_n:(b + 1) * next_n].float())
        keep = torch.arange(n, device=q.device)[None, :] < lim[b][:, None]
        out[b * next_n:(b + 1) * next_n, :n] = rows.masked_fill(~keep, float("-inf"))
    return out


def paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int, num_sms: int) -> torch.Tensor:
    """The persistent-SM work split of :func:`fp8gemm.get_paged_mqa_logits_metadata` (int32 [num_sms + 1, 2]).

    Sequence b is cut into ``ceil(len_b / (4 * block_kv))`` splits (``len_b`` = ``context_lens[b]``, or
    ``max_t context_lens[b, t]`` for 2-D lengths); the splits of all sequences, in order, are dealt out
    to ``num_sms`` workers as evenly as possible (the first ``total % num_sms`` get one more).  Row s is
    the (sequence, split) where worker s starts; row ``num_sms`` is ``(batch, 0)``, the end.
    """
    c = context_lens.long().cpu()
    lens = (c.amax(dim=1) if c.dim() == 2 else c).clamp(min=0).tolist()
    split = 4 * block_kv
    segs = [(n + split - 1) // split for n in lens]
    total = sum(segs)
    base, extra = divmod(total, num_sms)
    out = []
    for s in range(num_sms + 1):
        start = s * base + min(s, extra)
        b, acc = 0, 0
        while b < len(segs) and acc + segs[b] <= start:
            acc += segs[b]
            b += 1
        out.append((b, start - acc))
    return torch.tensor(out, dtype=torch.int32)


# =====================================================================================
# MoE activations (pre-dispatch, FP8 combine payload)
# =====================================================================================
# Buffer layout of the pre-dispatch (what the EP dispatch reads), for a buffer capacity C >= num_tokens:
#   buf_x            E4M3 [C, hidden]  or packed E2M1 uint8 [C, hidden / 2] (two codes a byte, low nibble first)
#   buf_x_sf         UE8M0 bytes uint8 [C, hidden / group_size]  (or FP32 [C, hidden / 128], ``fp32_scales``)
#   buf_topk_idx     int64 or int32 [C, topk]   (the buffer's dtype decides)
#   buf_topk_weights FP32 [C, topk]
# Rows < num_tokens hold the token's quantised activations (exactly the per-token casts above) and its
# routing; rows >= num_tokens are padding: ids -1, weights 0, activation bytes 0, scales 0.

def ue8m0_to_fp32(b: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes -> FP32 ``2^(b - 127)``, exactly (byte 0 is the subnormal 2^-127, 255 gives inf)."""
    e = b.to(torch.int32)
    return torch.where(e == 0, 0x00400000, e << 23).view(torch.float32)


def mega_moe_pre_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int,
                          capacity: int, group_size: int, use_fp4_acts: bool, fp32_scales: bool = False,
                          use_ue8m0: bool = True, idx_dtype: torch.dtype = torch.int64):
    """What the pre-dispatch buffers hold afterwards: ``(buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights)``.

    Activations: :func:`per_token_cast_to_fp8` (``use_ue8m0``, ``gran_k=group_size``) with the scales as
    UE8M0 bytes, or with ``fp32_scales`` as FP32 (``gran_k`` 128); with ``use_fp4_acts``
    :func:`per_token_cast_to_fp4` (UE8M0 bytes).  Routing: ``topk_idx`` cast to ``idx_dtype``,
    ``topk_weights`` as FP32.  Padding rows as in the section header.
    """
    t = num_tokens
    xs = x[:t]
    if use_fp4_acts:
        q, sf = per_token_cast_to_fp4(xs, True, group_size, ue8m0_bytes=True)
    else:
        q, sf = per_token_cast_to_fp8(xs, use_ue8m0, group_size)
        sf = sf if fp32_scales else to_ue8m0_bytes(sf)
    buf_x = torch.zeros(capacity, *q.shape[1:], dtype=q.dtype, device=x.device)
    buf_x_sf = torch.zeros(capacity, *sf.shape[1:], dtype=sf.dtype, device=x.device)
    buf_x.view(torch.uint8)[:t] = q.view(torch.uint8)
    buf_x_sf[:t] = sf
    buf_idx = torch.full((capacity, topk_idx.shape[1]), -1, dtype=idx_dtype, device=x.device)
    buf_idx[:t] = topk_idx[:t].to(idx_dtype)
    buf_w = torch.zeros(capacity, topk_weights.shape[1], dtype=torch.float32, device=x.device)
    buf_w[:t] = topk_weights[:t].float()
    return buf_x, buf_x_sf, buf_idx, buf_w


def quantize_combine_payload(x: torch.Tensor):
    """The FP8 combine payload of BF16 expert outputs ``x`` [..., hidden]: E4M3 codes [..., hidden] with one
    UE8M0 scale byte per (token, 128 columns), uint8 [..., ceil(hidden / 128)].

    Exactly :func:`per_token_cast_to_fp8` with ``use_ue8m0=True, gran_k=128`` on the rows, scales as bytes.
    """
    rows = x.reshape(-1, x.shape[-1])
    q, sf = per_token_cast_to_fp8(rows, True, 128)
    return q.view(x.shape), to_ue8m0_bytes(sf).view(*x.shape[:-1], -1)


def combine_reduce(payload: torch.Tensor, sf: torch.Tensor, weights: torch.Tensor,
                   topk_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of each token's top-k expert outputs, de-quantised, accumulated in FP32, cast to BF16.

    ``payload`` E4M3 [T, topk, hidden], ``sf`` UE8M0 bytes [T, topk, ceil(hidden / 128)], ``weights``
    [T, topk] (FP32 or BF16).  ``out[t] = bf16(sum_k weights[t, k] * payload[t, k] * 2^(sf[t, k] - 127))``,
    the sum taken in order k = 0, 1, ... in FP32 with each product rounded before it is added (no FMA),
    starting from 0.  Slots with ``topk_idx[t, k] < 0`` (when given) are skipped, whatever their payload
    holds.  The BF16 cast rounds to nearest even; a NaN result is written as 0x7FC0.
    """
    t, topk, hidden = payload.shape
    acc = torch.zeros(t, hidden, dtype=torch.float32, device=payload.device)
    scale = ue8m0_to_fp32(sf).repeat_interleave(128, dim=-1)[..., :hidden]
    w = weights.float()
    for k in range(topk):
        value = payload[:, k].float() * scale[:, k]
        prod = w[:, k, None] * value
        summed = acc + prod
        acc = summed if topk_idx is None else torch.where(topk_idx[:, k, None] >= 0, summed, acc)
    out = acc.to(torch.bfloat16)
    return torch.where(acc.isnan(), torch.tensor(0x7FC0, dtype=torch.int16, device=acc.device).view(torch.bfloat16),
                       out)


# =====================================================================================
# Expert-parallel MoE layer
# =====================================================================================
# The layer computes, for each token ``t``:
# 
# 1. ``xq = per_token_cast_to_fp8(x)`` (one FP32 scale per row per 128 columns), de-quantised;
# 2. for each k with a valid expert ``e = topk_idx[t, k]`` (``0 <= e < num_experts``):
#    ``h = bf16(xq @ W13[e].T)`` with ``W13[e]`` = [gate; up] ``[2 I, hidden]`` (block-scaled FP8, de-quantised);
#    ``a = silu(h[:, :I]) * h[:, I:]`` in FP32, re-quantised per token (128 columns) and de-quantised;
#    ``o[t, k] = bf16(a @ W2[e].T)`` (``W2[e]`` ``[hidden, I]``);
# 3. ``y[t] = bf16(sum_k w[t, k] * o[t, k])``, FP32 accumulation in k order; tokens without a valid
#    expert give 0.
# 
# Rounding points (BF16 after each GEMM, FP8 before each GEMM) are those of the kernels, so the
# kernels differ from this only by FP32 accumulation order (and the GPU's approximate ``exp``).

def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in FP32 for ``h = [gate | up]`` along the last dim."""
    inter = h.shape[-1] // 2
    g, u = h[..., :inter].float(), h[..., inter:].float()
    return g / (1.0 + torch.exp(-g)) * u


def swiglu_quant_reference(h: torch.Tensor, masked_m: torch.Tensor, use_ue8m0: bool = False):
    """``h`` BF16 [G, max_m, 2I] -> (E4M3 [G, max_m, I], FP32 [G, max_m, ceil(I/128)]) of
    ``silu_mul(h)`` quantised per token; rows ``>= masked_m[g]`` are zero codes and zero scales here
    (the kernel leaves them untouched)."""
    g_, max_m, two_i = h.shape
    inter = two_i // 2
    q = torch.zeros(g_, max_m, inter, dtype=FP8, device=h.device)
    sf = torch.zeros(g_, max_m, -(-inter // 128), dtype=torch.float32, device=h.device)
    for g in range(g_):
        m = min(int(masked_m[g]), max_m)
        if m:
            q[g, :m], sf[g, :m] = per_token_cast_to_fp8(silu_mul(h[g, :m]), use_ue8m0=use_ue8m0)
    return q, sf


def expert_forward(xq: torch.Tensor, xsf: torch.Tensor | None, w13, w2, use_ue8m0: bool = False) -> torch.Tensor:
    """One expert on FP8 rows: ``xq`` [m, hidden] + ``xsf`` -> BF16 [m, hidden] (``xsf`` None: ``xq`` holds the
    rows' values already de-quantised, FP32)."""
    w13q, w13sf = w13
    w2q, w2sf = w2
    xv = xq if xsf is None else dequantize(xq, xsf, 1)
    h = (xv @ dequantize(w13q, w13sf, 128).T).to(torch.bfloat16)
    aq, asf = per_token_cast_to_fp8(silu_mul(h), use_ue8m0=use_ue8m0)
    return (dequantize(aq, asf, 1) @ dequantize(w2q, w2sf, 128).T).to(torch.bfloat16)


def moe_layer_reference(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        w13, w2, use_ue8m0: bool = False, combine_payload: str = "bf16",
                        dispatch_payload: str = "fp8") -> torch.Tensor:
    """``x`` BF16 [T, hidden]; ``w13 = (FP8 [E, 2I, hidden], FP32 [E, 2I/128, hidden/128])``;
    ``w2 = (FP8 [E, hidden, I], FP32 [E, hidden/128, I/128])`` -> BF16 [T, hidden].

    ``combine_payload="fp8"``: step 3 reduces the FP8 combine payload of ``o`` instead
    (:func:`quantize_combine_payload` then :func:`combine_reduce`, invalid experts skipped).
    ``dispatch_payload="fp4"``: step 1 is :func:`per_token_cast_to_fp4` (UE8M0 scales a 32 columns) and its
    de-quantised values (:func:`dequantize_fp4`; the GEMMs' FP4 -> E4M3 conversion is exact for them while
    a 32-column group's scale is within 2^8 of its 128-column block's largest)."""
    if dispatch_payload not in ("fp8", "fp4"):
        raise ValueError(f"dispatch_payload must be 'fp8' or 'fp4', got {dispatch_payload!r}")
    if combine_payload not in ("bf16", "fp8"):
        raise ValueError(f"combine_payload must be 'bf16' or 'fp8', got {combine_payload!r}")
    t, hidden = x.shape
    num_experts = w13[0].shape[0]
    if dispatch_payload == "fp4":
        xq, xsf = dequantize_fp4(*per_token_cast_to_fp4(x, True, 32, ue8m0_bytes=True), 32), None
    else:
        xq, xsf = per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    o = torch.zeros(t, topk_idx.shape[1], hidden, dtype=torch.bfloat16, device=x.device)
    idx = topk_idx.long()
    for e in range(num_experts):
        tt, kk = (idx == e).nonzero(as_tuple=True)
        if tt.numel():
            o[tt, kk] = expert_forward(xq[tt], None if xsf is None else xsf[tt], (w13[0][e], w13[1][e]),
                                       (w2[0][e], w2[1][e]), use_ue8m0)
    if combine_payload == "fp8":
        payload, sf = quantize_combine_payload(o)
        valid = (idx >= 0) & (idx < num_experts)
        return combine_reduce(payload, sf, topk_weights, torch.where(valid, idx, -1))
    return combine_reduce_reference(o, topk_idx, topk_weights, num_experts)


def combine_reduce_reference(o: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                             num_experts: int) -> torch.Tensor:
    """``y[t] = bf16(sum_k w[t, k] * o[t, k])`` over valid experts, FP32, k in order."""
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    acc = torch.zeros(o.shape[0], o.shape[2], dtype=torch.float32, device=o.device)
    for k in range(o.shape[1]):
        acc += torch.where(valid[:, k, None], topk_weights[:, k, None].float() * o[:, k].float(), 0.0)
    return acc.to(torch.bfloat16)


def dispatch_counts_reference(topk_idx_per_rank: list[torch.Tensor], num_experts: int, world_size: int):
    """Per rank, the int32 [L] count of rows each local expert receives, and per (rank, local expert)
    the sorted list of routing words ``src * max_tokens * topk + t * topk + k`` is left to the caller;
    this returns ``counts [world_size, L]``."""
    L = num_experts // world_size
    total = torch.zeros(num_experts, dtype=torch.int64)
    for idx in topk_idx_per_rank:
        v = idx[(idx >= 0) & (idx < num_experts)].long().cpu()
        total += torch.bincount(v, minlength=num_experts)
    return total.view(world_size, L).to(torch.int32)
