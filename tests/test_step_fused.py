"""--shared_train_pass: one backward of the training loss gives ∇w and ∇α (2 passes instead of 3).
Checked on CPU against gradients computed separately, and against the default step (same α update,
different w update: the default takes ∇w at the updated α)."""
import copy

import pytest
import torch

from milenas_fast.precision import Precision
from milenas_fast.search.step import StepRule, fused_search_step, search_step
from milenas_fast.space.supernet import Network

CPU = torch.device("cpu")


def tiny(seed=0):
    torch.manual_seed(seed)
    return Network(C=4, num_classes=10, layers=3)


def batches(seed=1, n=6, size=8):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: (torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))  # noqa: E731
    return mk(), mk()


def optimizers(model):
    w = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9, weight_decay=3e-4)
    a = torch.optim.Adam(model.arch_parameters(), lr=3e-2, betas=(0.5, 0.999), weight_decay=1e-3)
    return w, a


class PassCounter:
    def __init__(self, model):
        self.forwards = 0
        model.stem.register_forward_hook(lambda *a: setattr(self, "forwards", self.forwards + 1))


@pytest.mark.parametrize("lam", [(1.0, 1.0), pytest.param((0.5, 2.0), marks=pytest.mark.slow)])
def test_fused_step_computes_what_it_claims(lam):
    rule = StepRule("milenas", lambda_train=lam[0], lambda_valid=lam[1], grad_clip=0.5)
    model = tiny()
    ref = copy.deepcopy(model)
    tr, va = batches()
    w_opt, a_opt = optimizers(model)
    counter = PassCounter(model)
    fused_search_step(model, tr, va, w_opt, a_opt, rule, Precision(CPU, False))
    assert counter.forwards == 2  # one training pass (w and α), one validation pass (α)

    # reference: every gradient separately, all at the ORIGINAL (w, α)
    weights = list(ref.parameters())
    alphas = ref.arch_parameters()
    g_w = torch.autograd.grad(ref._loss(*tr), weights)
    g_tr = torch.autograd.grad(ref._loss(*tr), alphas)
    g_va = torch.autograd.grad(ref._loss(*va), alphas)
    rw_opt, ra_opt = optimizers(ref)
    for a, gt_, gv in zip(alphas, g_tr, g_va):
        a.grad = lam[0] * gt_ + lam[1] * gv
    ra_opt.step()
    for p, g in zip(weights, g_w):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(weights, 0.5)
    rw_opt.step()

    for a, b in zip(model.arch_parameters(), ref.arch_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.slow  # two search steps on a supernet
def test_fused_step_same_alpha_update_different_weight_update_than_default():
    rule = StepRule("milenas", grad_clip=5.0)
    m1 = tiny(3)
    m2 = copy.deepcopy(m1)
    tr, va = batches(4)
    o1, o2 = optimizers(m1), optimizers(m2)
    c1, c2 = PassCounter(m1), PassCounter(m2)
    fused_search_step(m1, tr, va, *o1, rule, Precision(CPU, False))
    search_step(m2, tr, va, *o2, rule, Precision(CPU, False))
    assert (c1.forwards, c2.forwards) == (2, 3)
    for a, b in zip(m1.arch_parameters(), m2.arch_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # α: both at the current (w, α)
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(m1.parameters(), m2.parameters()))
    assert diff > 1e-7  # w: pre-update α (fused) vs updated α (default)


@pytest.mark.slow  # search steps of two rules
@pytest.mark.parametrize("opt", ["single_level", "darts"])
def test_fused_step_other_rules(opt):
    rule = StepRule(opt, grad_clip=0.0)
    model = tiny(5)
    ref = copy.deepcopy(model)
    tr, va = batches(6)
    counter = PassCounter(model)
    fused_search_step(model, tr, va, *optimizers(model), rule, Precision(CPU, False))
    assert counter.forwards == (1 if opt == "single_level" else 2)
    which = tr if opt == "single_level" else va
    g = torch.autograd.grad(ref._loss(*which), ref.arch_parameters())
    g_w = torch.autograd.grad(ref._loss(*tr), list(ref.parameters()))
    rw, ra = optimizers(ref)
    for a, gg in zip(ref.arch_parameters(), g):
        a.grad = gg
    ra.step()
    for p, gg in zip(ref.parameters(), g_w):
        p.grad = gg
    rw.step()
    for a, b in zip(model.arch_parameters(), ref.arch_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
