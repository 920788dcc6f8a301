"""What each custom op costs, stated next to the op: its FLOPs as a function of its own arguments.

`benchmarks/cost_model.py` reads them (`flops(name, args)`, and `launches` of the C++ ops, whose kernels it cannot
see); the Triton kernels and their bytes it counts from the launches themselves (ops/triton_launch.py reports them
to a dispatch mode that asks), the C++ ops' bytes from their inputs and outputs. Filled when the ops' modules are
imported, as the ops are registered.
"""
from __future__ import annotations

from typing import Callable

FLOPS: dict[str, Callable[..., int]] = {}
LAUNCHES: dict[str, Callable[..., int]] = {}  # the C++ ops' (Triton launches are seen one by one)


def states_flops(name: str):
    """Decorator: `fn(*op_args) -> FLOPs` is op `name`'s FLOP count (2 per multiply-add)."""
    def dec(fn):
        FLOPS[name] = fn
        return fn
    return dec


def states_launches(name: str):
    """Decorator: `fn(*op_args) -> kernels` is how many kernels one call of C++ op `name` launches on CUDA."""
    def dec(fn):
        LAUNCHES[name] = fn
        return fn
    return dec


def launches(name: str, args, kwargs=None) -> int:
    """Kernels one call of C++ op `name` launches (1 for an op that states none)."""
    fn = LAUNCHES.get(name)
    return 1 if fn is None else fn(*args, **(kwargs or {}))


def flops(name: str, args, kwargs=None) -> int:
    """The FLOPs of one call of op `name` (0 for an op that states none)."""
    fn = FLOPS.get(name)
    return 0 if fn is None else fn(*args, **(kwargs or {}))
