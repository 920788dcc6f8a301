"""Shared test setup: decides CPU / Triton-interpreter / CUDA before any project import."""
import contextlib
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


@pytest.fixture
def ctrl_c_in_second_epoch(monkeypatch):
    """`with ctrl_c_in_second_epoch(Loop):` — Loop.train_epoch (search or train) raises KeyboardInterrupt when
    the second epoch starts, as Ctrl-C would; the real method is back after the block."""
    @contextlib.contextmanager
    def patched(cls):
        real = cls.train_epoch

        def crash(self, progress):
            if self.epoch == 1:
                raise KeyboardInterrupt
            return real(self, progress)

        with monkeypatch.context() as m:
            m.setattr(cls, "train_epoch", crash)
            yield
    return patched
