"""One search iteration: the α update, then the w update (SPEC §1).

milenas:      g_α = λ_valid·∇α L_val(w, α) + λ_train·∇α L_tr(w, α)   (both at the current w)
darts:        g_α = ∇α L_val(w, α)                                    (first-order DARTS)
single_level: g_α = ∇α L_tr(w, α)
then Adam on α, then SGD on w with ∇w L_tr(w, α_new) on the same training batch, the WEIGHTS clipped.
The α passes ask autograd for α only, so no weight gradients are computed there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

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


def alpha_gradient(model, batches: dict, rule: StepRule, precision: Precision) -> tuple[list[torch.Tensor], bool]:
    """The combined α gradient (not yet applied) and whether it is finite."""
    alphas = model.arch_parameters()
    total = [torch.zeros_like(a) for a in alphas]
    finite = True
    for which, weight in rule.alpha_terms():
        x, y = batches[which]
        with precision.autocast():
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
    if precision.scaler is not None:
        precision.scaler.unscale_(w_optimizer)
    if rule.grad_clip > 0:
        nn.utils.clip_grad_norm_(weights, rule.grad_clip)
    if precision.scaler is not None:
        precision.scaler.step(w_optimizer)
        precision.scaler.update()
    else:
        w_optimizer.step()
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
