"""The fused MixedOps' mixing weights: the part of softmax(α) their edge_reduce takes (`none` left out), with a
gradient that costs one launch per cell and pass, not one per edge.

No Triton here: the supernet's Cell calls `candidate_rows` whatever the MixedOp implementation.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class SliceLast(torch.autograd.Function):
    """w[..., start:stop], whose gradient is ONE cat with resident zeros (slicing's own backward launches a fill
    and a copy). `zeros` is [w.shape[-1]]; leading dimensions take an expanded view of it (no allocation)."""

    @staticmethod
    def forward(ctx, w, start, stop, zeros):
        z = zeros.expand(*w.shape[:-1], -1)
        ctx.pads = z[..., :start], z[..., :w.shape[-1] - stop]
        return w[..., start:stop]

    @staticmethod
    def backward(ctx, grad):
        return torch.cat([ctx.pads[0], grad, ctx.pads[1]], dim=-1), None, None, None


def order(primitives) -> list[int]:
    """The candidates the fused forward mixes: the module's (PRIMITIVES) order with `none` left out."""
    return [k for k, name in enumerate(primitives) if name != "none"]


def weight_index(primitives, device: torch.device) -> slice | torch.Tensor:
    """How the fused forward takes its candidates' mixing weights: a slice (one cat in backward) where `order`'s
    candidates are consecutive, as for the DARTS list (`none` first), else a gather index built once per
    placement (MixedOp._resolve), so no host-to-device copy happens per call."""
    ks = order(primitives)
    if ks == list(range(ks[0], ks[-1] + 1)):
        return slice(ks[0], ks[-1] + 1)
    return torch.tensor(ks, device=device)


def candidate_weights(weights: torch.Tensor, index: slice | torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """weights[..., index] in fp32: a view with a one-cat gradient for a slice, a gather otherwise."""
    w = weights.float()
    return SliceLast.apply(w, index.start, index.stop, zeros) if isinstance(index, slice) else w[..., index]


def candidate_rows(weights: torch.Tensor, ops: nn.ModuleList) -> tuple[torch.Tensor, ...] | None:
    """A cell's [edges, candidates] mixing weights taken for all its fused MixedOps at once, one row per edge
    (their gradient: one cat and the unbind's stack per cell and pass, where each edge taking its own costs a
    cat per edge); None unless every op is a fused MixedOp with the same slice."""
    index = getattr(ops[0], "_fused_index", None) if len(ops) else None
    if not isinstance(index, slice) or weights.shape[0] != len(ops):
        return None
    if not all(isinstance(getattr(op, "_fused_index", None), slice) and op._fused_index == index
               and op._weight_zeros.shape == ops[0]._weight_zeros.shape for op in ops):
        return None
    return candidate_weights(weights, index, ops[0]._weight_zeros).unbind(0)
