"""tests/cpu run everywhere: on a CPU machine through the Triton interpreter, on a GPU machine on the GPU.

Tests here create tensors without naming a device; on a GPU machine the default device becomes CUDA
so the same tests exercise the compiled kernels (tensors made on an explicit device stay there).
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _default_device_follows_the_machine():
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(previous)
