"""The search iteration: the α gradient of each optimisation mode, the order of the two updates, and
what gradient clipping touches."""
import copy

import pytest
import torch

from milenas_fast.precision import Precision
from milenas_fast.search.params import frozen_weights
from milenas_fast.search.step import StepRule, alpha_gradient, search_step
from milenas_fast.space.supernet import Network

pytestmark = pytest.mark.numerics  # CI reruns them under 2 threads and each CPU kernel set

CPU = Precision(torch.device("cpu"), amp=False)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Network(4, 10, 3).double()
    # Larger α so the mixed ops differ and gradients are far from zero
    model.load_alphas([torch.randn(14, 8), torch.randn(14, 8)])
    tr = (torch.randn(6, 3, 32, 32, dtype=torch.double), torch.randint(0, 10, (6,)))
    va = (torch.randn(6, 3, 32, 32, dtype=torch.double), torch.randint(0, 10, (6,)))
    return model, tr, va


def _grad_alpha(model, batch):
    return torch.autograd.grad(model._loss(*batch), model.arch_parameters())


def test_milenas_alpha_gradient_is_the_lambda_weighted_sum():
    model, tr, va = _setup()
    reference = copy.deepcopy(model)
    g_tr = _grad_alpha(reference, tr)
    g_val = _grad_alpha(reference, va)
    rule = StepRule("milenas", lambda_train=0.7, lambda_valid=1.3)
    got, finite = alpha_gradient(model, {"train": tr, "valid": va}, rule, CPU)
    assert finite
    for g, a, b in zip(got, g_tr, g_val):
        # α's softmax runs in fp32 by design, so agreement is to fp32 rounding, not fp64
        torch.testing.assert_close(g, 0.7 * a + 1.3 * b, rtol=1e-5, atol=1e-8)
        assert g.abs().max() > 1e-6


@pytest.mark.parametrize("mode, which", [("darts", "valid"), ("single_level", "train")])
def test_baselines_use_one_batch(mode, which):
    model, tr, va = _setup()
    expected = _grad_alpha(copy.deepcopy(model), tr if which == "train" else va)
    got, _ = alpha_gradient(model, {"train": tr, "valid": va}, StepRule(mode), CPU)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)


def test_alpha_passes_compute_no_weight_gradients():
    model, tr, va = _setup()
    alpha_gradient(model, {"train": tr, "valid": va}, StepRule(), CPU)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored after the pass
    with pytest.raises(RuntimeError):
        with frozen_weights(model):
            raise RuntimeError("boom")
    assert all(p.requires_grad for p in model.parameters())  # restored on error too


def test_alpha_steps_first_then_w_sees_the_updated_alpha():
    model, tr, va = _setup()
    reference = copy.deepcopy(model)
    w_opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3)
    rule = StepRule("milenas", grad_clip=0.0)
    search_step(model, tr, va, w_opt, a_opt, rule, CPU)

    # α: one Adam step with the combined gradient at the ORIGINAL weights
    ref_a_opt = torch.optim.Adam(reference.arch_parameters(), lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3)
    g_tr, g_val = _grad_alpha(copy.deepcopy(reference), tr), _grad_alpha(copy.deepcopy(reference), va)
    for a, x, y in zip(reference.arch_parameters(), g_tr, g_val):
        a.grad = x + y
    ref_a_opt.step()
    for a, b in zip(model.arch_parameters(), reference.arch_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)

    # w: the gradient SGD used is ∇w L_tr at the UPDATED α and the original weights
    loss = reference._loss(*tr)
    expected = torch.autograd.grad(loss, list(reference.parameters()))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-8, atol=1e-10)
    # ... and it differs from the gradient at the old α, so the test can tell the order apart
    stale = copy.deepcopy(model)
    stale.load_alphas([a.detach() - 1.0 for a in model.arch_parameters()])
    far = torch.autograd.grad(stale._loss(*tr), list(stale.parameters()))
    assert any((p.grad - f).abs().max() > 1e-8 for p, f in zip(model.parameters(), far))


def test_gradient_clipping_applies_to_the_weights_not_alpha():
    model, tr, va = _setup()
    w_opt = torch.optim.SGD(model.parameters(), 0.0)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=0.0)
    search_step(model, tr, va, w_opt, a_opt, StepRule("milenas", grad_clip=1e-3), CPU)
    w_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    a_norm = torch.linalg.vector_norm(torch.stack([a.grad.norm() for a in model.arch_parameters()]))
    assert abs(w_norm.item() - 1e-3) < 1e-9
    assert a_norm.item() > 1e-2  # untouched by the clip
