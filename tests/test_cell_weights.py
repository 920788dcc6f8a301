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


@pytest.mark.slow  # a fused network, twice, through the interpreter
@pytest.mark.gpu_path
def test_fused_cells_slice_the_mixing_weights_once(device, monkeypatch):
    """Fused MixedOps get their candidates' weights from ONE slice of the cell's rows (backward: one cat per cell,
    none per edge); the α gradients are those of each edge slicing its own row, bit for bit (nodes summed by
    separate adds in both runs)."""
    from milenas_fast.ops import select
    from milenas_fast.space import mixing_weights
    from milenas_fast.space.mixed_op import FusedMixedOp

    import milenas_fast.space.supernet as supernet

    monkeypatch.delenv(select.ENV, raising=False)
    monkeypatch.setattr(supernet, "_hooked", lambda m: True)
    torch.manual_seed(0)
    net = Network(C=4, num_classes=3, layers=1, steps=2, multiplier=2, mixed_op=FusedMixedOp).to(device)  # one cell
    x, y = torch.randn(2, 3, 8, 8, device=device), torch.tensor([0, 2], device=device)
    loss = net._loss(x, y)
    names = [type(fn).__name__ for fn in _nodes(loss.grad_fn)]
    assert names.count("SliceLastBackward") == len(net.cells)
    got = torch.autograd.grad(loss, net.alphas_reduce)  # the one cell reduces

    monkeypatch.setattr(mixing_weights, "candidate_rows", lambda *a: None)
    monkeypatch.setattr(supernet, "candidate_rows", lambda *a: None)
    loss = net._loss(x, y)
    assert sum(type(fn).__name__ == "SliceLastBackward" for fn in _nodes(loss.grad_fn)) == 5 * len(net.cells)
    want = torch.autograd.grad(loss, net.alphas_reduce)
    for g, w in zip(got, want):
        assert g.abs().sum() > 0 and torch.equal(g, w)


def test_candidate_rows_needs_every_op_fused_alike():
    """A mixed cell (some ops not fused, or another slice) keeps the per-edge path: None."""
    from milenas_fast.space.mixing_weights import candidate_rows

    net = Network(C=4, num_classes=3, layers=3, steps=2, multiplier=2, mixed_op=ReferenceMixedOp)
    assert candidate_rows(torch.rand(5, 8), net.cells[0]._ops) is None


@pytest.mark.slow  # a fused network of 27 edges through the interpreter
@pytest.mark.gpu_path
def test_fused_edges_add_into_their_node(device, monkeypatch):
    """A fused MixedOp given `acc` returns acc + its output (the node's running sum, added by edge_reduce: the
    cells run no separate add), with acc's gradient the output's; a forward hook on an edge keeps that edge's
    own output (the cell then adds it as before). Outputs and α gradients match the per-edge adds."""
    from milenas_fast.ops import select
    from milenas_fast.space import supernet
    from milenas_fast.space.mixed_op import FusedMixedOp

    monkeypatch.delenv(select.ENV, raising=False)
    torch.manual_seed(1)
    net = Network(C=4, num_classes=3, layers=1, steps=3, multiplier=3, mixed_op=FusedMixedOp).to(device)  # one cell
    x, y = torch.randn(2, 3, 8, 8, device=device), torch.tensor([0, 2], device=device)

    def run():
        loss = net._loss(x, y)
        adds = sum(type(fn).__name__ == "AddBackward0" for fn in _nodes(loss.grad_fn))
        return loss, torch.autograd.grad(loss, net.alphas_reduce), adds  # the one cell reduces

    loss, grads, adds = run()
    seen = []
    hook = net.cells[0]._ops[3].register_forward_hook(lambda m, i, out: seen.append(out))
    loss_h, grads_h, adds_h = run()
    hook.remove()
    assert adds_h == adds + 1 and len(seen) == 1  # the hooked edge's output added by the cell
    monkeypatch.setattr(supernet, "_hooked", lambda m: True)  # every edge as the reference path sums
    loss_r, grads_r, adds_r = run()
    assert adds_r == adds + len(net.cells) * (1 + 2 + 3)  # nodes with k = 2, 3, 4 inputs: k - 1 adds each
    for a, b in ((loss, loss_r), (loss_h, loss_r), *zip(grads, grads_r), *zip(grads_h, grads_r)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    op, h = net.cells[0]._ops[4], torch.randn(2, 8, 4, 4, device=device)  # node 0 to node 1: stride 1, 2·C
    acc = torch.randn_like(h).requires_grad_()
    w = torch.softmax(torch.randn(8, device=device), 0)
    out = op(h, w, acc=acc)
    torch.testing.assert_close(out, acc + op(h, w), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, acc, g)[0], g)
