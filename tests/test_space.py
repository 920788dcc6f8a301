"""Search space: op shapes, the supernet's size, α handling, MixedOp semantics."""
import copy

import pytest
import torch

from milenas_fast import MixedOp, Network
from milenas_fast.space.primitives import PRIMITIVES, make_op


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize("name", PRIMITIVES)
def test_op_output_shape(name, stride, size):
    x = torch.randn(2, 6, size, size)
    y = make_op(name, 6, stride, affine=False)(x)
    out = (size + 2 - 3) // stride + 1
    assert y.shape == (2, 6, out, out)


def test_default_supernet_size_and_alphas():
    torch.manual_seed(0)
    model = Network(16, 10, 8)
    assert sum(p.numel() for p in model.parameters()) == 1_930_618
    assert [tuple(a.shape) for a in model.arch_parameters()] == [(14, 8), (14, 8)]
    std = torch.cat([a.flatten() for a in model.arch_parameters()]).std().item()
    assert 0.7e-3 < std < 1.3e-3  # 1e-3 · randn
    assert all(a.is_leaf and a.requires_grad for a in model.arch_parameters())
    # α is not a weight: SGD must never see it, and search BN is non-affine except the stem's
    ids = {id(p) for p in model.parameters()}
    assert not any(id(a) in ids for a in model.arch_parameters())
    affine_bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.affine]
    assert affine_bn == [model.stem[1]]


def test_reduction_cells_and_shapes():
    model = Network(4, 10, 8)
    assert [c.reduction for c in model.cells] == [False, False, True, False, False, True, False, False]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_new_copies_alphas_into_fresh_tensors():
    model = Network(4, 10, 3)
    with torch.no_grad():
        model.alphas_normal.add_(1.0)
    twin = model.new()
    assert torch.equal(twin.alphas_normal, model.alphas_normal)
    assert twin.alphas_normal is not model.alphas_normal
    assert twin.genotype() == model.genotype()


def test_darts_loss_api():
    model = Network(4, 10, 2)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    loss = model._loss(x, y)
    assert loss.ndim == 0 and torch.isfinite(loss)


class _ZeroSummingMixedOp(MixedOp):
    """The DARTS formula literally: every op including `none` (a multiplied zero tensor)."""

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_skipping_none_matches_darts_sum(stride):
    torch.manual_seed(0)
    ours = MixedOp(4, stride)
    darts = _ZeroSummingMixedOp(4, stride)
    darts.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 9, 9, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    out_a, out_b = ours(x, w), darts(x, w)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out_a)
    ga = torch.autograd.grad(out_a, [x, w], g)
    gb = torch.autograd.grad(out_b, [x, w], g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ga[1][0] == 0  # `none`'s mixing weight gets an exact zero


def test_alphas_follow_device_moves_and_stay_leaves():
    model = Network(4, 10, 2).double()
    assert model.alphas_normal.dtype == torch.float32  # dtype casts leave α in fp32
    moved = copy.deepcopy(model).to("cpu")
    assert moved.alphas_normal.is_leaf and moved.alphas_normal.requires_grad


@pytest.mark.gpu_path
@pytest.mark.parametrize("size", [(8, 6), (7, 9), (8, 5)])
def test_factorized_reduce_is_darts_formula(size):
    """Even sizes sample the odd pixels directly (no pad); the result and every gradient are DARTS's
    pad-the-shifted-input formula's."""
    from milenas_fast.space.primitives import FactorizedReduce

    torch.manual_seed(0)
    fr = FactorizedReduce(5, 6, affine=False)
    x = torch.randn(3, 5, *size, requires_grad=True)
    out = fr.pre_bn(x)
    # the stand-in weights' path (the fused MixedOp's cast weights): the same result
    torch.testing.assert_close(fr.pre_bn(x, fr.conv_1.weight * 1, fr.conv_2.weight * 1), out, rtol=1e-6, atol=1e-6)
    r = torch.relu(x)
    darts = torch.cat([fr.conv_1(r), fr.conv_2(torch.nn.functional.pad(r[:, :, 1:, 1:], (0, 1, 0, 1)))], dim=1)
    torch.testing.assert_close(out, darts, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, fr.conv_1.weight, fr.conv_2.weight), g)
    want = torch.autograd.grad(darts, (x, fr.conv_1.weight, fr.conv_2.weight), g)
    for a, b, name in zip(got, want, ("x", "conv_1", "conv_2")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu_path
def test_each_state_relu_once_same_result():
    """Network.forward computes each cell state's ReLU once for the two cells that preprocess it; output,
    every gradient and the BN running statistics equal calling each cell on the raw states."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from milenas_fast.space.mixed_op import ReferenceMixedOp

    class CountRelu(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountRelu.n += func is torch.ops.aten.relu.default
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = Network(C=4, num_classes=3, layers=5, steps=2, multiplier=2, mixed_op=ReferenceMixedOp)
    twin = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)

    def cell_by_cell(m):
        w_normal, w_reduce = m.mixing_weights()
        s0 = s1 = m.stem(x)
        for cell in m.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return m.classifier(m.global_pooling(s1).flatten(1))

    with CountRelu():
        out = net(x)
    per_mixed_op = sum(PRIMITIVES.count(p) for p in ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
                                                      "dil_conv_5x5", "sep_conv_3x3", "sep_conv_5x5"))
    edges = sum(len(c._ops) for c in net.cells)
    stride2_skips = sum(1 for c in net.cells for op in c._ops if op.stride == 2)
    assert CountRelu.n == len(net.cells) + edges * per_mixed_op + stride2_skips  # one per state read
    want = cell_by_cell(twin)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, list(net.parameters()), g),
                    torch.autograd.grad(want, list(twin.parameters()), g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
