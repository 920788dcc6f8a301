"""The start-up self-test of the fused MixedOp (milenas_fast/space/selftest.py) and how resolve_mixed_op acts on it,
with faults injected into the fused path's kernels: on the GPU when there is one, else on CPU through the
Triton interpreter."""
import importlib
import warnings

import pytest
import torch

from milenas_fast.errors import ConfigError
from milenas_fast.ops import backends, select
from milenas_fast.search.plan import resolve_mixed_op
from milenas_fast.space import selftest
from milenas_fast.space.mixed_op import FusedMixedOp, ReferenceMixedOp

pytestmark = pytest.mark.gpu_path
fmo = importlib.import_module("milenas_fast.space.fused_mixed_op")
er = importlib.import_module("milenas_fast.ops.edge_reduce")
Kernels = backends.Kernels
DEV = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
KEY = f"{DEV} float32"


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """An empty per-process cache, and the fused path possible here (on CPU: TRITON_INTERPRET=1, conftest)."""
    monkeypatch.setattr(selftest, "_results", {})
    monkeypatch.setattr(selftest, "_warned", set())
    monkeypatch.delenv(select.ENV, raising=False)
    assert not select.blockers(DEV), select.blockers(DEV)


@pytest.fixture
def auto_picks_fused(monkeypatch):
    """`auto` never picks fused on CPU; pretend this CPU is a GPU for the decision only (a no-op on a GPU)."""
    real = select.decide

    def decide(requested=None, device="cuda", dtype=None):
        if select.requested_impl(requested) == "auto":
            return select.Decision("auto", "fused", ("pretended for the test",))
        return real(requested, device, dtype)

    monkeypatch.setattr(select, "decide", decide)


def our_warnings(rec):
    return [w for w in rec if "self-test" in str(w.message)]


def test_passes_is_cached_and_leaves_the_rng_alone(monkeypatch):
    state = torch.get_rng_state()
    cls, why, kernels = resolve_mixed_op("fused", DEV)
    assert cls is FusedMixedOp and "self-test passed" in why
    assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setattr(selftest, "_run", lambda *a: pytest.fail("ran twice"))
    assert resolve_mixed_op("fused", DEV)[0] is FusedMixedOp
    assert selftest.results() == {KEY: f"passed ({kernels.why})"}


def test_passes_with_the_triton_edge_reduce(monkeypatch):
    """The fused MixedOp with edge_reduce's Triton kernels (what a GPU without nvcc runs)."""
    monkeypatch.setitem(backends._RESOLVED, DEV.type, Kernels(DEV.type, "triton", "forced for the test"))
    calls = []
    triton_er = importlib.import_module("milenas_fast.ops.edge_reduce_triton")
    real = triton_er.edge_reduce_triton
    monkeypatch.setattr(triton_er, "edge_reduce_triton", lambda *a: calls.append(1) or real(*a))
    assert selftest.fused_mixed_op(DEV)[1] == ""
    assert len(calls) == 2  # one MixedOp per stride, through the Triton edge_reduce


def test_bf16_relative_rule():
    kernels, problem = selftest.fused_mixed_op(DEV, torch.bfloat16)
    assert problem == "" and selftest.results() == {f"{DEV} bfloat16": f"passed ({kernels.why})"}


def test_auto_falls_back_with_one_warning_when_a_kernel_raises(monkeypatch, auto_picks_fused):
    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    monkeypatch.setattr(fmo, "stencil_group", broken)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            cls, why, kernels = resolve_mixed_op("auto", DEV)
            assert cls is ReferenceMixedOp and "self-test" in why and "illegal memory access" in why
    (w,) = our_warnings(rec)
    assert f"fused MixedOp disabled on {DEV}" in str(w.message) and "illegal memory access" in str(w.message)
    assert selftest.results()[KEY].startswith("FAILED: stride 1: RuntimeError")


def test_explicit_fused_refuses_wrong_outputs(monkeypatch):
    real = fmo.folded_reduce
    monkeypatch.setattr(fmo, "folded_reduce", lambda *a: real(*a) * 1.05)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match=r"--impl fused: .*self-test.*output differs"):
            resolve_mixed_op("fused", DEV)
    assert not our_warnings(rec)  # explicit: an error, not a warning


def test_wrong_gradients_are_caught(monkeypatch, auto_picks_fused):
    """Right forward, backward off by half: only the gradient checks can see it."""
    real = fmo.folded_reduce

    def wrong_backward(*a):
        out = real(*a)
        return out + 0.5 * (out - out.detach())

    monkeypatch.setattr(fmo, "folded_reduce", wrong_backward)
    with pytest.warns(RuntimeWarning, match="self-test failed"):
        cls, why, kernels = resolve_mixed_op("auto", DEV)
    assert cls is ReferenceMixedOp and "grad" in why and "output differs" not in why
    with pytest.raises(ConfigError, match="grad"):
        resolve_mixed_op("fused", DEV)


def test_failing_cpp_edge_reduce_is_replaced_by_the_triton_one(monkeypatch):
    """C++ kernels that fail at run time (e.g. built for another GPU): the self-test retries with the
    Triton edge_reduce, whose kernels the run then gets (one warning); the fused MixedOp is kept."""
    def no_image(*a):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device (injected)")

    monkeypatch.setattr(er, "_cpp", no_image)
    monkeypatch.setitem(backends._RESOLVED, DEV.type, Kernels(DEV.type, "cpp", "C++ kernels"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cls, why, kernels = resolve_mixed_op("fused", DEV)
    assert cls is FusedMixedOp and kernels.edge_reduce == "triton" and "no kernel image" in kernels.why
    assert Kernels.for_device(DEV.type).edge_reduce == "cpp"  # a value handed to the run, no global switched
    (w,) = [w for w in rec if "Triton kernels, because" in str(w.message)]
    assert "C++ edge_reduce failed the fused self-test" in str(w.message)


def test_the_search_builds_its_supernet_with_the_plans_kernels(monkeypatch):
    """The kernels the self-test passed with (here the Triton edge_reduce, after the C++ op failed) reach every
    MixedOp of the search's supernet through the plan, and nothing else changes."""
    from milenas_fast.config import SearchConfig
    from milenas_fast.search.loop import Search

    monkeypatch.setattr(er, "_cpp", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel image (injected)")))
    monkeypatch.setitem(backends._RESOLVED, DEV.type, Kernels(DEV.type, "cpp", "C++ kernels"))
    cfg = SearchConfig(dataset="synthetic", synthetic_images=16, batch_size=4, layers=3, init_channels=4,
                       epochs=1, impl="fused", device=DEV.type, quiet=True).validate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = Search(cfg, DEV)
    assert s.plan.kernels.edge_reduce == "triton" and "no kernel image" in s.plan.kernels.why
    ops = [m for m in s.model.modules() if isinstance(m, FusedMixedOp)]
    assert ops and all(m.kernels == s.plan.kernels for m in ops)
    assert Kernels.for_device(DEV.type).edge_reduce == "cpp"


def test_both_edge_reduce_kernels_failing_reports_both(monkeypatch, auto_picks_fused):
    def bad(*a):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(er, "_cpp", bad)
    triton_er = importlib.import_module("milenas_fast.ops.edge_reduce_triton")
    monkeypatch.setattr(triton_er, "edge_reduce_triton", bad)
    monkeypatch.setitem(backends._RESOLVED, DEV.type, Kernels(DEV.type, "cpp", "C++ kernels"))
    with pytest.warns(RuntimeWarning, match="self-test failed") as rec:
        cls, why, kernels = resolve_mixed_op("auto", DEV)
    assert cls is ReferenceMixedOp and "with the Triton edge_reduce too" in why
    assert Kernels.for_device(DEV.type).edge_reduce == "cpp" and kernels is None
    assert len(our_warnings(rec)) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("edge", ["chosen", "triton"])
def test_cuda_selftest_passes(dtype, edge, monkeypatch):
    """On the GPU: with the edge_reduce select chose, and with the Triton edge_reduce forced."""
    if edge == "triton":
        monkeypatch.setitem(backends._RESOLVED, "cuda", Kernels("cuda", "triton", "forced for the test"))
    assert selftest.fused_mixed_op("cuda", dtype)[1] == ""
