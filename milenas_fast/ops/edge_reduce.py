"""Edge-wise reduction with non-affine BatchNorm folded in (PERF.md "What to fuse" §5).

out[n,c,h,w] = acc[n,c,h,w] + Σ_k w[k] · (ys[k][n,c,h,w] − mean[k,c]) · rstd[k,c]

ys is a list of K ≤ 8 candidates [N, C, H, W] (one dtype and device), read where they are: no stack. acc is
optional (ys[0]'s shape and dtype): a node's running sum, added in fp32 (one rounding, no separate add launch).

`edge_reduce` runs the C++/CUDA op (differentiable in all four inputs, traceable by torch.compile), or its
Triton twin (edge_reduce_triton.py) where the extension has no kernels for the device — the choice is
milenas_fast.ops.select.edge_reduce_impl's, made once per device type and cached in `IMPL`;
`edge_reduce_reference` is the plain-PyTorch twin used as the oracle and wherever neither can run.
"""
from __future__ import annotations

import threading

import torch

from . import extension

_lock = threading.Lock()
_registered = False
IMPL: dict[str, tuple[str, str]] = {}  # device type -> ("cpp" | "triton" | "", why), filled by select
MAX_CANDIDATES = 8  # csrc/edge_reduce.h's kMaxCandidates: the kernels take one pointer per candidate


def edge_reduce_reference(ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """Same maths in PyTorch: computed in at least fp32 (fp64 stays fp64), returned in the candidates' dtype."""
    y = torch.stack(list(ys))
    k, _, c = y.shape[:3]
    dt = torch.promote_types(y.dtype, torch.float32)
    scale = (rstd.to(dt) * w.to(dt)[:, None]).view(k, 1, c, 1, 1)
    out = ((y.to(dt) - mean.to(dt).view(k, 1, c, 1, 1)) * scale).sum(0)
    return (out if acc is None else acc.to(dt) + out).to(y.dtype)


def _setup_context(ctx, inputs, output):
    ys, w, mean, rstd = inputs[:4]
    ctx.k = len(ys)
    ctx.save_for_backward(*ys, w, mean, rstd)


def _backward_with(op):
    """The autograd backward of an edge_reduce forward whose backward op is `op`: ONE grad_y buffer
    [K, N, C, H, W], handed out as per-candidate views."""
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        ys, (w, mean, rstd) = list(saved[:ctx.k]), saved[ctx.k:]
        flags = ctx.needs_input_grad  # (one flag per candidate, w, mean, rstd[, acc when it was passed])
        need_ys, need = flags[0], flags[1:4]
        # Only what autograd asks for: α-only passes skip nothing here, but frozen BN statistics or a fixed w do.
        gy, *rest = op(grad, ys, w, mean, rstd, [any(need_ys), *need])
        gys = [None] * ctx.k if gy is None else [g if n else None for g, n in zip(gy.unbind(0), need_ys)]
        if len(flags) > 4:  # acc's gradient is the output's: no launch
            return (gys, *rest, grad if flags[4] else None)
        return (gys, *rest)
    return backward


_backward = _backward_with(lambda *a: torch.ops.milenas_fast.edge_reduce_backward(*a))


def _fake_forward(ys, w, mean, rstd, acc=None):
    return ys[0].new_empty(ys[0].shape)


def _fake_backward(grad_out, ys, w, mean, rstd, output_mask):
    k, c = len(ys), ys[0].shape[1]
    return (
        ys[0].new_empty((k, *ys[0].shape)) if output_mask[0] else None,
        w.new_empty((k,)) if output_mask[1] else None,
        w.new_empty((k, c)) if output_mask[2] else None,
        w.new_empty((k, c)) if output_mask[3] else None,
    )


def cuda_splits(n: int, k: int, c: int) -> int:
    """S of the CUDA partial sums (csrc/cuda/edge_reduce.cu's `splits`: from the shape alone)."""
    want = max(1, min(n, -(-2048 // (k * c))))
    nps = -(-n // want)
    return -(-n // nps)


def _fake_partials(grad_out, ys, w, mean, rstd):
    k, (n, c) = len(ys), ys[0].shape[:2]
    s = 1 if ys[0].device.type == "cpu" else cuda_splits(max(n, 1), k, c)
    return w.new_empty((k, c, s)), w.new_empty((c, s))


def register() -> None:
    """Load the extension (RuntimeError if impossible) and attach autograd and fake kernels, once."""
    global _registered
    with _lock:
        if _registered:
            return
        extension.require()
        torch.library.register_fake("milenas_fast::edge_reduce", _fake_forward)
        torch.library.register_fake("milenas_fast::edge_reduce_backward", _fake_backward)
        torch.library.register_fake("milenas_fast::edge_reduce_partials", _fake_partials)
        torch.library.register_autograd("milenas_fast::edge_reduce", _backward, setup_context=_setup_context)
        _registered = True


def edge_reduce(ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                acc: torch.Tensor | None = None) -> torch.Tensor:
    """The fast op. ys: K ≤ 8 candidates [N,C,H,W] (fp32/bf16/fp16, one dtype), w: [K] fp32, mean/rstd: [K,C]
    fp32, acc: None or ys[0]'s like (added) -> [N,C,H,W]. Raises RuntimeError when neither the extension nor the
    Triton twin can run (choose the reference)."""
    if _impl(ys[0].device.type) == "triton":
        from .edge_reduce_triton import edge_reduce_triton  # registers the op (needs Triton: imported late)

        return edge_reduce_triton(ys, w, mean, rstd, acc)
    return _cpp(ys, w, mean, rstd, acc)


def _cpp(ys, w, mean, rstd, acc=None):
    return torch.ops.milenas_fast.edge_reduce(ys, w, mean, rstd, acc)


def edge_reduce_backward(grad: torch.Tensor, ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor,
                         rstd: torch.Tensor, output_mask: list[bool]):
    """The backward op of whichever implementation `edge_reduce` runs: (grad_y [K,N,C,H,W], grad_w, grad_mean,
    grad_rstd), None where output_mask is False."""
    if _impl(ys[0].device.type) == "triton":
        from . import edge_reduce_triton  # noqa: F401  (registers the op)

        return torch.ops.milenas_fast.edge_reduce_triton_backward(grad, ys, w, mean, rstd, output_mask)
    return torch.ops.milenas_fast.edge_reduce_backward(grad, ys, w, mean, rstd, output_mask)


def edge_reduce_partials(grad: torch.Tensor, ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor,
                         rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's two reductions as partial sums, from whichever implementation `edge_reduce` runs:
    part_gy [K, C, S] of grad·(ys[k] − mean[k]) and part_g [C, S] of grad, over S slices of (n, h, w); finished
    by their consumer (bn_fold_grad_partials)."""
    if _impl(ys[0].device.type) == "triton":
        from . import edge_reduce_triton  # noqa: F401  (registers the op)

        return torch.ops.milenas_fast.edge_reduce_triton_partials(grad, ys, w, mean, rstd)
    return torch.ops.milenas_fast.edge_reduce_partials(grad, ys, w, mean, rstd)


def edge_reduce_partials_reference(grad, ys, w, mean, rstd):
    """Plain-PyTorch twin of `edge_reduce_partials` (S = 1, in at least fp32)."""
    y = torch.stack(list(ys))
    dt = torch.promote_types(y.dtype, torch.float32)
    g = grad.to(dt)
    sgy = (g[None] * (y.to(dt) - mean.to(dt)[:, None, :, None, None])).sum(dim=(1, 3, 4))
    return sgy[..., None], g.sum(dim=(0, 2, 3))[:, None]


def _impl(device_type: str) -> str:
    """"cpp" (registered) or "triton" for `device_type`, else RuntimeError."""
    impl = IMPL.get(device_type)
    if impl is None:  # first call on this device type outside a fused-path decision
        from .select import edge_reduce_impl

        impl = edge_reduce_impl(device_type)
    if impl[0] == "cpp" and not _registered:
        register()
    if impl[0] not in ("cpp", "triton"):
        raise RuntimeError(f"milenas_fast: edge_reduce cannot run on {device_type}: {impl[1]}")
    return impl[0]
