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
