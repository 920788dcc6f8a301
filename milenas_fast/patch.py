"""Adopt milenas_fast's MixedOp in DARTS-family code (quark0/darts, MiLeNAS, SDARTS-style model_search.py).

patch_module(module): before the network is built, `module.MixedOp` becomes ours, so the codebase's cells
build ours. replace_mixed_ops(model): in an already-built network, every instance of the codebase's MixedOp
is swapped in place for ours, which takes over the very same parameter and buffer tensors (state_dict and
optimisers built earlier stay valid).

Both first check that the codebase's MixedOp is DARTS's: the same candidates in PRIMITIVES order, with the
same parameter names and shapes and the same kind and settings (kernel, stride, padding, dilation, groups,
BatchNorm affine/eps/momentum) of every layer. A different op list (another order, a missing or extra op, a
candidate built differently) raises PatchError naming the first difference, before anything is replaced.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .space.mixed_op import MixedOp
from .space.primitives import PRIMITIVES


class PatchError(ValueError):
    """The codebase's MixedOp is not the DARTS one milenas_fast's replaces."""


_SETTINGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
             "num_features", "affine", "eps", "momentum", "count_include_pad", "ceil_mode")


def _layers(op: nn.Module) -> list[tuple]:
    """(name, kind, settings) of every leaf module; kind is the torch.nn class it is (our DepthwiseConv2d is
    a Conv2d), or the class name for the codebase's own parameter-free leaves (Zero, Identity)."""
    out = []
    for name, m in op.named_modules():
        if next(m.children(), None) is not None:
            continue
        kind = next((c.__name__ for c in type(m).__mro__
                     if c.__module__.startswith("torch.nn.modules.") and c is not nn.Module), type(m).__name__)
        settings = tuple((s, _pair(getattr(m, s))) for s in _SETTINGS if hasattr(m, s))
        out.append((name, kind, settings))
    return out


def _pair(v):
    return (v, v) if isinstance(v, int) and not isinstance(v, bool) else v


def _describe(op: nn.Module) -> dict[str, list]:
    """Per top-level candidate index (or other submodule name): its layers and its tensors' names and shapes."""
    out: dict[str, list] = {}
    for name, kind, settings in _layers(op):
        out.setdefault(_top(name), []).append((name, kind, settings))
    for name, t in op.state_dict().items():
        out.setdefault(_top(name), []).append((name, tuple(t.shape)))
    return out


def _top(name: str) -> str:
    """'_ops.4.op.1.weight' -> '_ops.4'; names outside _ops keep their first part."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "_ops" else parts[0]


def check_compatible(theirs: nn.Module, ours: nn.Module, where: str) -> None:
    """PatchError naming the first difference between the two MixedOps' candidates; None when alike."""
    a, b = _describe(theirs), _describe(ours)
    if a == b:
        return
    n_theirs = sum(1 for k in a if k.startswith("_ops."))
    if n_theirs != len(PRIMITIVES):
        raise PatchError(f"{where}: {n_theirs} candidates, milenas_fast's MixedOp has {len(PRIMITIVES)} "
                         f"({', '.join(PRIMITIVES)}); only DARTS's op list can be replaced")
    for key in sorted(set(a) | set(b), key=lambda k: (not k.startswith("_ops."), len(k), k)):
        if a.get(key) != b.get(key):
            if key.startswith("_ops."):
                k = int(key.split(".")[1])
                what = f"candidate {k} ({PRIMITIVES[k]} in PRIMITIVES order)"
            else:
                what = f"submodule {key!r}"
            diff = next((x, y) for x, y in zip(a.get(key, []) + [None], b.get(key, []) + [None]) if x != y)
            raise PatchError(f"{where}: {what} differs from milenas_fast's: {diff[0]} against ours {diff[1]}; "
                             "only DARTS's op list (milenas_fast.PRIMITIVES, same order) can be replaced")


def patch_module(module, mixed_op: type = MixedOp):
    """Set `module.MixedOp = mixed_op` (MixedOp or HardSampledMixedOp) after checking the module's own
    MixedOp(C, stride) against it at both strides. Returns the class replaced (None if already ours)."""
    old = getattr(module, "MixedOp", None)
    if not isinstance(old, type):
        raise PatchError(f"{module.__name__} has no MixedOp class to replace")
    if issubclass(old, MixedOp):
        return None
    names = getattr(module, "PRIMITIVES", None)
    if names is not None and tuple(names) != PRIMITIVES:
        raise PatchError(f"{module.__name__}.PRIMITIVES is {list(names)}; milenas_fast's MixedOp computes "
                         f"{list(PRIMITIVES)} (same order); only that op list can be replaced")
    for stride in (1, 2):
        try:
            theirs = old(4, stride)
        except TypeError as e:
            raise PatchError(f"{module.__name__}.MixedOp(C, stride) cannot be built ({e}); only the DARTS "
                             "constructor MixedOp(C, stride) can be replaced") from None
        check_compatible(theirs, mixed_op(4, stride), f"{module.__name__}.MixedOp(4, {stride})")
    module.MixedOp = mixed_op
    return old


def _shape(op: nn.Module) -> tuple[int, int]:
    """(C, stride) of a DARTS MixedOp: C from its first BatchNorm, stride 2 if any layer strides by 2."""
    bn = next((m for m in op.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if bn is None:
        raise PatchError(f"{type(op).__name__} has no BatchNorm: not a DARTS MixedOp")
    strided = any(_pair(getattr(m, "stride", 1)) == (2, 2) for m in op.modules())
    return bn.num_features, 2 if strided else 1


def replace_mixed_ops(model: nn.Module, mixed_op: type = MixedOp, old: type | None = None) -> dict[str, nn.Module]:
    """Swap, in place, every instance of `old` (default: any module whose class is named MixedOp and is not
    ours) in `model` for `mixed_op(C, stride)` holding the same parameter and buffer tensors, in the same
    training mode. All are checked before any is replaced. Returns {qualified name: replaced module}."""
    def wanted(m):
        return isinstance(m, old) if old is not None else type(m).__name__ == "MixedOp" and not isinstance(m, MixedOp)

    found = {name: m for name, m in model.named_modules() if wanted(m)}
    new = {}
    for name, theirs in found.items():
        C, stride = _shape(theirs)
        with torch.device("meta"):  # no initialisation: every tensor is taken over from theirs
            ours = mixed_op(C, stride)
        check_compatible(theirs, ours, f"{name} ({type(theirs).__name__})")
        new[name] = ours
    for name, ours in new.items():
        theirs = found[name]
        for pname, p in theirs.named_parameters():
            owner, _, leaf = pname.rpartition(".")
            setattr(ours.get_submodule(owner), leaf, p)
        for bname, b in theirs.named_buffers():
            owner, _, leaf = bname.rpartition(".")
            ours.get_submodule(owner).register_buffer(leaf, b)
        device = next(iter(ours.state_dict().values())).device  # _shape found a BatchNorm: there are tensors
        ours.to(device).train(theirs.training)  # .to re-decides the implementation for that device
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, ours)
    return found
