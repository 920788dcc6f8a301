"""The DARTS CNN search space: primitive names and the candidate operation modules (reference math).

Submodule structure and names follow DARTS (`op.<i>` inside each block) so that DARTS-style
state_dicts load unchanged. `affine=False` is the search setting; the evaluation network uses True.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Order matters: genotypes, α columns and checkpoints index into it.
PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
CONV_PRIMITIVES = frozenset(p for p in PRIMITIVES if p.startswith(("sep_conv", "dil_conv")))


class _DepthwiseCPU(torch.autograd.Function):
    """Depthwise conv with a per-tap weight gradient. PyTorch's own CPU depthwise weight gradient takes
    seconds at CIFAR sizes (≈300× slower), which would make CPU searches and tests crawl."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation)
        return F.conv2d(x, weight, None, stride, padding, dilation, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, [0, 0], x.shape[1],
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            # One reduction per filter tap: Σ_{n,h,w} g · x_padded[tap-shifted, strided] — cheap at k ≤ 5.
            (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
            kh, kw = weight.shape[-2:]
            Ho, Wo = grad.shape[-2:]
            xp = F.pad(x, (pw, pw, ph, ph))
            grad_w = torch.empty_like(weight)
            for i in range(kh):
                for j in range(kw):
                    tap = xp[:, :, i * dh: i * dh + (Ho - 1) * sh + 1: sh, j * dw: j * dw + (Wo - 1) * sw + 1: sw]
                    grad_w[:, 0, i, j] = (tap * grad).sum((0, 2, 3))
        return grad_x, grad_w, None, None, None


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d with groups = channels (same parameters and state_dict); fast CPU backward."""

    def __init__(self, C: int, kernel_size: int, stride: int, padding: int, dilation: int = 1):
        super().__init__(C, C, kernel_size, stride, padding, dilation=dilation, groups=C, bias=False)

    def forward(self, x):
        if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            return _DepthwiseCPU.apply(x, self.weight, self.stride, self.padding, self.dilation)
        return super().forward(x)


class ReLUConvBN(nn.Module):
    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)

    def from_relu(self, r):
        """forward(x) given r = ReLU(x) (the search supernet computes each cell state's ReLU once)."""
        return self.op[2](self.op[1](r))


class DilConv(nn.Module):
    """ReLU → depthwise k×k (dilated, strided) → pointwise 1×1 → BN."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel_size, stride, padding, dilation),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    # Named stages (the Sequential stays: its indices are the state_dict keys DARTS checkpoints use)
    dw = property(lambda self: self.op[1], doc="the depthwise convolution")
    pw = property(lambda self: self.op[2], doc="the 1×1 convolution")
    bn = property(lambda self: self.op[3], doc="the BatchNorm")

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    """Two stacked ReLU → depthwise → pointwise → BN blocks; only the first depthwise conv strides."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel_size, stride, padding),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel_size, 1, padding),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    # Named stages (the Sequential stays: its indices are the state_dict keys DARTS checkpoints use)
    dw1 = property(lambda self: self.op[1], doc="the first (strided) depthwise convolution")
    pw1 = property(lambda self: self.op[2], doc="the first 1×1 convolution")
    bn1 = property(lambda self: self.op[3], doc="the inner BatchNorm")
    dw2 = property(lambda self: self.op[5], doc="the second depthwise convolution")
    pw2 = property(lambda self: self.op[6], doc="the second 1×1 convolution")
    bn = property(lambda self: self.op[7], doc="the last BatchNorm")

    def forward(self, x):
        return self.op(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """ReLU, two 1×1 stride-2 convs (on x and on x shifted by one pixel), concatenated, then BN."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def pre_bn(self, x, w1=None, w2=None):
        """ReLU, both convolutions, concatenated (before the BN). w1/w2 stand in for the convs' weights (the
        fused MixedOp passes them cast once per call under autocast)."""
        return self._convs(self.relu(x), w1, w2)

    def from_relu(self, r):
        """forward(x) given r = ReLU(x) (the search supernet computes each cell state's ReLU once)."""
        return self.bn(self._convs(r))

    def _convs(self, x, w1=None, w2=None):
        modules = w1 is None and w2 is None  # the modules themselves: their hooks fire (FLOP counters use them)
        if x.shape[-2] % 2 or x.shape[-1] % 2:  # odd: shifted, padded on the bottom/right to the same shape
            shifted, stride = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1)), 2
        elif modules:  # even: the stride-2 conv of the shifted input never reads the padding
            shifted, stride = x[:, :, 1:, 1:].contiguous(), 2
        else:  # even, stand-in weights: only the pixels that conv reads, a quarter of x, copied once
            shifted, stride = x[:, :, 1::2, 1::2].contiguous(), 1
        if modules:
            return torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1)
        w1 = self.conv_1.weight if w1 is None else w1
        w2 = self.conv_2.weight if w2 is None else w2
        return torch.cat([F.conv2d(x, w1, stride=2), F.conv2d(shifted, w2, stride=stride)], dim=1)

    def forward(self, x):
        return self.bn(self.pre_bn(x))


def _pool(kind: str, C: int, stride: int, affine: bool, with_bn: bool) -> nn.Module:
    if kind == "max":
        pool = nn.MaxPool2d(3, stride=stride, padding=1)
    else:
        pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    if not with_bn:
        return pool
    return nn.Sequential(pool, nn.BatchNorm2d(C, affine=affine))


def make_op(name: str, C: int, stride: int, affine: bool, search: bool = True) -> nn.Module:
    """One candidate operation. `search=True` wraps pools with their BatchNorm (DARTS MixedOp layout)."""
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return _pool("max", C, stride, affine, with_bn=search)
    if name == "avg_pool_3x3":
        return _pool("avg", C, stride, affine, with_bn=search)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)
    if name == "sep_conv_3x3":
        return SepConv(C, C, 3, stride, 1, affine=affine)
    if name == "sep_conv_5x5":
        return SepConv(C, C, 5, stride, 2, affine=affine)
    if name == "dil_conv_3x3":
        return DilConv(C, C, 3, stride, 2, 2, affine=affine)
    if name == "dil_conv_5x5":
        return DilConv(C, C, 5, stride, 4, 2, affine=affine)
    raise ValueError(f"unknown primitive {name!r}; known: {', '.join(PRIMITIVES)}")
