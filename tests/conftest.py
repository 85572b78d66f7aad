"""Test layers (DESIGN.md §7).

Without a CUDA GPU every Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1 is set
here, before fp8gemm is imported) and tests marked ``gpu`` are skipped; the summary line counts them.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
IS_SM90 = HAS_GPU and torch.cuda.get_device_capability() == (9, 0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_sm90 = pytest.mark.skip(reason="needs a Hopper (SM90) GPU")
    skip_multi = pytest.mark.skip(reason="needs several GPUs")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "sm90" in item.keywords and not IS_SM90:
            item.add_marker(skip_sm90)
        if "multigpu" in item.keywords and (not HAS_GPU or torch.cuda.device_count() < 2):
            item.add_marker(skip_multi)


@pytest.fixture
def device():
    """Where kernels run: the GPU if there is one, else the CPU (through the interpreter)."""
    return torch.device("cuda") if HAS_GPU else torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
