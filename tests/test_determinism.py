"""--deterministic: what it sets on each device, and that the search and train steps contain no op that torch
flags as nondeterministic on CUDA (torch.use_deterministic_algorithms' list of ops that throw). The op list is
recorded on CPU: ATen decomposes composite ops (e.g. AdaptiveAvgPool2d(1) → mean) the same way on CPU and CUDA,
so the ops that reach a CUDA kernel are the ones recorded here."""
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from milenas_fast.runtime import set_determinism
from milenas_fast.space.evalnet import NetworkCIFAR
from milenas_fast.space.known_genotypes import by_name
from milenas_fast.space.supernet import Network

ROOT = Path(__file__).resolve().parents[1]

# ATen ops behind the "will throw a RuntimeError when mode=True" list of torch.use_deterministic_algorithms
# (CUDA kernels without a deterministic implementation).
NONDETERMINISTIC_ON_CUDA = {
    "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward", "avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "adaptive_max_pool3d_backward", "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward", "max_unpool2d", "max_unpool3d", "upsample_linear1d_backward",
    "upsample_bilinear2d_backward", "upsample_bicubic2d_backward", "upsample_trilinear3d_backward",
    "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward", "nll_loss2d_forward",
    "nll_loss2d_backward", "_ctc_loss_backward", "_embedding_bag_backward", "put_", "put", "histc", "bincount",
    "median", "nanmedian", "kthvalue", "grid_sampler_2d_backward", "grid_sampler_3d_backward",
}


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def forward_backward_ops(model, x, y, inputs):
    with OpNames() as rec:
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = F.cross_entropy(logits.float(), y)
        if isinstance(out, tuple) and out[1] is not None:
            loss = loss + 0.4 * F.cross_entropy(out[1].float(), y)
        torch.autograd.grad(loss, inputs)
    return rec.names


@pytest.mark.gpu_path
def test_search_step_ops_have_deterministic_cuda_kernels():
    torch.manual_seed(0)
    model = Network(4, 10, 3).train()
    x, y = torch.randn(3, 3, 11, 11), torch.tensor([1, 7, 3])
    # the weight pass and the α passes differentiate the same graph w.r.t. different leaves
    names = forward_backward_ops(model, x, y, list(model.parameters()) + model.arch_parameters())
    assert "mean" in names and "nll_loss_forward" in names  # the global pool and the loss, as expected
    assert not names & NONDETERMINISTIC_ON_CUDA, names & NONDETERMINISTIC_ON_CUDA
    assert "_adaptive_avg_pool2d" not in names  # AdaptiveAvgPool2d(1) is a mean: deterministic backward


@pytest.mark.gpu_path
def test_train_step_ops_have_deterministic_cuda_kernels():
    torch.manual_seed(0)
    model = NetworkCIFAR(4, 10, 5, True, by_name("DARTS_V2")).train()
    model.drop_path_prob = 0.2
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([4, 9])  # the auxiliary head needs 8×8 at 2/3 depth
    names = forward_backward_ops(model, x, y, list(model.parameters()))
    assert "avg_pool2d_backward" in names  # the auxiliary head ran
    assert not names & NONDETERMINISTIC_ON_CUDA, names & NONDETERMINISTIC_ON_CUDA


def test_fast_kernels_use_no_atomics():
    """Run-to-run determinism of the Triton and C++/CUDA kernels rests on fixed reduction orders."""
    sources = [p for d in ("kernels", "csrc", "milenas_fast/ops") for p in (ROOT / d).rglob("*")
               if p.suffix in (".py", ".cu", ".cpp", ".cuh", ".h")]
    assert sources
    pattern = re.compile(r"tl\.atomic_\w+|\batomic(Add|CAS|Max|Min|Exch)\b|\bindex_add_?\(|\bscatter_add_?\(")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sources
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


@pytest.fixture
def restore_determinism():
    yield
    set_determinism(False, torch.device("cpu"))


@pytest.mark.gpu_path
def test_deterministic_on_cuda_warns_once_what_it_does_not_guarantee(restore_determinism):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        set_determinism(True, torch.device("cuda"))  # sets flags only: runs without a GPU
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    (w,) = [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert "Not guaranteed" in str(w.message) and "\n" not in str(w.message)


def test_deterministic_on_cpu_is_strict_and_silent(restore_determinism):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        set_determinism(True, torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert not [w for w in record if issubclass(w.category, RuntimeWarning)]
    set_determinism(False, torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
