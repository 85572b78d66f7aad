"""Runtime state and settings: the one place environment variables are read.

Settings (environment variables, read when first needed):

``FP8GEMM_BACKEND``
    ``auto`` (default): Gluon kernels on SM90 where one exists for the call and measured faster
    (the grouped/dense GEMMs, the per-channel cast), else Triton; the MQA-logits prefill stays on
    Triton under ``auto`` (its Gluon kernel measured 0.67-0.95x the Triton one and covers fewer forms), and so do
    dense GEMMs with at most 32 rows where the split-K Triton kernel measured faster
    (``kernels.gemm_skinny.pays``).
    ``triton``: always the portable Triton kernels.  ``gluon``: insist on Gluon (error where there is
    none for the call).
``FP8GEMM_NUM_SMS``
    Initial cap on the SMs a kernel may use (same as calling :func:`set_num_sms`).
``FP8GEMM_DEBUG``
    ``1`` turns on extra checks that synchronise with the host (e.g. that contiguous-layout
    segments are aligned).  Never use it under CUDA-graph capture.
``FP8GEMM_GLUON_SA_SMEM``
    Unset (default): the Gluon GEMM brings A's scales into shared memory with each pipeline stage (instead of
    loading them from global memory in the consumer) where it measured faster: MN-major scales, and row-major
    ones for dense calls of at most 256 rows (``gemm_gluon.sa_smem_pays``; benchmarks/RESULTS.md, session 9).
    ``1`` forces it on for every call of the plain kernel, ``0`` off (A/Bs).
``FP8GEMM_STREAM_EVICT``, ``FP8GEMM_STORE_EVICT`` (A/B runs only, read at import of
:mod:`fp8gemm.kernels.quant`)
    The L2 eviction policy of the casts' input loads (``""`` or ``evict_first``; unset: each cast's measured
    default) and of the FP8 pre-dispatch's code stores (``""``, ``evict_first`` or a PTX cache modifier such
    as ``.cs``; unset: plain stores).  :func:`stream_evict`, :func:`store_evict`.
``FP8GEMM_BENCH_FLUSH``
    How the benchmarks evict the L2 before each timed call: ``write`` (default, as ``do_bench`` and ANCHORS.md)
    or ``read`` (:func:`bench_flush`).
``TRITON_INTERPRET``
    ``1`` runs every Triton kernel in Triton's CPU interpreter (tests, the demo without a GPU).
    It must be set before :mod:`fp8gemm` is imported.
"""
from __future__ import annotations

import functools
import os

import torch

from ._checks import check_bool, check_int

_BACKENDS = ("auto", "triton", "gluon")

_num_sms: int | None = None
_mk_alignment: int = 128


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def debug_checks() -> bool:
    return os.environ.get("FP8GEMM_DEBUG", "0") == "1"


def gluon_sa_smem() -> bool | None:
    """``FP8GEMM_GLUON_SA_SMEM``: True (``1``) or False (``0``) forces A's scales through shared memory on or off
    for the Gluon GEMM; None (unset or empty): the kernel decides per call."""
    value = os.environ.get("FP8GEMM_GLUON_SA_SMEM", "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"FP8GEMM_GLUON_SA_SMEM must be 0, 1 or unset, got {value!r}")
    return value == "1"


def stream_evict() -> str | None:
    """``FP8GEMM_STREAM_EVICT``: None when unset (each cast keeps its measured policy), else the policy."""
    return os.environ.get("FP8GEMM_STREAM_EVICT")


def store_evict() -> str:
    """``FP8GEMM_STORE_EVICT``: the FP8 pre-dispatch's code-store policy or cache modifier (``""``: plain)."""
    return os.environ.get("FP8GEMM_STORE_EVICT", "")


def bench_flush() -> str:
    """``FP8GEMM_BENCH_FLUSH``: ``write`` (default) or ``read``."""
    value = os.environ.get("FP8GEMM_BENCH_FLUSH", "write")
    if value not in ("write", "read"):
        raise ValueError(f"FP8GEMM_BENCH_FLUSH must be 'write' or 'read', got {value!r}")
    return value


def backend() -> str:
    value = os.environ.get("FP8GEMM_BACKEND", "auto").strip().lower()
    if value not in _BACKENDS:
        raise ValueError(f"FP8GEMM_BACKEND must be one of {_BACKENDS}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def is_sm90(device: torch.device) -> bool:
    if device.type != "cuda" or interpreting():
        return False
    return device_capability(device.index if device.index is not None else torch.cuda.current_device()) == (9, 0)


def _default_sms() -> int:
    if torch.cuda.is_available() and not interpreting():
        return device_sm_count(torch.cuda.current_device())
    # The interpreter runs programs one after another: a handful of persistent programs keeps
    # the persistent loops exercised without slowing the tests.
    return 4


_pdl: bool = True


def set_pdl(enable: bool) -> None:
    """Allow (default) or forbid programmatic dependent launch between fp8gemm's kernels (DeepGEMM's name).  Today
    one route uses it: the FP4-activation grouped GEMM, whose FP8 convert lets the GEMM start early
    (``kernels.gemm_dispatch``).  Read at every call, so at capture time for a CUDA graph."""
    global _pdl
    check_bool("enable", enable)
    _pdl = enable


def get_pdl() -> bool:
    """Whether programmatic dependent launch is allowed (:func:`set_pdl`)."""
    return _pdl


def set_num_sms(num_sms: int) -> None:
    """Cap the number of SMs (persistent programs) every fp8gemm kernel uses from now on.

    Leaves the remaining SMs to kernels on other streams, e.g. the combine of the MoE layer
    (Single Batch Overlap).  Must be between 1 and the device's SM count.
    """
    global _num_sms
    check_int("num_sms", num_sms, minimum=1)
    if torch.cuda.is_available() and not interpreting():
        limit = device_sm_count(torch.cuda.current_device())
        if num_sms > limit:
            raise ValueError(f"num_sms must be in [1, {limit}] (the device's SM count), got {num_sms}")
    _num_sms = num_sms


def get_num_sms() -> int:
    """The SM cap set by :func:`set_num_sms` (or ``FP8GEMM_NUM_SMS``), else the device's SM count."""
    global _num_sms
    if _num_sms is None:
        env = os.environ.get("FP8GEMM_NUM_SMS")
        _num_sms = int(env) if env else _default_sms()
    return _num_sms


def get_mk_alignment_for_contiguous_layout() -> int:
    """Row alignment of each expert's segment in the contiguous grouped layout (default 128)."""
    return _mk_alignment


def set_mk_alignment_for_contiguous_layout(alignment: int) -> None:
    """Set the segment alignment of the contiguous layout: 64 or 128 (a multiple of the kernels' block_m)."""
    global _mk_alignment
    if alignment not in (64, 128):
        raise ValueError(f"alignment must be 64 or 128, got {alignment}")
    _mk_alignment = alignment
