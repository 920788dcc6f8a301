"""How the project's Triton ops are registered and launched, on the GPU and under the interpreter.

On the GPU an op is a torch.library.triton_op whose kernels go through wrap_triton, so torch.compile
traces into them. Under TRITON_INTERPRET=1 torch < 2.12's wrap_triton rejects interpreted kernels, and
they cannot be traced into a graph anyway: there the op is a plain custom op (compiled graphs call it)
and kernels are launched directly. One code path for every supported torch.

Kernels that take tuples of pointers (the grouped pointwise's K inputs) are the exception: torch.compile's Triton
tracing takes no tuple arguments (torch ≤ 2.14), so their ops are opaque custom ops everywhere
(`register(name, traceable=False)`) and launch their kernels directly.

On fake tensors nothing launches; a TorchDispatchMode with a `record_triton_launch(args)` method (the cost model's,
benchmarks/cost_model.py) is told of each launch instead: our kernels are invisible to torch's dispatcher.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .tiles import INTERPRET

__all__ = ["INTERPRET", "launch", "pointers", "register"]


def launch(kernel, grid, *args, **meta) -> None:
    """Launch `kernel` on `grid`; nothing on fake tensors (see the module docstring), where the op's fake
    implementation may be its own body (see `register`)."""
    first = args[0][0] if isinstance(args[0], tuple) else args[0]  # a tuple of pointers: its first
    fake = torch._subclasses.fake_tensor.is_fake(first)
    if fake:
        recorders = [m for m in _get_current_dispatch_mode_stack() if hasattr(m, "record_triton_launch")]
        if recorders:
            recorders[-1].record_triton_launch(args)
            return
    if not INTERPRET and first is args[0]:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    elif not fake:
        kernel[grid](*args, **meta)


def pointers(ts: list[torch.Tensor], slots: int) -> list[torch.Tensor]:
    """A kernel's `slots` pointer arguments (one per candidate): ts (contiguous), the unused slots aliased to ts[0]
    (never read)."""
    ts = [t.contiguous() for t in ts]
    return ts + [ts[0]] * (slots - len(ts))


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
