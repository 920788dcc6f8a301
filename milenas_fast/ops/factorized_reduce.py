"""The stride-2 skip (FactorizedReduce) before its BatchNorm, for the fused MixedOp: the module's maths with a
written-out backward.

Autograd through `cat(conv_1(r), conv_2(r[:, :, 1::2, 1::2]))` launches, per backward, two slice backwards for the
shifted input (a fill and a copy each) and an add joining its gradient to conv_1's; here the shifted half's input
gradient is added into conv_1's in place, at its strided positions: one launch. Even input sizes only (the
search's); odd ones take the module's own path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_aten = torch.ops.aten


class _Halves(torch.autograd.Function):
    """cat(conv(r, w1, stride 2), conv(r[:, :, 1::2, 1::2], w2)) for even H, W."""

    @staticmethod
    def forward(ctx, r, w1, w2):
        shifted = r[:, :, 1::2, 1::2].contiguous()  # only the pixels conv_2 reads, a quarter of r
        ctx.save_for_backward(r, shifted, w1, w2)
        return torch.cat([F.conv2d(r, w1, stride=2), F.conv2d(shifted, w2)], dim=1)

    @staticmethod
    def backward(ctx, g):
        r, shifted, w1, w2 = ctx.saved_tensors
        need_r, need_w1, need_w2 = ctx.needs_input_grad
        half = w1.shape[0]
        dr, dw1, _ = _aten.convolution_backward(g[:, :half], r, w1, None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1,
                                                [need_r, need_w1, False])
        ds, dw2, _ = _aten.convolution_backward(g[:, half:], shifted, w2, None, [1, 1], [0, 0], [1, 1], False,
                                                [0, 0], 1, [need_r, need_w2, False])
        if need_r:
            dr[:, :, 1::2, 1::2].add_(ds)  # (`+=` on an index would copy the view back onto itself)
        return dr, dw1, dw2


def pre_bn(op, x: torch.Tensor, w1: torch.Tensor | None = None, w2: torch.Tensor | None = None) -> torch.Tensor:
    """op.pre_bn(x, w1, w2) of a FactorizedReduce `op` (w1/w2: its convolutions' weights cast once per forward, or
    None for the modules' own), with the written-out backward where x's size is even."""
    if x.shape[-2] % 2 or x.shape[-1] % 2 or torch.compiler.is_compiling():
        return op.pre_bn(x, w1, w2)
    w1 = op.conv_1.weight if w1 is None else w1
    w2 = op.conv_2.weight if w2 is None else w2
    r = op.relu(x)
    if torch.is_autocast_enabled(x.device.type):  # the weights as autocast would hand them to the convolutions
        dtype = torch.get_autocast_dtype(x.device.type)
        r, w1, w2 = r.to(dtype), w1.to(dtype), w2.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _Halves.apply(r, w1, w2)
