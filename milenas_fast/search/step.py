"""One search iteration: the α update, then the w update (SPEC §1). Written once: the eager loop, the
compiled model and the CUDA-graph body (graphed.py: these functions over static buffers) all run it.

milenas:      g_α = λ_valid·∇α L_val(w, α) + λ_train·∇α L_tr(w, α)   (both at the current w)
darts:        g_α = ∇α L_val(w, α)                                    (first-order DARTS)
single_level: g_α = ∇α L_tr(w, α)
darts_2nd:    g_α = the unrolled gradient of L_val after one virtual SGD step (unrolled.py)
then Adam on α, then SGD on w with ∇w L_tr(w, α_new) on the same training batch, the WEIGHTS clipped
(`authors_code`: the w pass also takes ∇α and α's gradient is clipped instead, as in the authors' code).
The α-only passes freeze the weights, so no weight gradients are computed there.

`--shared_train_pass` (`shared_train_pass=True`) takes ∇w L_tr and ∇α L_tr from ONE backward of the
training loss: two forward/backward passes instead of three (milenas). It changes the algorithm slightly —
w's gradient is taken at the pre-update α — while the α update is the same. Order: training pass (w and α
grads), validation pass (α only), α step, w step.

Under DDP `model` is distributed.DDP: `model(x)` (the weight pass) goes through its reducer, which
averages the weight gradients; the α-only passes call `model._loss`, the unwrapped network's, and their
gradient is averaged by `distributed_average` in `alpha_step`, the one place every variant goes through.

Nothing here synchronises with the host unless fp16 loss scaling is on (the finiteness checks), so the
same code is capturable in a CUDA graph. The divergence watch (milenas_fast.divergence) is folded here too,
once for every path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..divergence import FiniteWatch
from ..precision import Precision
from .params import frozen_weights, trainable
from .unrolled import unrolled_alpha_gradient


@dataclass(frozen=True)
class StepRule:
    optimization: str = "milenas"
    lambda_train: float = 1.0
    lambda_valid: float = 1.0
    grad_clip: float = 5.0
    authors_code: bool = False

    def alpha_terms(self) -> list[tuple[str, float]]:
        """Which α passes run, in the authors' order (train first), with their weights."""
        if self.optimization == "milenas":  # the authors' code never applies λ_valid
            return [("train", self.lambda_train), ("valid", 1.0 if self.authors_code else self.lambda_valid)]
        if self.optimization in ("darts", "darts_2nd"):  # darts_2nd: unrolled.py also reads the training batch
            return [("valid", 1.0)]
        if self.optimization == "single_level":
            return [("train", 1.0)]
        raise ValueError(f"unknown optimization {self.optimization!r}")

    def uses(self, which: str) -> bool:
        return any(w == which for w, _ in self.alpha_terms())

    def clipped(self, model) -> list[torch.Tensor]:
        """Whose gradient the weight step clips: the weights, or α in the authors' code (a bug: their weights
        are never clipped, and the next α step replaces α's clipped gradient)."""
        return model.arch_parameters() if self.authors_code else trainable(model)


def alpha_gradient(model, batches: dict, rule: StepRule, precision: Precision,
                   known: dict | None = None, w_optimizer=None) -> tuple[list[torch.Tensor], bool]:
    """The combined α gradient (not yet applied) and whether it is finite. `known` maps a pass already
    taken (the shared training pass) to its (gradient, finite); darts_2nd reads ξ, μ and the momentum buffers
    from `w_optimizer`."""
    if rule.optimization == "darts_2nd":
        return unrolled_alpha_gradient(model, batches, w_optimizer), True
    alphas = model.arch_parameters()
    total = [torch.zeros_like(a) for a in alphas]
    finite = True
    for which, weight in rule.alpha_terms():
        if known and which in known:
            grads, ok = known[which]
        else:
            x, y = batches[which]
            with frozen_weights(model), precision.autocast():
                loss = model._loss(x, y)
                grads, ok = precision.alpha_grads(loss, alphas)
        finite &= ok
        for t, g in zip(total, grads):
            t.add_(g, alpha=weight)
    return total, finite


def alpha_step(model, batches: dict, a_optimizer, rule: StepRule, precision: Precision,
               known: dict | None = None, w_optimizer=None) -> None:
    """Adam step on α with the rule's gradient; skipped when it is not finite (fp16 overflow, as GradScaler
    skips for w)."""
    grads, finite = alpha_gradient(model, batches, rule, precision, known, w_optimizer)
    grads, finite = distributed_average(grads, finite, precision)
    a_optimizer.zero_grad(set_to_none=True)
    if finite:
        for a, g in zip(model.arch_parameters(), grads):
            a.grad = g
        a_optimizer.step()


def distributed_average(grads, finite: bool, precision: Precision) -> tuple[list[torch.Tensor], bool]:
    """Under DDP: the mean of every rank's α gradient, one flat all-reduce (α are not DDP parameters, and
    autograd.grad bypasses its reducer), so every rank takes the same Adam step. A rank's fp16 overflow
    reaches every rank through the mean, so all skip together. One process: unchanged, no collective (the
    CUDA-graph body captures none)."""
    if distributed.world_size() <= 1:
        return grads, finite
    grads = distributed.average(grads)
    if precision.scaler is not None:
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
    return grads, finite


def train_pass(model, x, y, w_optimizer, precision: Precision, with_alpha: bool = False):
    """Forward and backward of the training loss into the weights' .grad (and α's .grad when `with_alpha`);
    returns (loss, logits) for the log."""
    w_optimizer.zero_grad(set_to_none=True)
    alphas = list(model.arch_parameters()) if with_alpha else []
    for a in alphas:
        a.grad = None
    with precision.autocast():
        logits = model(x)
    loss = model._criterion(logits.float(), y)
    torch.autograd.backward(precision.scale(loss), inputs=trainable(model) + alphas)
    return loss.detach(), logits.detach()


def take_alpha_grads(model, precision: Precision) -> tuple[list[torch.Tensor], bool]:
    """α's .grad left by a shared training pass, unscaled (fp16), and cleared."""
    alphas = model.arch_parameters()
    grads = [a.grad for a in alphas]
    for a in alphas:
        a.grad = None
    return precision.unscaled(grads)


def search_step(model, train_batch, valid_batch, w_optimizer, a_optimizer, rule: StepRule,
                precision: Precision, shared_train_pass: bool = False, watch: FiniteWatch | None = None):
    """One iteration: α step, then w step (see the module docstring); the training loss and the new α folded
    into `watch`. Returns (training loss, logits)."""
    batches = {"train": train_batch, "valid": valid_batch}
    if shared_train_pass:
        with_alpha = rule.uses("train")
        out = train_pass(model, *train_batch, w_optimizer, precision, with_alpha)
        known = {"train": take_alpha_grads(model, precision)} if with_alpha else None
        alpha_step(model, batches, a_optimizer, rule, precision, known, w_optimizer)
    else:
        alpha_step(model, batches, a_optimizer, rule, precision, w_optimizer=w_optimizer)
        out = train_pass(model, *train_batch, w_optimizer, precision, with_alpha=rule.authors_code)
    precision.step(w_optimizer, rule.clipped(model), rule.grad_clip)
    if watch is not None:
        watch.fold(out[0], model.arch_parameters())
    return out


def fused_search_step(model, train_batch, valid_batch, w_optimizer, a_optimizer, rule: StepRule,
                      precision: Precision):
    """`--shared_train_pass`: `search_step` with one shared training pass."""
    return search_step(model, train_batch, valid_batch, w_optimizer, a_optimizer, rule, precision, True)
