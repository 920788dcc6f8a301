"""Second-order DARTS (`--optimization darts_2nd`): the unrolled architecture gradient, as DARTS defines it.

    w'  = w − ξ (μ·m + ∇w L_tr(w, α) + wd·w)       one virtual SGD step: ξ the current weight lr, μ SGD's
                                                   momentum, m its momentum buffer (zero before the first step)
    g_α = ∇α L_val(w', α) − ξ · (∇α L_tr(w⁺, α) − ∇α L_tr(w⁻, α)) / 2ε
    w±  = w ± ε·v,   v = ∇w' L_val(w', α),   ε = r / ‖v‖  (r = 0.01)

The quotient is the central finite difference of the Hessian-vector product ∇²_{α,w} L_tr(w, α)·v, so g_α
approximates the hypergradient d/dα L_val(w − ξ∇w L_tr(w, α), α) up to O(ε²).

All passes run on the model itself: its weights are overwritten by w', w⁺, w⁻ and restored from a copy (bit
exact; DARTS adds and subtracts ε·v, which drifts by rounding). BatchNorm running statistics keep the three
training-batch passes but not the validation pass at w' — DARTS evaluates w' on a throw-away copy.
ξ may be a 0-d tensor (the CUDA-graph step's lr) and ε is one: nothing here synchronises with the host, so the
function runs inside the captured iteration. The passes run in full precision even under --amp: the
perturbation ε·v (norm 0.01 over all weights) is far below bf16's resolution, so autocast would round w⁺ and
w⁻ to the same weights.
"""
from __future__ import annotations

import torch

from .. import distributed
from .params import frozen_weights, trainable

R = 0.01  # DARTS's r: ε = r / ‖v‖


def _loss(model, batch):
    x, y = batch
    return model._loss(x, y)


def virtual_step(params, grads, w_optimizer) -> list[torch.Tensor]:
    """ξ(μ·m + g + wd·w) per weight, from SGD's first param group and state."""
    group = w_optimizer.param_groups[0]
    step = torch._foreach_add(grads, [p.detach() for p in params], alpha=group["weight_decay"])
    if group["momentum"]:
        moving = [(s, w_optimizer.state[p]["momentum_buffer"]) for s, p in zip(step, params)
                  if w_optimizer.state.get(p, {}).get("momentum_buffer") is not None]
        if moving:
            torch._foreach_add_([s for s, _ in moving], [m for _, m in moving], alpha=group["momentum"])
    torch._foreach_mul_(step, group["lr"])
    return step


def alpha_grad_at(model, params, weights, batch) -> list[torch.Tensor]:
    """∇α L(weights, α) on `batch`, the model's weights set to `weights` (α-only backward)."""
    with torch.no_grad():
        torch._foreach_copy_(params, weights)
    with frozen_weights(model):
        return list(torch.autograd.grad(_loss(model, batch), model.arch_parameters()))


def unrolled_alpha_gradient(model, batches: dict, w_optimizer, r: float = R) -> list[torch.Tensor]:
    """g_α of the module docstring for batches {"train": (x, y), "valid": (x, y)}; the weights end as they began."""
    params, alphas = trainable(model), model.arch_parameters()
    w = [p.detach().clone() for p in params]
    try:
        # ∇w L_tr(w, α), weights only; under DDP the two weight-side gradients are the ranks' mean, so every
        # rank unrolls the same global-batch step (the α side is averaged after, by the step's all-reduce)
        grads = distributed.average(list(torch.autograd.grad(_loss(model, batches["train"]), params)))
        w_prime = torch._foreach_sub(w, virtual_step(params, grads, w_optimizer))
        with torch.no_grad():
            torch._foreach_copy_(params, w_prime)
        buffers = list(model.buffers())
        saved = [b.clone() for b in buffers]  # BatchNorm statistics: the pass at w' must leave none
        val = torch.autograd.grad(_loss(model, batches["valid"]), alphas + params)
        with torch.no_grad():
            torch._foreach_copy_(buffers, saved)
        d_alpha, v = val[:len(alphas)], distributed.average(list(val[len(alphas):]))
        eps = r / torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)))
        ev = torch._foreach_mul(v, eps)
        g_plus = alpha_grad_at(model, params, torch._foreach_add(w, ev), batches["train"])
        g_minus = alpha_grad_at(model, params, torch._foreach_sub(w, ev), batches["train"])
    finally:  # the weights end as they began, also when a pass fails
        with torch.no_grad():
            torch._foreach_copy_(params, w)
    coef = w_optimizer.param_groups[0]["lr"] / (2 * eps)
    return [d - coef * (gp - gm) for d, gp, gm in zip(d_alpha, g_plus, g_minus)]
