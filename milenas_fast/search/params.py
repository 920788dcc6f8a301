"""The parameters a step trains (those requiring grad: the weights; α is held outside `parameters()`), and
freezing them for an α-only pass."""
from __future__ import annotations

import contextlib

import torch


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def frozen_weights(model):
    """Weights marked as not requiring grad for an α-only pass: autograd then neither saves what weight
    gradients need nor computes them (same α gradient, less memory and time)."""
    params = trainable(model)
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
