"""Accuracy of the MoE activation path's formats (reference only, runs on the CPU).

1. FP4 (E2M1, UE8M0 per 32) activations against the FP8 (E4M3, per 128) path, one MoE expert;
2. the FP8 combine payload (E4M3 + UE8M0 per 128) against the BF16 payload, top-k weighted sum.

    python benchmarks/moe_act_accuracy.py [--tokens 256] [--hidden 7168] [--inter 2048] [--topk 8]

The expert computes ``y = (silu(x W_gate^T) * (x W_up^T)) W_down^T``.  Weights are FP8 per 128x128 block in
every variant; the input activations of the first GEMM are FP8 or FP4 (the transport format of the MoE
activation path); the SwiGLU output is re-quantised to FP8 per token.  Reported: relative RMSE
``||y - y_fp32|| / ||y_fp32||`` against the same expert in FP32 on unquantised inputs, for Gaussian and for
heavy-tailed (Student t, 3 degrees of freedom) activations.  Uses only :mod:`fp8gemm.reference` (runs on the CPU).
"""
import argparse

import torch

from fp8gemm import reference as R


def expert(x_deq, w1, sf1, w2, sf2, inter):
    h = x_deq @ R.dequantize(w1, sf1, 128).T
    act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    aq, asf = R.per_token_cast_to_fp8(act)
    return R.dequantize(aq, asf, 1) @ R.dequantize(w2, sf2, 128).T


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--topk", type=int, default=8)
    args = p.parse_args()
    torch.manual_seed(0)
    t, hdim, inter = args.tokens, args.hidden, args.inter
    w1f = torch.randn(2 * inter, hdim) / hdim ** 0.5
    w2f = torch.randn(hdim, inter) / inter ** 0.5
    w1, sf1 = R.per_block_cast_to_fp8(w1f)
    w2, sf2 = R.per_block_cast_to_fp8(w2f)
    inputs = {"gaussian": torch.randn(t, hdim),
              "student-t(3)": torch.distributions.StudentT(3.0).sample((t, hdim))}
    print(f"tokens {t}, hidden {hdim}, inter {inter}; relative RMSE of the expert output vs FP32")
    print(f"{'activations':14} {'FP8 e4m3/128':>13} {'FP8 ue8m0/128':>14} {'FP4 e2m1 ue8m0/32':>18}")
    for name, x in inputs.items():
        x = x.bfloat16().float()
        ref = torch.nn.functional.silu(x @ w1f.T[:, :inter]) * (x @ w1f.T[:, inter:]) @ w2f.T
        rows = []
        for variant in ("fp8", "fp8_ue8m0", "fp4"):
            if variant == "fp4":
                codes, sbytes = R.per_token_cast_to_fp4(x, use_ue8m0=True, gran_k=32, ue8m0_bytes=True)
                xd = R.dequantize_fp4(codes, sbytes)
            else:
                q, sf = R.per_token_cast_to_fp8(x, use_ue8m0=variant == "fp8_ue8m0")
                xd = R.dequantize(q, sf, 1)
            y = expert(xd, w1, sf1, w2, sf2, inter)
            rows.append(float((y - ref).norm() / ref.norm()))
        print(f"{name:14} {rows[0]:13.4f} {rows[1]:14.4f} {rows[2]:18.4f}")
    combine_payload(t, hdim, args.topk)


def combine_payload(t, hdim, topk):
    """y[t] = sum_k w[t,k] * o[t,k] from BF16 expert outputs o, with the payload sent as BF16 or FP8."""
    print(f"\ncombine of top-{topk} expert outputs ({t} tokens, hidden {hdim}); relative RMSE of y vs FP32")
    print(f"{'expert outputs':14} {'BF16 payload':>13} {'FP8 payload':>12}")
    weights = torch.softmax(torch.randn(t, topk), dim=-1)
    for name, o in {"gaussian": torch.randn(t, topk, hdim),
                    "student-t(3)": torch.distributions.StudentT(3.0).sample((t, topk, hdim))}.items():
        o = o.bfloat16()
        exact = (weights[:, :, None] * o.float()).sum(1)
        bf16 = R.combine_reduce_reference(o, torch.zeros(t, topk, dtype=torch.int64), weights, 1).float()
        q, sf = R.quantize_combine_payload(o.reshape(t * topk, hdim))
        fp8 = R.combine_reduce(q.view(t, topk, hdim), sf.view(t, topk, -1), weights).float()
        err = [float((y - exact).norm() / exact.norm()) for y in (bf16, fp8)]
        print(f"{name:14} {err[0]:13.4f} {err[1]:12.4f}")


if __name__ == "__main__":
    main()
