"""One search iteration: the α update, then the w update (SPEC §1).

milenas:      g_α = λ_valid·∇α L_val(w, α) + λ_train·∇α L_tr(w, α)   (both at the current w)
darts:        g_α = ∇α L_val(w, α)                                    (first-order DARTS)
single_level: g_α = ∇α L_tr(w, α)
then Adam on α, then SGD on w with ∇w L_tr(w, α_new) on the same training batch, the WEIGHTS clipped.
The α passes freeze the weights, so no weight gradients are computed there.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..precision import Precision


@dataclass(frozen=True)
class StepRule:
    optimization: str = "milenas"
    lambda_train: float = 1.0
    lambda_valid: float = 1.0
    grad_clip: float = 5.0

    def alpha_terms(self) -> list[tuple[str, float]]:
        """Which α passes run, in the authors' order (train first), with their weights."""
        if self.optimization == "milenas":
            return [("train", self.lambda_train), ("valid", self.lambda_valid)]
        if self.optimization == "darts":
            return [("valid", 1.0)]
        if self.optimization == "single_level":
            return [("train", 1.0)]
        raise ValueError(f"unknown optimization {self.optimization!r}")


@contextlib.contextmanager
def frozen_weights(model):
    """Weights marked as not requiring grad for an α-only pass: autograd then neither saves what weight
    gradients need nor computes them (same α gradient, less memory and time)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def alpha_gradient(model, batches: dict, rule: StepRule, precision: Precision) -> tuple[list[torch.Tensor], bool]:
    """The combined α gradient (not yet applied) and whether it is finite."""
    alphas = model.arch_parameters()
    total = [torch.zeros_like(a) for a in alphas]
    finite = True
    for which, weight in rule.alpha_terms():
        x, y = batches[which]
        with frozen_weights(model), precision.autocast():
            loss = model._loss(x, y)
            grads, ok = precision.alpha_grads(loss, alphas)
        finite &= ok
        for t, g in zip(total, grads):
            t.add_(g, alpha=weight)
    return total, finite


def weight_step(model, x, y, w_optimizer, rule: StepRule, precision: Precision):
    """SGD step on the weights from the training batch; returns (loss, logits) for the log."""
    weights = [p for p in model.parameters() if p.requires_grad]
    w_optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        logits = model(x)
    loss = model._criterion(logits.float(), y)
    torch.autograd.backward(precision.scale(loss), inputs=weights)  # α gets no gradient from this pass
    precision.step(w_optimizer, weights, rule.grad_clip)
    return loss.detach(), logits.detach()


def search_step(model, train_batch, valid_batch, w_optimizer, a_optimizer, rule: StepRule, precision: Precision):
    """α step first, then w step with the updated α (same training batch). Returns (loss, logits)."""
    grads, finite = alpha_gradient(model, {"train": train_batch, "valid": valid_batch}, rule, precision)
    a_optimizer.zero_grad(set_to_none=True)
    if finite:  # fp16 overflow: skip this α step, as GradScaler does for w
        for a, g in zip(model.arch_parameters(), grads):
            a.grad = g
        a_optimizer.step()
    return weight_step(model, *train_batch, w_optimizer, rule, precision)


def _unscaled_alpha_grads(alphas, precision: Precision) -> tuple[list[torch.Tensor], bool]:
    """Take α's .grad (left by a backward over weights and α), unscaled by hand under fp16 loss scaling."""
    grads = [a.grad if a.grad is not None else torch.zeros_like(a) for a in alphas]
    for a in alphas:
        a.grad = None
    if precision.scaler is None:
        return grads, True
    inv = 1.0 / precision.scaler.get_scale()
    grads = [g.float() * inv for g in grads]
    return grads, all(bool(torch.isfinite(g).all()) for g in grads)


def fused_search_step(model, train_batch, valid_batch, w_optimizer, a_optimizer, rule: StepRule,
                      precision: Precision):
    """`--fused_train_step`: ∇w L_tr and ∇α L_tr from ONE backward of the training loss, so an iteration
    costs two forward/backward passes instead of three (milenas). Not the default: it changes the algorithm
    slightly — w's gradient is taken at the pre-update α (the authors' order takes it at the updated α).
    The α update itself is the same as `search_step`'s (both α gradients at the current w and α).
    Order: training pass (w and α grads), validation pass (α only, if the rule uses it), α step, w step.
    Returns (training loss, logits) like `search_step`."""
    alphas = model.arch_parameters()
    weights = [p for p in model.parameters() if p.requires_grad]
    terms = dict(rule.alpha_terms())
    w_optimizer.zero_grad(set_to_none=True)
    a_optimizer.zero_grad(set_to_none=True)
    x, y = train_batch
    with precision.autocast():
        logits = model(x)
    loss = model._criterion(logits.float(), y)
    train_alpha = "train" in terms
    torch.autograd.backward(precision.scale(loss), inputs=weights + (list(alphas) if train_alpha else []))
    total = [torch.zeros_like(a) for a in alphas]
    finite = True
    if train_alpha:
        grads, finite = _unscaled_alpha_grads(alphas, precision)
        for t, g in zip(total, grads):
            t.add_(g, alpha=terms["train"])
    if "valid" in terms:
        xv, yv = valid_batch
        with precision.autocast():
            loss_v = model._loss(xv, yv)
        grads, ok = precision.alpha_grads(loss_v, alphas)
        finite &= ok
        for t, g in zip(total, grads):
            t.add_(g, alpha=terms["valid"])
    if finite:
        for a, g in zip(alphas, total):
            a.grad = g
        a_optimizer.step()
    a_optimizer.zero_grad(set_to_none=True)
    precision.step(w_optimizer, weights, rule.grad_clip)
    return loss.detach(), logits.detach()
