"""ops/fanout.py: n views of a tensor whose gradients ONE edge_reduce sums (autograd would add them pairwise)."""
import pytest
import torch

from milenas_fast import Network
from milenas_fast.ops import fanout as fanout_mod
from milenas_fast.ops.fanout import fanout


def _consts(n, c):
    return torch.ones(n, c), torch.zeros(n, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_summed_in_one_launch(dtype, monkeypatch):
    """The views are x; x's gradient is the sum of theirs (fp32 sum, one rounding), by one edge_reduce; unused
    views give none."""
    calls = []
    real = fanout_mod.edge_reduce
    monkeypatch.setattr(fanout_mod, "edge_reduce", lambda ys, *a, **k: calls.append(len(ys)) or real(ys, *a, **k))
    x = torch.randn(2, 3, 4, 5).to(dtype).requires_grad_()
    views = fanout(x, 4, *_consts(4, 3))
    assert len(views) == 4 and all(torch.equal(v, x) for v in views)
    gs = [torch.randn(2, 3, 4, 5).to(dtype) for _ in range(3)]
    (dx,) = torch.autograd.grad(views[:3], x, gs)  # the fourth view unused
    want = sum(g.double() for g in gs)
    assert calls == [3] and dx.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert (dx.double() - want).abs().max() <= tol * want.abs().max()


def test_falls_back_where_it_cannot_help():
    """One consumer, no grad, constants that do not fit, non-contiguous gradients: x itself or autograd's adds."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert all(v is x for v in fanout(x, 3, *_consts(2, 3)))  # too few constant rows
    with torch.no_grad():
        assert all(v is x for v in fanout(x, 3, *_consts(3, 3)))
    views = fanout(x, 2, *_consts(2, 3))
    g = torch.randn(2, 4, 4, 3).transpose(1, 3).transpose(2, 3)  # non-contiguous
    (dx,) = torch.autograd.grad(views, x, [g, g])
    torch.testing.assert_close(dx, 2 * g)


@pytest.mark.slow  # a fused cell of three steps through the interpreter, twice
@pytest.mark.gpu_path
def test_fused_cells_fan_out_their_states(device, monkeypatch):
    """In a fused supernet the states read by three or more edges fan out (their gradients one launch each);
    the α and stem gradients match autograd's pairwise adds."""
    from milenas_fast.ops import select
    from milenas_fast.space import supernet
    from milenas_fast.space.mixed_op import FusedMixedOp

    monkeypatch.delenv(select.ENV, raising=False)
    torch.manual_seed(2)
    net = Network(C=4, num_classes=3, layers=1, steps=3, multiplier=3, mixed_op=FusedMixedOp).to(device)  # one cell
    x, y = torch.randn(2, 3, 8, 8, device=device), torch.tensor([0, 2], device=device)
    seen = []
    real = fanout_mod._Fanout.apply
    monkeypatch.setattr(fanout_mod._Fanout, "apply", lambda *a: seen.append(a[1]) or real(*a))
    # the one cell reduces; the fanned-out states' gradients reach the stem's weights
    wrt = [net.alphas_reduce, *net.stem.parameters()]
    got = torch.autograd.grad(net._loss(x, y), wrt)
    assert seen == [3, 3] * len(net.cells)  # steps 3: s0 and s1 feed three edges, n0 two
    monkeypatch.setattr(supernet, "fanout", lambda h, n, *a, **k: (h,) * n)
    want = torch.autograd.grad(net._loss(x, y), wrt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "_fan_ones" not in net.state_dict() and "cells.0._fan_ones" not in net.state_dict()
