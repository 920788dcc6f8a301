"""Cell.forward takes its edges' mixing weights by ONE unbind per cell (backward: one stack per cell), not
by indexing per edge (a select_backward and a gradient-accumulation add per edge); its edges get contiguous
gradients (the last node's slice of the cat's gradient is copied once, not by each edge)."""
import pytest
import torch

from milenas_fast import Network
from milenas_fast.space.mixed_op import ReferenceMixedOp


def _nodes(root):
    seen, todo = set(), [root]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo += [nxt for nxt, _ in fn.next_functions]
    return seen


@pytest.mark.gpu_path  # Cell.forward is the same code on the GPU path
def test_one_unbind_of_the_mixing_weights_per_cell():
    torch.manual_seed(0)
    net = Network(C=4, num_classes=3, layers=3, steps=2, multiplier=2, mixed_op=ReferenceMixedOp)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    nodes = _nodes(net._loss(x, y).grad_fn)
    names = [type(fn).__name__ for fn in nodes]
    assert "SelectBackward0" not in names
    per_cell = [fn for fn in nodes if type(fn).__name__ == "UnbindBackward0"
                and type(fn.next_functions[0][0]).__name__ == "SoftmaxBackward0"]
    assert len(per_cell) == len(net.cells)


@pytest.mark.gpu_path
def test_every_edge_gets_a_contiguous_gradient():
    torch.manual_seed(0)
    net = Network(C=4, num_classes=3, layers=3, steps=3, multiplier=3, mixed_op=ReferenceMixedOp)
    seen = []

    def watch(module, inputs, out):
        out.register_hook(lambda g: seen.append(g.is_contiguous()))

    for cell in net.cells:
        for op in cell._ops:
            op.register_forward_hook(watch)
    net._loss(torch.randn(2, 3, 8, 8), torch.tensor([0, 2])).backward()
    assert len(seen) == 3 * 9 and all(seen)


@pytest.mark.gpu_path
def test_fused_cells_slice_the_mixing_weights_once(device, monkeypatch):
    """Fused MixedOps get their candidates' weights from ONE slice of the cell's rows (backward: one cat per cell,
    none per edge); the α gradients are those of each edge slicing its own row, bit for bit."""
    from milenas_fast.ops import mixing_weights, select
    from milenas_fast.space.mixed_op import FusedMixedOp

    monkeypatch.delenv(select.ENV, raising=False)
    torch.manual_seed(0)
    net = Network(C=4, num_classes=3, layers=3, steps=2, multiplier=2, mixed_op=FusedMixedOp).to(device)
    x, y = torch.randn(2, 3, 8, 8, device=device), torch.tensor([0, 2], device=device)
    loss = net._loss(x, y)
    names = [type(fn).__name__ for fn in _nodes(loss.grad_fn)]
    assert names.count("SliceLastBackward") == len(net.cells)
    got = torch.autograd.grad(loss, net.arch_parameters())

    monkeypatch.setattr(mixing_weights, "candidate_rows", lambda *a: None)
    import milenas_fast.space.supernet as supernet
    monkeypatch.setattr(supernet, "candidate_rows", lambda *a: None)
    loss = net._loss(x, y)
    assert sum(type(fn).__name__ == "SliceLastBackward" for fn in _nodes(loss.grad_fn)) == 5 * len(net.cells)
    want = torch.autograd.grad(loss, net.arch_parameters())
    for g, w in zip(got, want):
        assert g.abs().sum() > 0 and torch.equal(g, w)


def test_candidate_rows_needs_every_op_fused_alike():
    """A mixed cell (some ops not fused, or another slice) keeps the per-edge path: None."""
    from milenas_fast.ops.mixing_weights import candidate_rows

    net = Network(C=4, num_classes=3, layers=3, steps=2, multiplier=2, mixed_op=ReferenceMixedOp)
    assert candidate_rows(torch.rand(5, 8), net.cells[0]._ops) is None
