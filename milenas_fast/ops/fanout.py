"""One tensor handed to several consumers, their gradients summed by ONE edge_reduce launch (w 1, mean 0, rstd 1:
a plain sum in fp32, one rounding), where autograd would add them pairwise: one add per extra consumer.

The supernet's Cell fans each state out to the MixedOps that read it. No Triton here (edge_reduce loads it lazily).
"""
from __future__ import annotations

import torch

from .backends import Kernels
from .edge_reduce import edge_reduce
from .edge_reduce_meta import MAX_CANDIDATES


class _Fanout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, ones, zeros, kernels):
        ctx.ones, ctx.zeros, ctx.kernels = ones, zeros, kernels
        ctx.set_materialize_grads(False)  # unused views: no gradient, no zeros
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        gs = [g for g in grads if g is not None]
        if len(gs) <= 1:
            return (gs[0] if gs else None), None, None, None, None
        if any(g.dtype != gs[0].dtype or not g.is_contiguous() for g in gs):  # would cost copies: autograd's adds
            return sum(gs[1:], gs[0]), None, None, None, None
        k = len(gs)
        # w: k ones from the flat buffer (its first row has only C: too few where a cell has more nodes than channels)
        return (edge_reduce(gs, ctx.ones.view(-1)[:k], ctx.zeros[:k], ctx.ones[:k], kernels=ctx.kernels), None, None,
                None, None)


def fanout(x: torch.Tensor, n: int, ones: torch.Tensor, zeros: torch.Tensor, *, kernels: Kernels | None = None
           ) -> tuple[torch.Tensor, ...]:
    """n views of x whose gradients are summed in one launch. `ones`/`zeros`: resident fp32 [≥ n, x.shape[1]]
    constants on x's device (the caller's buffers: nothing is allocated per call). Falls back to x itself n times
    (autograd's adds) where the constants do not fit or autograd is off. `kernels`: edge_reduce's (default: the
    device's)."""
    ok = (2 <= n <= MAX_CANDIDATES and torch.is_grad_enabled() and x.requires_grad and x.dim() == 4
          and ones.dtype == zeros.dtype == torch.float32 and ones.device == x.device
          and ones.shape[0] >= n and ones.shape[1] == x.shape[1] and not torch.compiler.is_compiling())
    return _Fanout.apply(x, n, ones, zeros, kernels) if ok else (x,) * n
