"""How the project's Triton ops are registered and launched, on the GPU and under the interpreter.

On the GPU an op is a torch.library.triton_op whose kernels go through wrap_triton, so torch.compile
traces into them. Under TRITON_INTERPRET=1 torch < 2.12's wrap_triton rejects interpreted kernels, and
they cannot be traced into a graph anyway: there the op is a plain custom op (compiled graphs call it)
and kernels are launched directly. One code path for every supported torch.

Kernels that take tuples of pointers (the grouped pointwise's K inputs) are the exception: torch.compile's Triton
tracing takes no tuple arguments (torch ≤ 2.14), so their ops are opaque custom ops everywhere
(`register(name, traceable=False)`) and launch their kernels directly.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Set by benchmarks/cost_model.py while it counts: called with a launch's arguments on fake tensors
# instead of launching (the kernels of our ops go through here, where torch cannot see them).
fake_launch_hook = None


def launch(kernel, grid, *args, **meta) -> None:
    """Launch `kernel` on `grid`; nothing on fake tensors under the interpreter, where the op's fake
    implementation may be its own body (see `register`)."""
    first = args[0][0] if isinstance(args[0], tuple) else args[0]  # a tuple of pointers: its first
    if fake_launch_hook is not None and torch._subclasses.fake_tensor.is_fake(first):
        fake_launch_hook(args)
        return
    if not INTERPRET and first is args[0]:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    elif not torch._subclasses.fake_tensor.is_fake(first):
        kernel[grid](*args, **meta)


def register(name: str, traceable: bool = True):
    """Decorator: `fn` (fully annotated: its schema is inferred, as torch < 2.12's triton_op ignores an
    explicit one) becomes the op `name`, with `fn` itself as its fake implementation (override with
    `op.register_fake`). `traceable=False`: an opaque custom op on the GPU too (kernels with tuple arguments)."""
    def dec(fn):
        if traceable and not INTERPRET:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)  # shapes only: launch() skips fake tensors
        return op
    return dec
