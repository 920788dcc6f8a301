"""Shared test setup: decides CPU / Triton-interpreter / CUDA and the thread count before any project import."""
import contextlib
import os

# One thread unless OMP_NUM_THREADS says otherwise: the tests' tensors are tiny, and two OpenMP threads on two
# shared cores cost 2-4x in wall time (more under load). Child processes inherit it. CI runs the `numerics`
# tests again with OMP_NUM_THREADS=2, where summation orders change.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

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


# The op-level tests of the Triton kernels, the C++ ops and their torch.library registration: what a torch/Triton
# version changes (interpreter semantics, schema/fake/autograd registration). Their fast tests are also `stack`
# tests, which CI reruns on the GPU machine's stack; tests marked `stack` by hand add the slow ones that must.
# (test_mixed_op composes these ops in Python: the same on every stack.)
STACK_MODULES = {"test_stencil", "test_pointwise", "test_bn_fold", "test_edge_reduce", "test_fanout", "test_fused_cell",
                 "test_op_registry"}


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.module.__name__.rpartition(".")[2] in STACK_MODULES and "slow" not in item.keywords:
            item.add_marker(pytest.mark.stack)
        if "cuda" in item.keywords and not HAS_CUDA:
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
