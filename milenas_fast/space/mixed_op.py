"""MixedOp(C, stride): the weighted sum of all candidate operations on one edge (drop-in for DARTS).

`self._ops` is an nn.ModuleList in PRIMITIVES order, pools wrapped with their BatchNorm, so DARTS-style
state_dicts (`_ops.<k>.…`) load unchanged. `none` is skipped: it contributes exact zeros and its mixing
weight receives a zero gradient from the sum, the same as multiplying by a zero tensor would give.

Two implementations of the same maths (milenas_fast.ops.select decides which):
- reference: the candidate modules' own forwards, summed;
- fused: milenas_fast.space.fused_mixed_op (Triton multi-stencil + one edge_reduce with BN folded in).
`MixedOp` follows $MILENAS_FAST_IMPL (auto|fused|reference, default auto); the subclasses
`ReferenceMixedOp` / `FusedMixedOp` pin one (what the search CLI's --impl builds); `set_impl(model, impl)`
re-pins every MixedOp of a model (`kernels=`: with those kernels, ops/backends.py). All have the same parameters,
buffers and state_dict keys.

The choice is resolved when the module is built and again whenever it is moved (`.to`, `.cuda`, …), never
per call: forward stays free of environment reads, locks and caches, so torch.compile traces it whole.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from ..ops import select
from ..ops.backends import Kernels
from .primitives import PRIMITIVES, make_op


class MixedOp(nn.Module):
    impl: str | None = None  # None: $MILENAS_FAST_IMPL (read when the module is built or moved)
    kernels_pin: Kernels | None = None  # None: the device's kernels (`set_impl(..., kernels=...)` pins others)

    def __init__(self, C: int, stride: int, primitives=PRIMITIVES, affine: bool = False):
        super().__init__()
        self.C, self.stride = C, stride
        self.primitives = tuple(primitives)
        self._ops = nn.ModuleList(make_op(p, C, stride, affine) for p in self.primitives)
        self._resolve()

    def _resolve(self) -> None:
        """Decide fused or reference for the device the module now lives on (dtype is checked per call)."""
        t = next(itertools.chain(self.parameters(), self.buffers()), None)
        device = t.device if t is not None else torch.device("cpu")
        decision = select.decide(self.impl, device)
        self._fused_index = None  # the fused path's mixing weights: a slice (a view) or an index on `device`
        if decision.impl == "fused":
            from . import fused_mixed_op, mixing_weights

            why_not = fused_mixed_op.unsupported(self)
            if why_not:
                decision = select.Decision(decision.requested, "reference", (f"this MixedOp: {why_not}",))
            else:
                self._fused_index = mixing_weights.weight_index(self.primitives, device)
                self._identity_stats = fused_mixed_op.identity_stats(self.C, device)
                self._weight_zeros = torch.zeros(len(self.primitives), device=device)
        pin = self.kernels_pin
        # the fused path's kernels, handed to every op it calls (None: the reference runs)
        self.kernels = None if self._fused_index is None else (
            pin if pin is not None and pin.device == device.type else Kernels.for_device(device.type))
        self.decision = decision

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._resolve()
        return out

    def forward(self, x, weights, *, mixing=None, acc=None):
        """Optional, for callers that sum many edges (the supernet's Cell): `mixing`, weights[self._fused_index]
        already taken (only the fused path reads it); `acc`, a tensor the output is added to (the fused path adds
        it in its last kernel: no separate add)."""
        if self._fused_index is not None and x.dtype in select.FUSED_DTYPES:
            from .fused_mixed_op import fused_forward

            return fused_forward(self, x, weights, mixing, acc)
        if self.decision.requested == "fused":  # explicit and impossible: never a silent fallback
            d = self.decision
            if d.ok:
                d = select.Decision(d.requested, "reference", (f"dtype {x.dtype} (fused supports float32, "
                                                               "bfloat16, float16)",))
            select.require_fused(d)
        out = self.reference_forward(x, weights)
        return out if acc is None else acc + out

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


class ReferenceMixedOp(MixedOp):
    """MixedOp pinned to the reference implementation."""

    impl = "reference"


class FusedMixedOp(MixedOp):
    """MixedOp pinned to the fused implementation (raises at the first forward where it cannot run)."""

    impl = "fused"


def set_impl(model: nn.Module, impl: str, kernels: Kernels | None = None) -> int:
    """Pin every MixedOp in `model` (itself included) to `impl` ("fused" | "reference" | "auto") and, with
    `kernels`, to those kernels (where they are for the module's device; else the device's), and re-resolve it;
    returns how many. An impossible "fused" raises FusedUnavailable at the next forward."""
    impl = select.requested_impl(impl)
    n = 0
    for m in model.modules():
        if isinstance(m, MixedOp):
            m.impl, m.kernels_pin = impl, kernels
            m._resolve()
            n += 1
    return n
