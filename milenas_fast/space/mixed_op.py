"""MixedOp(C, stride): the weighted sum of all candidate operations on one edge (drop-in for DARTS).

`self._ops` is an nn.ModuleList in PRIMITIVES order, pools wrapped with their BatchNorm, so DARTS-style
state_dicts (`_ops.<k>.…`) load unchanged. `none` is skipped: it contributes exact zeros and its mixing
weight receives a zero gradient from the sum, the same as multiplying by a zero tensor would give.

Two implementations of the same maths, chosen per call (milenas_fast.ops.select):
- reference: the candidate modules' own forwards, summed;
- fused: milenas_fast.ops.fused_mixed_op (Triton multi-stencil + one edge_reduce with BN folded in).
`MixedOp` follows $MILENAS_FAST_IMPL (auto|fused|reference, default auto); the subclasses
`ReferenceMixedOp` / `FusedMixedOp` pin one (what the search CLI's --impl builds). All three have the
same parameters, buffers and state_dict keys.
"""
from __future__ import annotations

import torch.nn as nn

from .primitives import PRIMITIVES, make_op


class MixedOp(nn.Module):
    impl: str | None = None  # None: $MILENAS_FAST_IMPL at every call

    def __init__(self, C: int, stride: int, primitives=PRIMITIVES, affine: bool = False):
        super().__init__()
        self.C, self.stride = C, stride
        self.primitives = tuple(primitives)
        self._ops = nn.ModuleList(make_op(p, C, stride, affine) for p in self.primitives)
        self._fused_unsupported: str | None = None  # computed on first use

    def forward(self, x, weights):
        if self._use_fused(x):
            from ..ops.fused_mixed_op import fused_forward

            return fused_forward(self, x, weights)
        return self.reference_forward(x, weights)

    def reference_forward(self, x, weights):
        out = None
        for w, name, op in zip(weights, self.primitives, self._ops):
            if name == "none":
                continue
            y = w * op(x)
            out = y if out is None else out + y
        if out is None:  # a primitive list of only `none`
            return self._ops[0](x)
        return out

    def _use_fused(self, x) -> bool:
        from ..ops import select

        req = select.requested_impl(self.impl)
        if req == "reference":
            return False
        decision = select.decide(req, x.device, x.dtype)
        if decision.impl == "fused":
            why_not = getattr(self, "_fused_unsupported", None)
            if why_not is None:
                from ..ops.fused_mixed_op import unsupported

                why_not = self._fused_unsupported = unsupported(self)
            if not why_not:
                return True
            decision = select.Decision(req, "reference", (f"this MixedOp: {why_not}",))
        if req == "fused":
            select.require_fused(decision)
        return False


class ReferenceMixedOp(MixedOp):
    """MixedOp pinned to the reference implementation."""

    impl = "reference"


class FusedMixedOp(MixedOp):
    """MixedOp pinned to the fused implementation (raises at the first forward where it cannot run)."""

    impl = "fused"
