"""Mixture-of-experts building blocks around expert-parallel dispatch and combine.

The activation path (:mod:`fp8gemm.moe.pre_dispatch`): the fused pre-dispatch that quantises tokens and
lays out their routing for the dispatch, and the FP8 combine payload with its weighted reduction.
"""
from .pre_dispatch import combine_reduce, mega_moe_pre_dispatch, quantize_combine_payload

__all__ = ["combine_reduce", "mega_moe_pre_dispatch", "quantize_combine_payload"]
