"""Reference semantics of the expert-parallel MoE layer (plain PyTorch, one process, every expert).

(To be folded into :mod:`fp8gemm.reference`.)  The layer computes, for each token ``t``:

1. ``xq = per_token_cast_to_fp8(x)`` (one FP32 scale per row per 128 columns), de-quantised;
2. for each k with a valid expert ``e = topk_idx[t, k]`` (``0 <= e < num_experts``):
   ``h = bf16(xq @ W13[e].T)`` with ``W13[e]`` = [gate; up] ``[2 I, hidden]`` (block-scaled FP8, de-quantised);
   ``a = silu(h[:, :I]) * h[:, I:]`` in FP32, re-quantised per token (128 columns) and de-quantised;
   ``o[t, k] = bf16(a @ W2[e].T)`` (``W2[e]`` ``[hidden, I]``);
3. ``y[t] = bf16(sum_k w[t, k] * o[t, k])``, FP32 accumulation in k order; tokens without a valid
   expert give 0.

Rounding points (BF16 after each GEMM, FP8 before each GEMM) are those of the kernels, so the
kernels differ from this only by FP32 accumulation order (and the GPU's approximate ``exp``).
"""
from __future__ import annotations

import torch

from .. import reference as R


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
    q = torch.zeros(g_, max_m, inter, dtype=R.FP8, device=h.device)
    sf = torch.zeros(g_, max_m, -(-inter // 128), dtype=torch.float32, device=h.device)
    for g in range(g_):
        m = min(int(masked_m[g]), max_m)
        if m:
            q[g, :m], sf[g, :m] = R.per_token_cast_to_fp8(silu_mul(h[g, :m]), use_ue8m0=use_ue8m0)
    return q, sf


def expert_forward(xq: torch.Tensor, xsf: torch.Tensor, w13, w2, use_ue8m0: bool = False) -> torch.Tensor:
    """One expert on FP8 rows: ``xq`` [m, hidden] + ``xsf`` -> BF16 [m, hidden]."""
    w13q, w13sf = w13
    w2q, w2sf = w2
    h = (R.dequantize(xq, xsf, 1) @ R.dequantize(w13q, w13sf, 128).T).to(torch.bfloat16)
    aq, asf = R.per_token_cast_to_fp8(silu_mul(h), use_ue8m0=use_ue8m0)
    return (R.dequantize(aq, asf, 1) @ R.dequantize(w2q, w2sf, 128).T).to(torch.bfloat16)


def moe_layer_reference(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        w13, w2, use_ue8m0: bool = False) -> torch.Tensor:
    """``x`` BF16 [T, hidden]; ``w13 = (FP8 [E, 2I, hidden], FP32 [E, 2I/128, hidden/128])``;
    ``w2 = (FP8 [E, hidden, I], FP32 [E, hidden/128, I/128])`` -> BF16 [T, hidden]."""
    t, hidden = x.shape
    num_experts = w13[0].shape[0]
    xq, xsf = R.per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    o = torch.zeros(t, topk_idx.shape[1], hidden, dtype=torch.bfloat16, device=x.device)
    idx = topk_idx.long()
    for e in range(num_experts):
        tt, kk = (idx == e).nonzero(as_tuple=True)
        if tt.numel():
            o[tt, kk] = expert_forward(xq[tt], xsf[tt], (w13[0][e], w13[1][e]), (w2[0][e], w2[1][e]), use_ue8m0)
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


def make_weights(num_experts: int, hidden: int, inter: int, seed: int = 0, device="cpu", scale: float = 1.0):
    """Random block-scaled FP8 expert weights (the same on every rank for a given seed)."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * (scale / hidden ** 0.5)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * (scale / inter ** 0.5)
    q13 = [R.per_block_cast_to_fp8(w) for w in w13]
    q2 = [R.per_block_cast_to_fp8(w) for w in w2]
    out13 = (torch.stack([a for a, _ in q13]).to(device), torch.stack([b for _, b in q13]).to(device))
    out2 = (torch.stack([a for a, _ in q2]).to(device), torch.stack([b for _, b in q2]).to(device))
    return out13, out2
