"""Argument validation shared by every public entry point.

Every check raises before any kernel launches: ``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong shape, device, layout or alignment; the message names the argument,
what was expected and what was given.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FP8 = torch.float8_e4m3fn


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, dtype=None, ndim: int | None = None,
                 shape: Sequence[int | None] | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Check type, dtype, rank, shape (``None`` entries are free) and device of a tensor argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, (tuple, list)) else (dtype,)
        if t.dtype not in allowed:
            raise TypeError(f"{name} must have dtype {_fmt_dtypes(allowed)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def check_int(name: str, value, minimum: int = 0) -> int:
    """A plain int (not a bool) at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_cuda_or_interpreter(device: torch.device) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors only through Triton's interpreter."""
    from . import runtime
    if device.type != "cuda" and not runtime.interpreting():
        raise ValueError(f"tensors must be on a CUDA device (or run with TRITON_INTERPRET=1), got {device}")


def check_pair(name: str, pair) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 operand is a ``(tensor, scales)`` pair."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a (tensor, scale_factors) pair, got {type(pair).__name__}")
    return pair[0], pair[1]


def check_unit_stride(name: str, t: torch.Tensor, dim: int, what: str) -> None:
    if t.size(dim) > 1 and t.stride(dim) != 1:
        raise ValueError(f"{name} must be {what} (stride 1 along dim {dim}), got strides {tuple(t.stride())}")


def check_aligned(name: str, value: int, multiple: int, what: str) -> None:
    if value % multiple != 0:
        raise ValueError(f"{what} ({name} = {value}) must be a multiple of {multiple}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: all tensors must share one device")
    return device


def check_no_overlap(out_name: str, out: torch.Tensor, **inputs: torch.Tensor | None) -> None:
    """Outputs must not alias inputs that the kernel still reads."""
    lo = out.data_ptr()
    hi = lo + out.numel() * out.element_size()
    for name, t in inputs.items():
        if t is None or t.numel() == 0 or out.numel() == 0:
            continue
        tlo = t.data_ptr()
        thi = tlo + t.numel() * t.element_size()
        if tlo < hi and lo < thi:
            raise ValueError(f"{out_name} must not overlap {name}")
