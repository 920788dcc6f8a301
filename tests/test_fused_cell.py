"""A fused Cell runs the edges leaving the states that are ready as one group (ops/fused_mixed_op.py's `run`): one
`pointwise` launch per stage for all of them, one `bn_stats` launch for their last BatchNorms. Its forward is the
per-edge path's bit for bit (each convolution and each statistic is computed by its own programs whichever launch
it is in): outputs, running statistics; its gradients within rounding (autograd adds a tensor's incoming
gradients in the order backward reaches them)."""
import copy

import pytest
import torch

from milenas_fast import Network
from milenas_fast.ops import fused_mixed_op as fmo
from milenas_fast.ops import pointwise as pw
from milenas_fast.ops import select
from milenas_fast.space.mixed_op import FusedMixedOp


def _net(device, steps, seed=0):
    torch.manual_seed(seed)
    net = Network(C=4, num_classes=3, layers=3, steps=steps, multiplier=2, mixed_op=FusedMixedOp).to(device)
    with torch.no_grad():  # running statistics and filters away from their initial values
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _pass(net, x, y, train: bool):
    """Loss, every weight and α gradient (train), the buffers after it, and the pointwise launches (K each)."""
    net.train(train)
    seen = []
    real = pw.launch

    def spy(kernel, grid, *args, **meta):
        if kernel.fn.__name__ == "pointwise_kernel" and torch._C._current_graph_task_id() == -1:  # forwards only
            seen.append(meta["K"])
        return real(kernel, grid, *args, **meta)

    stats = []
    real_stats = fmo.bn_stats

    def spy_stats(ys, mask, eps):
        stats.append(len(ys))
        return real_stats(ys, mask, eps)

    pw.launch, fmo.bn_stats = spy, spy_stats
    try:
        if train:
            loss = net._loss(x, y)
            wrt = list(net.parameters()) + net.arch_parameters()
            grads = torch.autograd.grad(loss, wrt)
        else:
            with torch.no_grad():
                loss, grads = net._loss(x, y), ()
    finally:
        pw.launch, fmo.bn_stats = real, real_stats
    return loss.detach(), grads, [b.clone() for b in net.buffers()], (seen, stats)


@pytest.mark.gpu_path
@pytest.mark.parametrize("steps,train", [(2, False), (3, True)])
def test_grouped_cell_is_the_per_edge_path(steps, train, device, monkeypatch):
    """Groups of 2·steps edges (from s0 and s1), then steps - 1, …, 1; both cell kinds, train (batch statistics,
    gradients) and eval (running statistics). (steps 4's group of 32 convolutions and the split of larger ones:
    test_pointwise_stage_launches.)"""
    monkeypatch.delenv(select.ENV, raising=False)
    net = _net(device, steps)
    ref = copy.deepcopy(net)
    x, y = torch.randn(2, 3, 6, 6, device=device), torch.tensor([0, 2], device=device)
    loss, grads, bufs, launches = _pass(net, x, y, train)
    monkeypatch.setattr(fmo, "grouped", lambda *a: None)  # every edge by its own MixedOp.forward
    loss_r, grads_r, bufs_r, launches_r = _pass(ref, x, y, train)
    assert torch.equal(loss, loss_r)
    for i, (a, b) in enumerate(zip(grads, grads_r)):  # within rounding: autograd sums a tensor's gradients
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=str(i))  # in backward's order, which differs
    for i, (a, b) in enumerate(zip(bufs, bufs_r)):
        assert torch.equal(a, b), i
    # per cell: the first 1×1s (4 per edge) and the second (2 per sep pair) of each group in one launch (≤ 32)
    def chunks(n):
        return [32] * (n // 32) + ([n % 32] if n % 32 else [])

    groups = [2 * steps] + [steps - j for j in range(1, steps)]  # edges leaving s0 and s1, then each node
    (launches, stats), (launches_r, stats_r) = launches, launches_r
    assert sorted(launches_r) == sorted([4, 2] * sum(groups) * len(net.cells))
    assert sorted(launches) == sorted([k for e in groups for k in chunks(4 * e) + chunks(2 * e)] * len(net.cells))
    # the last BatchNorms' batch statistics: one bn_stats launch per group (7 candidates per edge), none in eval
    assert stats_r == ([7] * sum(groups) * len(net.cells) if train else [])
    assert sorted(stats) == (sorted([7 * e for e in groups] * len(net.cells)) if train else [])


@pytest.mark.gpu_path
def test_hooked_and_unfusable_edges_leave_the_group(device, monkeypatch):
    """An edge watched by a forward hook, or one whose BatchNorms the kernels cannot fold (different eps), takes its
    own MixedOp.forward (the hook sees its own output); the rest of its group is grouped; results unchanged."""
    monkeypatch.delenv(select.ENV, raising=False)
    net = _net(device, 2)
    odd = net.cells[1]._ops[3]
    odd.decision = select.Decision("auto", "fused", ("test",))  # an explicit request would refuse the fallback
    for op in odd._ops:  # mixed eps: the per-edge path hands this edge to the reference twin
        for m in op.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = 1e-3
                break
    ref = copy.deepcopy(net)
    seen = []
    net.cells[0]._ops[1].register_forward_hook(lambda m, i, out: seen.append(out))
    ref.cells[0]._ops[1].register_forward_hook(lambda m, i, out: None)
    x, y = torch.randn(2, 3, 6, 6, device=device), torch.tensor([1, 2], device=device)
    loss, grads, bufs, _ = _pass(net, x, y, True)
    assert len(seen) == 1 and seen[0].shape == (2, 4, 6, 6)
    monkeypatch.setattr(fmo, "grouped", lambda *a: None)
    loss_r, grads_r, bufs_r, _ = _pass(ref, x, y, True)
    torch.testing.assert_close(loss, loss_r, rtol=1e-6, atol=1e-6)
    for a, b in (*zip(grads, grads_r), *zip(bufs, bufs_r)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pointwise_stage_launches(monkeypatch):
    """`_pointwise` (the fused path's 1×1 stages): one launch per input shape, dtype and requires_grad, at most MAX_K
    convolutions each (40 → 32 + 8); the outputs named for statistics first in their launch, each with its launch's
    tile statistics and its row there; every output the plain convolution's."""
    from torch import nn

    launches = []
    real = pw.pointwise
    monkeypatch.setattr(fmo, "pointwise", lambda xs, ws, st=0: launches.append((len(xs), st)) or real(xs, ws, st))
    torch.manual_seed(0)
    todo, convs = {}, {}
    for i in range(44):
        shape = (2, 3, 4, 5) if i < 40 else (2, 3, 2, 3)
        x = torch.randn(shape).requires_grad_(i != 43)
        convs[i] = nn.Conv2d(3, 3, 1, bias=False)
        todo[i] = (x, convs[i])
    stats = [39, 5, 41]
    out, tiles = fmo._pointwise(todo, stats)
    assert launches == [(32, 0b11), (8, 0), (3, 0b1), (1, 0)]
    assert set(tiles) == set(stats) and tiles[39][1] == 0 and tiles[5][1] == 1 and tiles[41][1] == 0
    assert tiles[39][0] is tiles[5][0] and tiles[41][0] is not tiles[5][0]
    for i, (x, conv) in todo.items():
        torch.testing.assert_close(out[i], conv(x), rtol=1e-5, atol=1e-6)
