"""The run-time guard (milenas_fast/search/guard.py) and its wiring in the search loop: a fast component
that fails in the first iterations is switched off with ONE warning, the iteration is redone from the
restored state, and the run ends exactly where a run that used the fallback from that iteration on ends.
Faults are injected on CPU into the graph body (EagerGraphs), the compiled call and the MixedOp forward."""
import functools
import logging

import numpy as np
import pytest
import torch

from milenas_fast.config import SearchConfig

from milenas_fast.errors import ConfigError
from milenas_fast.data.loaders import epoch_batches
from milenas_fast.meters import Progress
from milenas_fast.ops import select
from milenas_fast.search import graphed as graphed_mod
from milenas_fast.search.guard import Component, Guard
from milenas_fast.search.loop import Search
from milenas_fast.space.mixed_op import MixedOp

CPU = torch.device("cpu")


def cfg(**kw):
    base = dict(dataset="synthetic", synthetic_images=32, batch_size=4, init_channels=2, layers=3, epochs=2,
                device="cpu", loader="gpu", report_freq=100, quiet=True)
    return SearchConfig(**{**base, **kw}).validate()  # 16 training images: 4 iterations per epoch


def assert_same(a, b, path="state"):
    """Exact equality of two nested state dicts (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, path


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "milenas_fast"]


class Boom(RuntimeError):
    pass


# --- the guard itself --------------------------------------------------------------------------------------

@pytest.mark.gpu_path
def test_guard_restores_switches_off_in_order_and_redoes(caplog):
    state = {"x": 0}
    on = {"graph": True, "compile": True}
    comps = [Component("CUDA graph", "the eager loop", lambda why: on.update(graph=False),
                       engaged=lambda: on["graph"]),
             Component("torch.compile", "the uncompiled model", lambda why: on.update(compile=False))]
    guard = Guard(comps, lambda: dict(state), lambda s: state.update(s), iterations=2)

    def iteration():
        state["x"] += 1  # mutates, then fails while a faulty component is on
        if on["compile"]:
            raise Boom("compiled kernel crashed\nsecond line")
        return state["x"]

    with caplog.at_level(logging.WARNING, "milenas_fast"):
        assert guard(iteration) == 1  # applied once: both failed attempts were rolled back
    msgs = warnings_of(caplog)
    assert len(msgs) == 2 and "CUDA graph failed (Boom: compiled kernel crashed)" in msgs[0]
    assert "torch.compile failed" in msgs[1] and "the uncompiled model" in msgs[1]
    assert guard.components == [] and guard(iteration) == 2


@pytest.mark.gpu_path
def test_guard_suspects_an_engaged_component_first_and_stops_guarding():
    on = {"graph": True, "fused": True, "graph_engaged": False}
    comps = [Component("CUDA graph", "the eager loop", lambda why: on.update(graph=False),
                       engaged=lambda: on["graph_engaged"]),
             Component("fused MixedOp", "the reference MixedOp", lambda why: on.update(fused=False))]
    guard = Guard(comps, lambda: None, lambda s: None, iterations=1)

    def iteration():
        if on["fused"]:
            raise Boom("triton")

    guard(iteration)  # the graph was not engaged (warm-up): the fused MixedOp is blamed
    assert on == {"graph": True, "fused": False, "graph_engaged": False}
    guard(iteration)  # the window (1 iteration after the last fallback) is over: no snapshot, no catching
    on["fused"] = True
    with pytest.raises(Boom):
        guard(iteration)


@pytest.mark.gpu_path
def test_guard_is_strict_for_explicit_requests_and_reraises_real_bugs():
    state = {"x": 0}
    comps = [Component("fused MixedOp", "the reference MixedOp", lambda why: None, strict=True)]
    guard = Guard(comps, lambda: dict(state), lambda s: state.update(s), iterations=3)

    def iteration():
        state["x"] += 1
        raise Boom("no kernel image")

    with pytest.raises(ConfigError, match=r"fused MixedOp was requested explicitly and failed \(Boom: no kernel"):
        guard(iteration)
    assert state["x"] == 0  # restored before failing
    with pytest.raises(Boom):
        Guard([], lambda: None, lambda s: None, iterations=3)(iteration)  # nothing to switch off


# --- faults injected into a real (tiny) search on CPU --------------------------------------------------------

def run_epoch(search):
    search.train_epoch(Progress(False))
    state = search.state_dict()
    del state["config"]  # the flags may differ (--compile); what was computed may not
    return state


def fallback_from(search, k, switch_off):
    """The reference: the same search, with the fallback switched on by hand before iteration k."""
    calls = []
    real = search.iteration

    def iteration(batch):
        if len(calls) == k:
            switch_off()
        calls.append(1)
        return real(batch)

    search.iteration = iteration
    return search


@pytest.mark.gpu_path
def test_a_failing_graph_replay_falls_back_to_the_eager_loop(monkeypatch, caplog):
    def graphed_search():
        s = Search(cfg(), CPU, graphs=graphed_mod.EagerGraphs())
        s.graphed.warmup = 1  # iterations: 0 warm-up, 1 capture, 2 and 3 replays
        return s

    want = run_epoch(fallback_from(ref := graphed_search(), 3, lambda: setattr(ref, "graphed", None)))

    real_body, bodies = graphed_mod.GraphedStep._body, []

    def faulty_body(self):
        out = real_body(self)  # the whole iteration is applied, then the "replay" fails
        bodies.append(1)
        if len(bodies) == 3:
            raise Boom("CUDA error: an illegal memory access was encountered")
        return out

    monkeypatch.setattr(graphed_mod.GraphedStep, "_body", faulty_body)
    s = graphed_search()
    with caplog.at_level(logging.WARNING, "milenas_fast"):
        got = run_epoch(s)
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and msgs[0].startswith("CUDA graph failed (Boom: CUDA error: an illegal memory")
    assert "the eager loop" in msgs[0] and s.graphed is None
    assert not s.plan.graphs and s.plan.graphs_why.startswith("off: Boom: CUDA error")  # a new plan, logged as such
    assert_same(got, want)


@pytest.mark.gpu_path
def test_a_failing_compiled_call_falls_back_to_the_uncompiled_model(caplog):
    want = run_epoch(Search(cfg(), CPU))
    s = Search(cfg(compile=True), CPU)
    forwards = []

    def compiled(*args, **kwargs):  # stands in for torch.compile's call: the same maths, and a fault
        forwards.append(1)
        if len(forwards) == 6:  # iteration 1's weight pass, after its α step was applied
            raise Boom("InductorError: compilation failed")
        return s.model._call_impl(*args, **kwargs)

    s.model._compiled_call_impl = compiled
    with caplog.at_level(logging.WARNING, "milenas_fast"):
        got = run_epoch(s)
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and "torch.compile failed (Boom: InductorError" in msgs[0]
    assert s.model._compiled_call_impl is None and len(forwards) == 6 and not s.plan.compile
    assert_same(got, want)


def pretend_fused(model, requested):
    """Mark every MixedOp as running the fused implementation (`fused_fault` computes it as the reference)."""
    for m in model.modules():
        if isinstance(m, MixedOp):
            m.decision = select.Decision(requested, "fused", ("test",))


def fused_fault(monkeypatch, at):
    real, calls = MixedOp.forward, []

    def forward(self, x, weights):
        if self.decision.impl == "fused":
            calls.append(1)
            if len(calls) == at:
                raise Boom("triton.runtime.errors.OutOfResources: shared memory")
            return self.reference_forward(x, weights)  # stands in for the fused kernels: the same maths
        return real(self, x, weights)

    monkeypatch.setattr(MixedOp, "forward", forward)


def with_guard(s):
    s.guard = Guard(s._components(), s._snapshot, s._restore, iterations=3)  # sees the pretend-fused ops
    return s


@pytest.mark.gpu_path
def test_a_failing_fused_mixed_op_falls_back_to_the_reference(monkeypatch, caplog):
    want = run_epoch(Search(cfg(), CPU))
    s = Search(cfg(), CPU)  # --impl auto ...
    pretend_fused(s.model, "fused")  # ... builds the pinned FusedMixedOp where fused can run: not strict
    with_guard(s)
    per_pass = 14 * 3  # MixedOps per forward: 14 edges × 3 cells
    fused_fault(monkeypatch, at=3 * per_pass + 2 * per_pass + 5)  # iteration 1's weight pass, after its α step
    with caplog.at_level(logging.WARNING, "milenas_fast"):
        got = run_epoch(s)
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and "fused MixedOp failed (Boom: triton.runtime" in msgs[0]
    assert all(m.decision.impl == "reference" for m in s.model.modules() if isinstance(m, MixedOp))
    assert_same(got, want)


@pytest.mark.gpu_path
def test_an_explicitly_requested_fused_mixed_op_that_fails_ends_the_run(monkeypatch):
    s = Search(cfg(), CPU)
    s.cfg.impl = "fused"  # as if --impl fused had built it (the real fused path is too slow to run here)
    pretend_fused(s.model, "fused")
    with_guard(s)
    before = s._snapshot()
    fused_fault(monkeypatch, at=3 * 14 * 2 + 1)  # the weight pass, after the α step
    batch = next(iter(epoch_batches(s.train_loader, s.cfg.seed, "train", 0)))
    with pytest.raises(ConfigError, match="fused MixedOp was requested explicitly and failed"):
        s.guard(functools.partial(s.iteration, batch))
    assert_same(s.state_dict(), before)  # restored before failing: nothing half-applied is left


@pytest.mark.slow  # a fused search through the interpreter
@pytest.mark.gpu_path
def test_a_fused_mixed_op_failing_under_the_graph_switches_off_the_graph_then_itself(monkeypatch, caplog):
    """The order of suspicion in the loop: the capture iteration fails (the fused MixedOp is broken from then
    on); the graph is suspected first, the eager redo fails too, then the fused MixedOp goes; the third try
    succeeds. Two warnings, one per component, and the same end state as eager reference from there on."""
    def graphed_search():
        s = Search(cfg(), CPU, graphs=graphed_mod.EagerGraphs())
        s.graphed.warmup = 1  # iteration 1 is the capture iteration
        return s

    want = run_epoch(fallback_from(ref := graphed_search(), 1, lambda: setattr(ref, "graphed", None)))
    s = graphed_search()
    pretend_fused(s.model, "fused")
    with_guard(s)
    fused_fault(monkeypatch, at=3 * 14 * 3 + 1)  # the first MixedOp of iteration 1
    real, broken = MixedOp.forward, []

    def forward(self, x, weights):  # broken from then on, for as long as the fused path is used
        if broken and self.decision.impl == "fused":
            raise Boom("illegal instruction")
        try:
            return real(self, x, weights)
        except Boom:
            broken.append(1)
            raise

    monkeypatch.setattr(MixedOp, "forward", forward)
    with caplog.at_level(logging.WARNING, "milenas_fast"):
        got = run_epoch(s)
    msgs = warnings_of(caplog)
    assert len(msgs) == 2 and msgs[0].startswith("CUDA graph failed") and msgs[1].startswith("fused MixedOp failed")
    assert s.graphed is None and all(m.decision.impl == "reference" for m in s.model.modules() if isinstance(m, MixedOp))
    assert_same(got, want)
