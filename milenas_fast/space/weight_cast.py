"""The fused MixedOps' cuDNN 1×1 weights (the stride-2 skips', `conv_modules`) cast to the autocast dtype by ONE
foreach copy per network forward (the conv candidates' 1×1s run in the `pointwise` kernels, which take fp32).

Autocast casts a convolution's weight at every call, one launch per weight and pass in each direction.
`cast_weights(convs, device_type)` casts a MixedOp's conv weights at once (forward and backward: one foreach
copy each); while a `cast_once` is open (Network.forward opens one around its cells), every listed weight of the
whole supernet is cast once on entry and `cast_weights` hands out those tensors. The values are autocast's
(round to nearest), so results are bit-identical to per-call casts. No Triton here: the supernet imports it
whatever the MixedOp implementation.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .primitives import FactorizedReduce


class CastAll(torch.autograd.Function):
    """Tensors cast to `dtype` by ONE foreach copy, their gradients back by one (unused outputs: no gradient)."""

    @staticmethod
    def forward(ctx, dtype, *ts):
        ctx.dtypes = [t.dtype for t in ts]
        ctx.set_materialize_grads(False)
        out = [torch.empty_like(t, dtype=dtype) for t in ts]
        torch._foreach_copy_(out, list(ts))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        given = [k for k, g in enumerate(grads) if g is not None]
        out = [None] * len(grads)
        if given:
            dst = [torch.empty_like(grads[k], dtype=ctx.dtypes[k]) for k in given]
            torch._foreach_copy_(dst, [grads[k] for k in given])
            for k, d in zip(given, dst):
                out[k] = d
        return (None, *out)


def conv_modules(ops) -> list[nn.Conv2d]:
    """The 1×1 convolutions of a MixedOp's candidates that the fused path casts: the stride-2 skip's two halves
    (cuDNN convolutions). The conv candidates' 1×1 weights go to the `pointwise` kernels as they are (fp32,
    rounded to the inputs' dtype in registers, as autocast rounds them)."""
    return [c for op in ops if isinstance(op, FactorizedReduce) for c in (op.conv_1, op.conv_2)]


# Why a module-level value and not an argument: as running_stats' collector, open only inside one Network.forward,
# for MixedOps called as op(x, weights) (the DARTS drop-in signature cannot carry it).
class _Open:
    weights: dict | None = None  # id(conv) -> its cast weight, while a cast_once is open
    dtype: torch.dtype | None = None


_open = _Open()


def _cast(convs, device_type: str) -> dict:
    if not convs or not torch.is_autocast_enabled(device_type):
        return {}
    dtype = torch.get_autocast_dtype(device_type)
    if all(c.weight.dtype == dtype for c in convs):
        return {}
    return {id(c): w for c, w in zip(convs, CastAll.apply(dtype, *[c.weight for c in convs]))}


def cast_weights(convs, device_type: str) -> dict:
    """Under autocast: the convs' weights in the autocast dtype, by module id (from the open `cast_once` when it
    cast them all, else cast now at once); {} otherwise (the modules then run as they are)."""
    if (_open.weights and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == _open.dtype and all(id(c) in _open.weights for c in convs)):
        return {id(c): _open.weights[id(c)] for c in convs}
    return _cast(convs, device_type)


class cast_once:
    """Within it, `cast_weights` hands out the weights of `convs` cast on entry by one foreach copy (their
    gradients by one in backward). Nested: the outer one's stand. Compiled code (torch.compile) casts per
    MixedOp as before."""

    def __init__(self, convs, device_type: str):
        self.convs, self.device_type = convs, device_type

    def __enter__(self):
        self.outer = _open.weights is None and not torch.compiler.is_compiling()
        if self.outer:
            _open.weights = _cast(self.convs, self.device_type)
            _open.dtype = torch.get_autocast_dtype(self.device_type)
        return self

    def __exit__(self, *_):
        if self.outer:
            _open.weights = _open.dtype = None
        return False
