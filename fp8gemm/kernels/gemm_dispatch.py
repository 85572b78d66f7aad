"""Kernel choice and launch for the GEMM family (arguments arrive validated by fp8gemm.gemm / .grouped).

The Gluon kernels run where they apply (SM90, supported formats, ``FP8GEMM_BACKEND`` not ``triton``);
everything else goes to the portable Triton kernel, whose tile shapes are picked here.

FP4 activations (uint8 E2M1 codes + UE8M0 bytes per 32) take one of two routes, chosen in :func:`_plan` only:
where the Gluon kernel takes the converted call, one launch of :mod:`.fp4_convert` writes the FP8 operand
(1D2D scales, rows the GEMM skips left alone) and the Gluon kernel runs on it; elsewhere (``FP8GEMM_BACKEND=
triton``, no SM90, K not a multiple of 128, per-row B scales, 64-row contiguous alignment) the Triton kernel
dequantises in its A-load.  Both multiply the same E4M3 values and scales.  On the convert + Gluon route the
GEMM follows the convert by programmatic dependent launch (``fp8gemm.set_pdl``).
"""
from __future__ import annotations

import dataclasses

import torch
import triton

from .. import runtime
from . import fp4_convert, gemm_skinny, gemm_triton

# Programmatic dependent launch (PDL) on the "fp4-gluon" route: the convert kernel executes
# ``griddepcontrol.launch_dependents`` first and the Gluon GEMM is launched right after it on the same stream
# with ``launch_pdl=True`` (built with ``PDL_WAIT``), so the GEMM's programs are scheduled, set up and
# prefetch their first weight stages while the short, latency-bound convert still runs; each of its
# partitions executes ``griddepcontrol.wait`` (full completion and memory visibility of the convert) before
# it reads the converted operand.  Aimed at the ~3.5 us the separate convert launch added over the FP8-input
# GEMM at the 6-group decode shapes (issue #6).  Safe under CUDA-graph capture: CUDA 12.3+ records the launch
# attribute as a programmatic graph edge.  ``runtime.get_pdl()`` (``fp8gemm.set_pdl``, DeepGEMM's name) is read at
# every call, so at capture time for a graph: tests and benchmarks flip it (``benchmarks/fp4_pdl_ab.py`` times
# both settings in one run).  Other routes never use PDL.

# Dense FP8 calls with at most this many rows take the split-K swap-A/B kernel (:mod:`.gemm_skinny`) where it
# measured faster than the Gluon kernel (``gemm_skinny.pays``; the persistent Triton kernel is slower than both),
# on every backend but ``FP8GEMM_BACKEND=gluon``.  0 turns it off (A/B runs flip it).
SKINNY_MAX_M = 32


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    block_m: int
    block_n: int
    block_k: int
    swap_ab: bool
    num_warps: int
    num_stages: int
    group_m: int = 8


# Candidate tiles per row class, best first when there is enough parallel work; from the sweep in
# benchmarks/sweep_triton.py (H200, 2026-11-26, see benchmarks/RESULTS.md).  (block_m, block_n, swap_ab,
# num_warps, num_stages).
_CANDIDATES = {
    16: [(16, 128, True, 4, 6), (16, 64, True, 4, 6), (32, 32, True, 4, 6)],
    32: [(32, 128, True, 4, 6), (32, 64, True, 4, 6), (32, 32, True, 4, 6)],
    64: [(64, 128, False, 4, 4), (64, 64, False, 4, 6)],
    None: [(128, 128, False, 8, 4), (64, 128, False, 4, 4), (64, 64, False, 4, 6)],
}


def triton_config(mode: int, m: int, n: int, k: int, scaled: bool, expected_m: int | None = None,
                  max_block_n: int = 256, num_groups: int = 1, num_sms: int = 132) -> TritonConfig:
    """Tile shapes for the Triton kernel.

    Few rows of A (decode) use swap-A/B: B's rows fill the MMA's 64-row side and the tokens sit on
    its narrow N side (16 or 32), so no tensor-core work is spent on rows that do not exist.  Within
    a row class the first candidate that gives every SM (three quarters of them) a tile wins; small
    problems fall through to narrower tiles rather than leave SMs idle.
    """
    rows = expected_m if (mode == gemm_triton.MODE_MASKED and expected_m) else m
    rows = max(rows, 1)
    block_k = 128 if scaled else 64
    cls = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else None
    cands = [c for c in _CANDIDATES[cls] if c[1] <= max(max_block_n, 32)] or _CANDIDATES[cls][-1:]
    groups = num_groups if mode == gemm_triton.MODE_MASKED else 1
    choice = cands[-1]
    for cand in cands:
        tiles = groups * triton.cdiv(rows, cand[0]) * triton.cdiv(n, cand[1])
        if tiles >= 0.75 * num_sms:
            choice = cand
            break
    block_m, block_n, swap, warps, stages = choice
    if k <= 512:
        stages = min(stages, 4)  # a short K loop has nothing to fill deeper pipelines with
    return TritonConfig(block_m, block_n, block_k, swap, warps, stages)


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    """Strides padded on the left to ``ndim`` entries (a missing group dim has stride 0)."""
    if t is None:
        return (0,) * ndim
    s = tuple(t.stride())
    return (0,) * (ndim - len(s)) + s


def _use_gluon(mode_name: str, a, sfa, b, sfb, d, c) -> bool:
    choice = runtime.backend()
    if choice == "triton" or not runtime.is_sm90(d.device):
        if choice == "gluon":
            raise RuntimeError("FP8GEMM_BACKEND=gluon but the Gluon kernels need an SM90 GPU (and no interpreter)")
        return False
    try:
        from . import gemm_gluon
    except ImportError:
        return False
    ok = hasattr(gemm_gluon, "supports") and gemm_gluon.supports(mode_name, a, sfa, b, sfb, d, c)
    if not ok and choice == "gluon":
        raise RuntimeError(f"FP8GEMM_BACKEND=gluon but no Gluon kernel supports this {mode_name} call")
    return ok


def _fp4_gluon_operand(mode_name: str, a, b, sfb, d, c):
    """FP4 A on the convert + Gluon route: the (unfilled) FP8 operand ``(q, sf)`` the Gluon kernel will read,
    or None where the route does not apply (then the Triton kernel dequantises in its A-load)."""
    if runtime.backend() == "triton" or not runtime.is_sm90(d.device):
        return None
    q, sf = fp4_convert.empty_fp8_operand(a, b.shape[-1])
    return (q, sf) if _use_gluon(mode_name, q, sf, b, sfb, d, c) else None


def _plan(mode_name: str, a, sfa, b, sfb, d, c, expected_m, gran_n_b: int, max_block_n: int,
          force_block_m: int | None):
    """The one kernel choice behind both :func:`run_m_grouped` and :func:`plan_tiles`:
    ``("gluon", None)``, ``("fp4-gluon", (q, sf))`` (convert FP4 A into ``q``/``sf``, then Gluon) or
    ``("triton", TritonConfig)``."""
    scaled = sfa is not None
    a_fp4 = a.dtype == torch.uint8
    if (mode_name == "dense" and scaled and gran_n_b == 128 and force_block_m is None and a.shape[0] <= SKINNY_MAX_M
            and runtime.backend() != "gluon" and gemm_skinny.supports(a, sfa, b, sfb, d, c)
            and gemm_skinny.pays(a.shape[0], b.shape[0], b.shape[1], runtime.get_num_sms())):
        return "skinny", gemm_skinny.plan(a.shape[0], b.shape[0], b.shape[1], runtime.get_num_sms())
    if scaled and gran_n_b == 128 and force_block_m is None:
        if not a_fp4 and _use_gluon(mode_name, a, sfa, b, sfb, d, c):
            return "gluon", None
        if a_fp4:
            operand = _fp4_gluon_operand(mode_name, a, b, sfb, d, c)
            if operand is not None:
                return "fp4-gluon", operand
    mode = {"dense": gemm_triton.MODE_DENSE, "contiguous": gemm_triton.MODE_CONTIGUOUS,
            "masked": gemm_triton.MODE_MASKED}[mode_name]
    num_groups = a.shape[0] if a.dim() == 3 else 1
    cfg = triton_config(mode, a.shape[-2], b.shape[-2], b.shape[-1], scaled, expected_m, max_block_n, num_groups,
                        runtime.get_num_sms())
    if d.dtype == torch.float8_e4m3fn:       # the FP8 payload: one 128-column scale group a tile
        cfg = dataclasses.replace(cfg, block_n=128)
    if force_block_m is not None and force_block_m != cfg.block_m:
        cfg = dataclasses.replace(cfg, block_m=force_block_m, swap_ab=force_block_m <= 32,
                                  num_warps=4 if force_block_m <= 64 else 8)
    return "triton", cfg


def plan_tiles(mode_name: str, a, sfa, b, sfb, d, *, c=None, expected_m: int | None = None, gran_n_b: int = 128,
               max_block_n: int = 256, force_block_m: int | None = None) -> tuple[int, int]:
    """The ``(block_m, block_n)`` the same :func:`run_m_grouped` call will use, known before launch (to size
    and check SBO signal arrays)."""
    kind, cfg = _plan(mode_name, a, sfa, b, sfb, d, c, expected_m, gran_n_b, max_block_n, force_block_m)
    if kind == "skinny":
        return cfg.block_m, cfg.block_n
    if kind == "fp4-gluon":
        a, sfa = cfg
    if kind in ("gluon", "fp4-gluon"):
        from . import gemm_gluon
        return gemm_gluon.plan(mode_name, a, sfa, b, sfb, d, expected_m=expected_m, max_block_n=max_block_n,
                               num_sms=runtime.get_num_sms(), c=c)
    return cfg.block_m, cfg.block_n


def run_m_grouped(mode_name: str, a, sfa, b, sfb, d, *, c=None, m_indices=None, masked_m=None, signal=None,
                  expected_m: int | None = None, gran_n_b: int = 128, max_block_n: int = 256,
                  force_block_m: int | None = None, d_sf=None) -> tuple[int, int]:
    """Run ``D = C + A @ B.T`` (dense, contiguous or masked); returns the ``(block_m, block_n)`` used.

    ``sfa``/``sfb`` are None for BF16.  3-D operands carry the group in dim 0.  ``force_block_m``
    forces the Triton kernel's block_m (e.g. to divide the contiguous layout's alignment).  ``d_sf`` (masked,
    ``d`` FP8): D gets the FP8 combine payload of the BF16 result (codes in ``d``, UE8M0 bytes in ``d_sf``).
    """
    num_sms = runtime.get_num_sms()
    kind, cfg = _plan(mode_name, a, sfa, b, sfb, d, c, expected_m, gran_n_b, max_block_n, force_block_m)
    pdl = False
    if kind == "skinny":
        if a.shape[0]:                     # (supports() has ruled out N == 0 and K == 0)
            gemm_skinny.launch(a, sfa, b, sfb, d, num_sms, cfg)
        return cfg.block_m, cfg.block_n
    if kind == "fp4-gluon":
        q, sf = cfg
        pdl = runtime.get_pdl()
        fp4_convert.launch_fp4_to_fp8(a, sfa, q, sf, masked_m=masked_m, m_indices=m_indices,
                                      rows_hint=expected_m if masked_m is not None else None, pdl_trigger=pdl)
        a, sfa, kind = q, sf, "gluon"
    if kind == "gluon":
        from . import gemm_gluon
        # pdl: right after the convert, on the same stream, nothing launched in between
        return gemm_gluon.launch(mode_name, a, sfa, b, sfb, d, c=c, m_indices=m_indices, masked_m=masked_m,
                                 expected_m=expected_m, signal=signal, num_sms=num_sms, max_block_n=max_block_n,
                                 pdl=pdl, d_sf=d_sf)
    mode = {"dense": gemm_triton.MODE_DENSE, "contiguous": gemm_triton.MODE_CONTIGUOUS,
            "masked": gemm_triton.MODE_MASKED}[mode_name]
    scaled = sfa is not None
    a_fp4 = a.dtype == torch.uint8
    k = b.shape[-1]
    n = b.shape[-2]
    m = a.shape[-2]
    num_groups = a.shape[0] if a.dim() == 3 else 1
    if m == 0 or n == 0:
        return cfg.block_m, cfg.block_n
    num_tiles = num_groups * triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    grid = (max(1, min(num_tiles, num_sms)),)
    sfa_packed = scaled and not a_fp4 and sfa.dtype == torch.int32
    sfb_packed = scaled and sfb.dtype == torch.int32
    dummy = d
    fp8_out = {}
    if d_sf is not None:
        fp8_out = dict(dsf_ptr=d_sf, stride_sfg=d_sf.stride(0), stride_sfm=d_sf.stride(1), D_FP8=True,
                       SOFT=runtime.interpreting())
        d = d.view(torch.uint8)
    gemm_triton.m_grouped_gemm_kernel[grid](
        a, b, d, c if c is not None else dummy,
        sfa if scaled else dummy, sfb if scaled else dummy,
        m_indices if m_indices is not None else dummy,
        masked_m if masked_m is not None else dummy,
        signal if signal is not None else dummy,
        m, n, k, num_groups, b.shape[0] if b.dim() == 3 else 1, grid[0],
        *_strides(a, 3), *_strides(b, 3), *_strides(d, 3), *_strides(c, 3),
        *_strides(sfa, 3), *_strides(sfb, 3),
        MODE=mode, SCALED=scaled, SFA_PACKED=sfa_packed, SFB_PACKED=sfb_packed,
        SFB_GRAN_N=gran_n_b, HAS_C=c is not None, SIGNAL=signal is not None, SWAP_AB=cfg.swap_ab,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        GROUPS_POW2=triton.next_power_of_2(num_groups), UPCAST_DOT=not scaled and runtime.interpreting(),
        A_FP4=a_fp4,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **fp8_out,
    )
    return cfg.block_m, cfg.block_n


def run_k_grouped(a, sfa, b, sfb, d, c, ks_tensor, num_groups: int) -> None:
    m, n = d.shape[1], d.shape[2]
    if m == 0 or n == 0 or num_groups == 0:
        return
    block_m, block_n = 128, 128
    num_tiles = num_groups * triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    grid = (max(1, min(num_tiles, runtime.get_num_sms())),)
    gemm_triton.k_grouped_gemm_kernel[grid](
        a, b, d, c if c is not None else d, sfa, sfb, ks_tensor,
        m, n, num_groups, grid[0],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        *d.stride(), *(_strides(c, 3)),
        sfa.stride(0), sfa.stride(1), sfb.stride(0), sfb.stride(1),
        HAS_C=c is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128,
        num_warps=8, num_stages=3,
    )

