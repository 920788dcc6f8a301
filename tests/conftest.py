"""Shared test setup: decides CPU / Triton-interpreter / CUDA before any project import."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run through the interpreter on CPU tensors; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(params=[DEVICE])
def device(request):
    """Where fused-vs-reference tests run: the GPU when there is one (real kernels, no interpreter), else
    the CPU through the Triton interpreter."""
    return request.param


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
