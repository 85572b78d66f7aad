"""fp8gemm: Hopper (SM90) FP8 GEMM, grouped MoE GEMM and MQA-logits kernels in Triton and Gluon.

The public names follow DeepGEMM's (``import fp8gemm as deep_gemm`` is meant to work); the
semantics of every operation are defined in :mod:`fp8gemm.reference`.
"""
from ._version import __version__
from .runtime import (get_mk_alignment_for_contiguous_layout, get_num_sms, get_pdl,
                      set_mk_alignment_for_contiguous_layout, set_num_sms, set_pdl)
from . import reference, testing  # noqa: F401
from .quant import (ceil_to_ue8m0, get_mn_major_tma_aligned_tensor, pack_ue8m0_to_int, per_block_cast_to_fp8,
                    per_channel_cast_to_fp8, per_token_cast_to_fp4, per_token_cast_to_fp8,
                    transform_sf_into_required_layout)
from .moe import mega_moe_pre_dispatch  # noqa: F401  (fp8gemm.moe also has the combine payload helpers)
from .gemm import (bf16_gemm_nn, bf16_gemm_nt, bf16_gemm_tn, bf16_gemm_tt, fp8_gemm_nn, fp8_gemm_nt,
                   fp8_gemm_tn, fp8_gemm_tt)
from .grouped import (alloc_signal, get_masked_signal_size, k_grouped_fp8_gemm_tn_contiguous,
                      m_grouped_bf16_gemm_nt_contiguous, m_grouped_bf16_gemm_nt_masked,
                      m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked)
from .attention import fp8_mqa_logits, fp8_paged_mqa_logits, get_paged_mqa_logits_metadata

# DeepGEMM's legacy names of the masked grouped GEMMs
fp8_m_grouped_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked
bf16_m_grouped_gemm_nt_masked = m_grouped_bf16_gemm_nt_masked
