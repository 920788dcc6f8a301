"""A fused Cell runs the edges leaving the states that are ready as one group (space/fused_mixed_op.py's `run`): one
stencil launch for their first stages, one `pointwise` launch per 1×1 stage, one `bn_stats` launch for their last
BatchNorms. Its forward is the per-edge path's bit for bit (each convolution and each statistic is computed by its
own programs whichever launch it is in): outputs, running statistics; its gradients within rounding (autograd adds
a tensor's incoming gradients in the order backward reaches them)."""
import copy

import pytest
import torch

from milenas_fast import Network
from milenas_fast.space import fused_mixed_op as fmo
from milenas_fast.ops import pointwise as pw
from milenas_fast.ops import select
from milenas_fast.ops import stencil as st
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

    stencils = []
    real_stencil = st._launch

    def spy_stencil(kernel, grid, *args, **meta):
        if kernel.fn.__name__ == "stencil_fwd_kernel" and not meta["X5"]:  # the first stages (not the pairs)
            stencils.append(meta["E"])
        return real_stencil(kernel, grid, *args, **meta)

    pw.launch, fmo.bn_stats, st._launch = spy, spy_stats, spy_stencil
    try:
        if train:
            loss = net._loss(x, y)
            wrt = list(net.parameters()) + net.arch_parameters()
            grads = torch.autograd.grad(loss, wrt)
        else:
            with torch.no_grad():
                loss, grads = net._loss(x, y), ()
    finally:
        pw.launch, fmo.bn_stats, st._launch = real, real_stats, real_stencil
    return loss.detach(), grads, [b.clone() for b in net.buffers()], (seen, stats, stencils)


@pytest.mark.slow  # the grouping is Python, the same on every stack: not in the GPU stack's run
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
    (launches, stats, stencils), (launches_r, stats_r, stencils_r) = launches, launches_r
    assert stencils_r == [1] * sum(groups) * len(net.cells)  # the first stages: one stencil launch per group
    assert sorted(stencils) == sorted(groups * len(net.cells))
    assert sorted(launches_r) == sorted([4, 2] * sum(groups) * len(net.cells))
    assert sorted(launches) == sorted([k for e in groups for k in chunks(4 * e) + chunks(2 * e)] * len(net.cells))
    # the last BatchNorms' batch statistics: one bn_stats launch per group (7 candidates per edge), none in eval
    assert stats_r == ([7] * sum(groups) * len(net.cells) if train else [])
    assert sorted(stats) == (sorted([7 * e for e in groups] * len(net.cells)) if train else [])


@pytest.mark.slow
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


@pytest.mark.gpu_path
@pytest.mark.parametrize("stride,identity,present,pools,partial", [pytest.param(1, True, (1, 1, 1, 1), True, False,
                                                                               marks=pytest.mark.slow),
                                                                  (2, False, (1, 0, 1, 1), True, False),
                                                                  (1, False, (0, 1, 0, 0), False, False),
                                                                  (1, True, (1, 1, 1, 1), True, True)])
def test_stencil_group_is_each_edges_stencil(stride, identity, present, pools, partial, device):
    """stencil_group (one launch for E edges each way; odd shape, one program per plane both ways: multi-program
    planes are test_stencil's, with the same kernels) against the reference twin per edge: outputs, the identity's pass-through, every input and filter gradient
    (inputs shared between edges, as a source state's fan-out views are: their gradients add). `partial`: a frozen
    source and frozen filters, and outputs without a gradient, so that the edges' backward launches split by the
    branches they have."""
    from milenas_fast.ops.stencil import KSIZE, stencil_group, stencil_reference

    gen = torch.Generator().manual_seed(3)
    N, C, H, W = 2, 3, 7, 9
    srcs = [torch.randn(N, C, H, W, generator=gen).to(device).requires_grad_(not (partial and s)) for s in range(2)]
    xs = [srcs[e % 2] for e in range(5)]  # two source states, five edges
    filters = [tuple((torch.randn(C, 1, k, k, generator=gen).to(device).requires_grad_(not (partial and e == 3 and
                                                                                             k == 5)) if p else None)
                     for k, p in zip(KSIZE, present)) for e in range(len(xs))]
    outs = stencil_group(xs, filters, stride, pools, identity, max_tile=64)
    refs = [((x,) if identity else ()) + stencil_reference(x, *f, stride, pools) for x, f in zip(xs, filters)]
    leaves = [t for t in srcs + [w for f in filters for w in f if w is not None] if t.requires_grad]
    got, want = [], []
    for e, (o, r) in enumerate(zip(outs, refs)):
        assert len(o) == len(r)
        for j, (a, b) in enumerate(zip(o, r)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                if partial and (e, j) in ((0, 1), (2, 0), (2, 5), (4, 3)):
                    continue  # no gradient: that branch leaves this edge's launches
                g = torch.randn(a.shape, generator=gen).to(device)
                got.append((a, g))
                want.append((b, g))
    ga = torch.autograd.grad([a for a, _ in got if a.requires_grad], leaves,
                             [g for a, g in got if a.requires_grad], allow_unused=True)
    gb = torch.autograd.grad([b for b, _ in want if b.requires_grad], leaves,
                             [g for b, g in want if b.requires_grad], allow_unused=True)
    assert sum(a is None for a in ga) == (2 if partial else 0)  # edge 0's w3, edge 4's wd3
    for i, (a, b) in enumerate(zip(ga, gb)):
        assert (a is None) == (b is None), f"gradient {i}"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"gradient {i}")


@pytest.mark.gpu_path
@pytest.mark.parametrize("partial", [pytest.param(False, marks=pytest.mark.slow), True])  # True: every path too
def test_pair_group_is_each_edges_pair(partial, device):
    """relu_depthwise_pair_bn_tiles of a group (the pairs of a group of edges: statistics merged from one pointwise launch's
    tile statistics, one input- and one filter-gradient launch for all) against the plain-PyTorch pair per edge:
    outputs, batch statistics, every gradient. `partial`: an edge without y5's gradient and one with a frozen
    filter, which take their own backward launches beside the group's, and statistics rows out of order (each
    pair's forward its own launch)."""
    from milenas_fast.ops.pointwise import stats_tile
    from milenas_fast.ops.stencil import relu_depthwise_pair_bn_reference, relu_depthwise_pair_bn_tiles

    gen = torch.Generator().manual_seed(8)
    E, N, C, H, W = 4, 2, 4, 5, 6
    zs = [(torch.randn(N, C, H, W, generator=gen) * 2 + 1).to(device) for _ in range(2 * E)]
    ws = [(torch.randn(C, C, 1, 1, generator=gen) / 3).to(device) for _ in range(2 * E)]
    *hs, tiles = pw.pointwise(zs, ws, (1 << 2 * E) - 1)
    hs = [h.detach().requires_grad_() for h in hs]
    filters = [tuple(torch.randn(C, 1, k, k, generator=gen).to(device).requires_grad_(not (partial and e == 2 and
                                                                                           k == 3))
                     for k in (3, 5)) for e in range(E)]
    # partial: the pairs' statistics rows out of order, so that each pair's forward is its own launch
    perm = [0, 1, 3, 2] if partial else list(range(E))
    launches = []
    real = st._launch

    def spy(kernel, grid, *args, **meta):
        launches.append((kernel.fn.__name__, meta["E"]))
        return real(kernel, grid, *args, **meta)

    st._launch = spy
    try:
        outs = relu_depthwise_pair_bn_tiles([hs[2 * p] for p in perm], [f[0] for f in filters],
                                            [hs[2 * p + 1] for p in perm], [f[1] for f in filters],
                                            [tiles] * E, [(2 * p, 2 * p + 1) for p in perm], stats_tile(hs[0]),
                                            1e-5, max_tile=16)
        skip = {(1, 1)} if partial else set()  # (edge, output) without a gradient
        got = [(outs[e][j], torch.randn(outs[e][j].shape, generator=gen).to(device))
               for e in range(E) for j in (0, 1) if (e, j) not in skip]
        leaves = [t for t in hs + [w for f in filters for w in f] if t.requires_grad]
        ga = torch.autograd.grad([y for y, _ in got], leaves, [g for _, g in got], allow_unused=True)
    finally:
        st._launch = real
    fwd = [n for n in launches if n[0] == "stencil_fwd_kernel"]
    assert fwd == ([("stencil_fwd_kernel", 1)] * E if partial else [("stencil_fwd_kernel", E)]), fwd
    bwd = sorted(n for n in launches if n[0] != "stencil_fwd_kernel")
    if partial:  # the group: edges 0, 2, 3's inputs and 0, 3's filters; edge 1 alone, edge 2's w5 alone
        assert bwd == [("stencil_bwd_input_kernel", 1), ("stencil_bwd_input_kernel", 3),
                       ("stencil_bwd_weight_kernel", 1), ("stencil_bwd_weight_kernel", 1),
                       ("stencil_bwd_weight_kernel", 2)], bwd
    else:
        assert bwd == [("stencil_bwd_input_kernel", E), ("stencil_bwd_weight_kernel", E)], bwd
    refs = [relu_depthwise_pair_bn_reference(hs[2 * p], filters[e][0], hs[2 * p + 1], filters[e][1], None, None, 1e-5)
            for e, p in enumerate(perm)]
    for e in range(E):
        for j in (0, 1):
            torch.testing.assert_close(outs[e][j], refs[e][j], rtol=1e-5, atol=2e-5)
        h = torch.stack([hs[2 * perm[e]], hs[2 * perm[e] + 1]]).detach().transpose(1, 2).reshape(2, C, -1)
        torch.testing.assert_close(outs[e][2], h.mean(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[e][3], h.var(-1), rtol=1e-4, atol=1e-5)
    want = dict(((e, j), r) for e in range(E) for j, r in enumerate(refs[e]))
    gb = torch.autograd.grad([want[(e, j)] for e in range(E) for j in (0, 1) if (e, j) not in skip], leaves,
                             [g for _, g in got], allow_unused=True)
    for i, (a, b) in enumerate(zip(ga, gb)):
        assert (a is None) == (b is None), f"gradient {i}"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()), msg=f"gradient {i}")


def test_pair_group_rejects_rows_outside_the_statistics():
    """Every pair's rows (groups + e·step) must lie inside tile_stats: an error, not a read past its end."""
    h, w3, w5 = torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3), torch.randn(3, 1, 5, 5)
    tiles = torch.zeros(6, 2, 2, 3)
    def fwd(groups, step):
        return torch.ops.milenas_fast.stencil_fwd([h] * 3, [w3] * 3, [w5] * 3, [], [], 1, False, [h] * 3, [], [], tiles,
                                                  groups, step, 16, 1e-5, 0)

    ok = fwd([0, 1], 2)
    assert len(ok) == 15
    for groups, step in (([0, 1], 3), ([4, 5], -3), ([-1, 0], 1)):
        with pytest.raises(ValueError, match="groups two of its rows"):
            fwd(groups, step)
