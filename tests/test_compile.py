"""torch.compile: the supernet (fused MixedOp included) traces whole, and compiled search iterations equal
eager ones. On CPU the fused path runs the Triton interpreter inside an opaque custom op."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from milenas_fast import Network
from milenas_fast.ops import select
from milenas_fast.precision import Precision
from milenas_fast.search.loop import compile_in_place
from milenas_fast.search.step import StepRule, search_step
from milenas_fast.space.mixed_op import FusedMixedOp, ReferenceMixedOp, set_impl

TINY = dict(C=4, num_classes=10, layers=3, steps=1, multiplier=1)  # 6 mixed ops, both cell kinds


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_net(mixed_op, device, seed=0):
    torch.manual_seed(seed)
    return Network(**TINY, mixed_op=mixed_op).to(device)


def batches(device, n=2, hw=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    make = lambda: (torch.randn(n, 3, hw, hw, generator=g).to(device),  # noqa: E731
                    torch.randint(0, 10, (n,), generator=g).to(device))
    return [(make(), make()) for _ in range(2)]  # two iterations of (train, valid)


def optimizers(net):
    w = torch.optim.SGD(net.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    a = torch.optim.Adam(net.arch_parameters(), lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3)
    return w, a


def run_search(net, device, steps):
    w_opt, a_opt = optimizers(net)
    losses = []
    for train, valid in steps:
        loss, _ = search_step(net, train, valid, w_opt, a_opt, StepRule(), Precision(torch.device(device), False))
        losses.append(loss)
    return torch.stack(losses)


def assert_same_state(a, b, tol):
    for x, y in zip(a.arch_parameters(), b.arch_parameters()):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=tol, msg="α")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=tol, msg=name)


@pytest.mark.stack  # Dynamo
@pytest.mark.gpu_path
def test_fused_supernet_traces_without_graph_breaks(device, monkeypatch):
    monkeypatch.delenv(select.ENV, raising=False)
    assert not select.blockers(device), select.blockers(device)
    net = tiny_net(FusedMixedOp, device)
    assert all(m.decision.impl == "fused" for m in net.modules() if isinstance(m, FusedMixedOp))
    x = batches(device)[0][0][0]
    out = torch._dynamo.explain(net)(x)
    assert out.graph_break_count == 0, [str(r) for r in out.break_reasons]
    assert out.graph_count == 1
    # the stencil and edge_reduce ops are in the graph (edge_reduce inside bn_fold's autograd.Function's
    # subgraph), not run around it
    ops = {str(n.target) for g in out.graphs for m in g.modules() if hasattr(m, "graph")
           for n in m.graph.nodes if n.op == "call_function"}
    assert any("stencil_fwd" in o for o in ops) and any("edge_reduce" in o for o in ops), ops


@pytest.mark.slow
@pytest.mark.stack  # Dynamo and AOT autograd
@pytest.mark.gpu_path
def test_compiled_search_equals_eager_reference(device):
    """Two MiLeNAS iterations (α passes with frozen weights, then the w step), `--compile` as the loop
    does it (compile_in_place) vs eager. aot_eager: the same Dynamo graphs and AOT autograd
    the loop's inductor gets, without code generation — inductor on this tiny net did not finish in 14 min
    on 2 shared CPU cores."""
    steps = batches(device)
    eager = tiny_net(ReferenceMixedOp, device)
    compiled = copy.deepcopy(eager)
    compile_in_place(compiled, backend="aot_eager", fullgraph=True)
    le = run_search(eager, device, steps)
    lc = run_search(compiled, device, steps)
    torch.testing.assert_close(lc, le, rtol=0, atol=1e-5)
    assert_same_state(compiled, eager, 1e-5)


@pytest.mark.slow
@pytest.mark.stack  # Dynamo and AOT autograd around the custom ops
@pytest.mark.gpu_path
def test_compiled_search_equals_eager_fused(device, monkeypatch):
    """The same with the fused MixedOp (aot_eager: the interpreted op is opaque; on a GPU inductor would
    trace into the Triton kernels). set_impl afterwards recompiles to the reference, no stale graph."""
    monkeypatch.delenv(select.ENV, raising=False)
    steps = batches(device)
    eager = tiny_net(FusedMixedOp, device)
    compiled = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compile_in_place(compiled, backend=counter, fullgraph=True)
    le = run_search(eager, device, steps)
    lc = run_search(compiled, device, steps)
    torch.testing.assert_close(lc, le, rtol=0, atol=1e-5)
    assert_same_state(compiled, eager, 1e-5)

    frames = counter.frame_count
    assert set_impl(compiled, "reference") == set_impl(eager, "reference") == 6
    x = steps[0][0][0]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=1e-5)
    assert counter.frame_count > frames  # the implementation change invalidated the fused graph
