"""milenas_fast.patch on a DARTS-style model_search.py written here: its own candidate ops, MixedOp(C, stride),
Cell and Network. Patched before building or swapped after, the network keeps every tensor and computes the
same; an op list other than PRIMITIVES is a clear error and nothing is replaced."""
import copy
import importlib.util

import pytest
import torch

from milenas_fast import HardSampledMixedOp, MixedOp, patch_module, replace_mixed_ops
from milenas_fast.ops import select
from milenas_fast.patch import PatchError

MODEL_SEARCH = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

PRIMITIVES = @PRIMITIVES@


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


class Identity(nn.Module):
    def forward(self, x):
        return x


class FactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class Stack(nn.Module):  # layers in .op, as SepConv / DilConv / ReLUConvBN keep them
    def __init__(self, *layers):
        super().__init__()
        self.op = nn.Sequential(*layers)

    def forward(self, x):
        return self.op(x)


def relu_dw_pw_bn(C, k, stride, pad, dil=1):
    return [nn.ReLU(inplace=False), nn.Conv2d(C, C, k, stride, pad, dilation=dil, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C, affine=False)]


OPS = {
    "none": lambda C, s: Zero(s),
    "max_pool_3x3": lambda C, s: nn.MaxPool2d(3, stride=s, padding=1),
    "avg_pool_3x3": lambda C, s: nn.AvgPool2d(3, stride=s, padding=1, count_include_pad=False),
    "skip_connect": lambda C, s: Identity() if s == 1 else FactorizedReduce(C, C, affine=False),
    "sep_conv_3x3": lambda C, s: Stack(*relu_dw_pw_bn(C, 3, s, 1), *relu_dw_pw_bn(C, 3, 1, 1)),
    "sep_conv_5x5": lambda C, s: Stack(*relu_dw_pw_bn(C, @K5@, s, 2), *relu_dw_pw_bn(C, @K5@, 1, 2)),
    "dil_conv_3x3": lambda C, s: Stack(*relu_dw_pw_bn(C, 3, s, 2, 2)),
    "dil_conv_5x5": lambda C, s: Stack(*relu_dw_pw_bn(C, 5, s, 4, 2)),
}


class MixedOp(nn.Module):
    def __init__(self, C, stride@EXTRA@):
        super().__init__()
        self._ops = nn.ModuleList()
        for primitive in PRIMITIVES:
            op = OPS[primitive](C, stride)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class Cell(nn.Module):
    def __init__(self, C_pp, C_p, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        self.pre0 = FactorizedReduce(C_pp, C, False) if reduction_prev else Stack(
            nn.ReLU(inplace=False), nn.Conv2d(C_pp, C, 1, bias=False), nn.BatchNorm2d(C, affine=False))
        self.pre1 = Stack(nn.ReLU(inplace=False), nn.Conv2d(C_p, C, 1, bias=False), nn.BatchNorm2d(C, affine=False))
        self._ops = nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1) for i in range(4) for j in range(2 + i))

    def forward(self, s0, s1, weights):
        states, offset = [self.pre0(s0), self.pre1(s1)], 0
        for i in range(4):
            states.append(sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states)))
            offset += len(states) - 1
        return torch.cat(states[-4:], dim=1)


class Network(nn.Module):
    def __init__(self, C, num_classes, layers):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 3 * C, 3, padding=1, bias=False), nn.BatchNorm2d(3 * C))
        C_pp, C_p, C_curr, reduction_prev = 3 * C, 3 * C, C, False
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            C_curr = C_curr * 2 if reduction else C_curr
            self.cells.append(Cell(C_pp, C_p, C_curr, reduction, reduction_prev))
            C_pp, C_p, reduction_prev = C_p, 4 * C_curr, reduction
        self.classifier = nn.Linear(C_p, num_classes)
        self.alphas_normal = nn.Parameter(1e-1 * torch.randn(14, len(PRIMITIVES)))  # as the MiLeNAS code
        self.alphas_reduce = nn.Parameter(1e-1 * torch.randn(14, len(PRIMITIVES)))

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            w = F.softmax(self.alphas_reduce if cell.reduction else self.alphas_normal, dim=-1)
            s0, s1 = s1, cell(s0, s1, w)
        return self.classifier(s1.mean((2, 3)))
'''

DARTS = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
         "dil_conv_5x5"]


def load(tmp_path, name, primitives=DARTS, k5=5, extra=""):
    """Write model_search-style source as tmp_path/<name>.py and import it."""
    src = MODEL_SEARCH.replace("@PRIMITIVES@", repr(primitives)).replace("@K5@", str(k5)).replace("@EXTRA@", extra)
    path = tmp_path / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _out_and_alpha_grads(net, x):
    out = net(x)
    grads = torch.autograd.grad(out.square().sum(), [net.alphas_normal, net.alphas_reduce])
    return out, grads


def _mixed_ops(net, cls):
    return [m for m in net.modules() if isinstance(m, cls)]


def test_patch_module_builds_ours_with_the_same_results(tmp_path):
    theirs_mod, patched_mod = load(tmp_path, "ms_theirs"), load(tmp_path, "ms_patched")
    original = patched_mod.MixedOp
    assert patch_module(patched_mod) is original
    assert patch_module(patched_mod) is None  # already ours: nothing replaced
    torch.manual_seed(0)
    theirs = theirs_mod.Network(4, 10, 3)
    ours = patched_mod.Network(4, 10, 3)
    assert len(_mixed_ops(ours, MixedOp)) == 3 * 14 and not _mixed_ops(ours, original)
    ours.load_state_dict(theirs.state_dict())  # strict: the same keys and shapes (α included)
    x = torch.randn(2, 3, 9, 9)
    (o1, g1), (o2, g2) = _out_and_alpha_grads(theirs, x), _out_and_alpha_grads(ours, x)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)


@pytest.mark.gpu_path
@pytest.mark.parametrize("cls", [MixedOp, HardSampledMixedOp])
def test_replace_mixed_ops_keeps_every_tensor_and_the_outputs(tmp_path, device, cls):
    mod = load(tmp_path, "ms_built")
    torch.manual_seed(1)
    net = mod.Network(4, 10, 3).to(device)
    original = copy.deepcopy(net)
    before = net.state_dict()
    params = [id(p) for p in net.parameters()]
    replaced = replace_mixed_ops(net, cls)

    assert len(replaced) == 3 * 14 and all(type(m) is mod.MixedOp for m in replaced.values())
    assert "cells.1._ops.0" in replaced and type(net.cells[1]._ops[0]) is cls
    assert not [m for m in net.modules() if type(m).__name__ == "MixedOp" and not isinstance(m, MixedOp)]
    after = net.state_dict()
    assert list(after) == list(before)
    for k in before:  # the very same tensors
        assert after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr(), k
    assert [id(p) for p in net.parameters()] == params  # optimisers built earlier stay valid
    assert not replace_mixed_ops(net)  # nothing left to replace

    x = torch.randn(2, 3, 9, 9, device=device)
    if cls is MixedOp:  # the same maths (fused on a GPU under auto: close, not bitwise)
        (o1, g1), (o2, g2) = _out_and_alpha_grads(original, x), _out_and_alpha_grads(net, x)
        torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-5)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-7)
        for (k, v), w in zip(net.state_dict().items(), original.state_dict().values()):
            torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6, msg=k)  # BatchNorm statistics too
    else:  # drop-in for sampling code: a one-hot row runs one candidate, as DARTS's MixedOp would compute it
        op, ref = net.cells[1]._ops[0], original.cells[1]._ops[0]
        h, row = torch.randn(2, 8, 7, 7, device=device), torch.eye(8, device=device)[5]
        torch.testing.assert_close(op(h, row), ref(h, row), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu_path
def test_replaced_mixed_ops_take_the_fused_path(tmp_path, device, monkeypatch):
    """The taken-over tensors feed the fused kernels (on CPU: the Triton interpreter and the C++ CPU ops)."""
    monkeypatch.setenv(select.ENV, "fused")
    mod = load(tmp_path, "ms_fused")
    torch.manual_seed(2)
    net = mod.Network(4, 10, 3).to(device)
    original = copy.deepcopy(net)
    replace_mixed_ops(net)
    for name in ("cells.0._ops.2", "cells.1._ops.0"):  # stride 1 and stride 2
        ours, theirs = net.get_submodule(name), original.get_submodule(name)
        assert ours.decision.impl == "fused", ours.decision
        h = torch.randn(2, ours.C, 7, 7, device=device)
        w = torch.softmax(torch.randn(8, device=device), 0)
        results = []
        for op in (theirs, ours):
            hi, wi = h.clone().requires_grad_(), w.clone().requires_grad_()
            out = op(hi, wi)
            results.append((out, *torch.autograd.grad(out.square().sum(), [hi, wi])))
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant, message", [
    ({"primitives": DARTS[:1] + DARTS[2:0:-1] + DARTS[3:]}, r"PRIMITIVES is \['none', 'avg_pool_3x3'"),
    ({"k5": 3}, r"candidate 5 \(sep_conv_5x5 in PRIMITIVES order\) differs"),
    ({"primitives": DARTS[1:]}, "PRIMITIVES is"),
    ({"extra": ", switch"}, r"MixedOp\(C, stride\) cannot be built"),
])
def test_patch_module_refuses_another_op_list(tmp_path, variant, message):
    mod = load(tmp_path, "ms_variant", **variant)
    original = mod.MixedOp
    with pytest.raises(PatchError, match=message):
        patch_module(mod)
    assert mod.MixedOp is original


@pytest.mark.parametrize("variant, message", [
    ({"primitives": DARTS[:1] + DARTS[2:0:-1] + DARTS[3:]},
     r"cells.0._ops.0 \(MixedOp\): candidate 1 \(max_pool_3x3 in PRIMITIVES order\) differs.*AvgPool2d.*MaxPool2d"),
    ({"primitives": DARTS[1:]}, "7 candidates, milenas_fast's MixedOp has 8"),
])
def test_replace_mixed_ops_refuses_another_op_list_and_replaces_nothing(tmp_path, variant, message):
    mod = load(tmp_path, "ms_variant_built", **variant)
    net = mod.Network(4, 10, 3)
    with pytest.raises(PatchError, match=message):
        replace_mixed_ops(net)
    assert all(type(m) is mod.MixedOp for c in net.cells for m in c._ops)
