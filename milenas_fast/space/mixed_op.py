"""MixedOp(C, stride): the weighted sum of all candidate operations on one edge (drop-in for DARTS).

`self._ops` is an nn.ModuleList in PRIMITIVES order, pools wrapped with their BatchNorm, so DARTS-style
state_dicts (`_ops.<k>.…`) load unchanged. `none` is skipped: it contributes exact zeros and its mixing
weight receives a zero gradient from the sum, the same as multiplying by a zero tensor would give.
"""
from __future__ import annotations

import torch.nn as nn

from .primitives import PRIMITIVES, make_op


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, primitives=PRIMITIVES, affine: bool = False):
        super().__init__()
        self.C, self.stride = C, stride
        self.primitives = tuple(primitives)
        self._ops = nn.ModuleList(make_op(p, C, stride, affine) for p in self.primitives)

    def forward(self, x, weights):
        out = None
        for w, name, op in zip(weights, self.primitives, self._ops):
            if name == "none":
                continue
            y = w * op(x)
            out = y if out is None else out + y
        if out is None:  # a primitive list of only `none`
            return self._ops[0](x)
        return out
