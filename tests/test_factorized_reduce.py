"""ops/factorized_reduce.py: the stride-2 skip's two convolutions with a written-out backward, against the module's
own autograd (FactorizedReduce.pre_bn), forward and every gradient; the launches it saves."""
import pytest
import torch

from milenas_fast.ops import factorized_reduce
from milenas_fast.space.primitives import FactorizedReduce


def _stand_in(op, x):
    """The module's path as the fused MixedOp took it before: weights handed in (a quarter of x copied)."""
    return op.pre_bn(x, op.conv_1.weight, op.conv_2.weight)


def _grads(fn, x, op, g):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    return [y.detach(), *torch.autograd.grad(y, [x, op.conv_1.weight, op.conv_2.weight], g)]


@pytest.mark.parametrize("shape", [(2, 4, 6, 8), (3, 6, 4, 4), (1, 2, 2, 2)])
def test_matches_the_module_bit_for_bit(shape):
    """fp32: the same convolutions (aten's backward called as autograd calls it), the shifted half's gradient
    added in place where autograd scatters it and adds: the results of the stand-in-weights path, bit for bit."""
    torch.manual_seed(sum(shape))
    op = FactorizedReduce(shape[1], 2 * shape[1], affine=False)
    x = torch.randn(*shape)
    g = torch.randn(shape[0], 2 * shape[1], shape[2] // 2, shape[3] // 2)
    got = _grads(lambda t: factorized_reduce.pre_bn(op, t), x, op, g)
    want = _grads(lambda t: _stand_in(op, t), x, op, g)
    for name, a, b in zip(("y", "dx", "dw1", "dw2"), got, want):
        assert torch.equal(a, b), name
    module = _grads(op.pre_bn, x, op, g)  # the modules' own path: a stride-2 conv of x[1:, 1:], other sum orders
    for name, a, b in zip(("y", "dx", "dw1", "dw2"), got, module):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_autocast_bf16_matches_the_module():
    """Under autocast (bf16 on the CPU): the values and gradients autocast's per-call casts give."""
    torch.manual_seed(3)
    op = FactorizedReduce(4, 8, affine=False)
    x, g = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(lambda t: factorized_reduce.pre_bn(op, t), x, op, g.bfloat16())
        want = _grads(lambda t: _stand_in(op, t), x, op, g.bfloat16())
    for name, a, b in zip(("y", "dx", "dw1", "dw2"), got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2, msg=name)


def test_frozen_weights_and_odd_sizes():
    """α-only passes (weights frozen): x's gradient alone; odd sizes: the module's own path."""
    torch.manual_seed(4)
    op = FactorizedReduce(3, 4, affine=False).requires_grad_(False)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    g = torch.randn(2, 4, 3, 3)
    (dx,) = torch.autograd.grad(factorized_reduce.pre_bn(op, x), x, g)
    (want,) = torch.autograd.grad(op.pre_bn(x), x, g)
    assert torch.equal(dx, want)
    y = factorized_reduce.pre_bn(op, torch.randn(2, 3, 5, 7))
    assert y.shape == (2, 4, 3, 4) and "Halves" not in type(y.grad_fn).__name__


def test_backward_launches_fewer_ops():
    """No slice_backward (a fill and a copy each) and no separate add: one strided in-place add."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    op = FactorizedReduce(4, 8, affine=False)
    counts = []
    for fn in (lambda t: factorized_reduce.pre_bn(op, t), op.pre_bn):
        x = torch.randn(2, 4, 8, 8, requires_grad=True)
        y = fn(x)
        with Ops() as mode:
            y.backward(torch.ones_like(y))
        counts.append(mode.names)
    ours, module = counts
    assert "slice_backward" not in ours and module.count("slice_backward") == 2
    assert ours.count("add_") == 1 and "add" not in ours and "copy_" not in ours
