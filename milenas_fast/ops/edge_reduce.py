"""Edge-wise reduction with non-affine BatchNorm folded in (PERF.md "What to fuse" §5).

out[n,c,h,w] = acc[n,c,h,w] + Σ_k w[k] · (ys[k][n,c,h,w] − mean[k,c]) · rstd[k,c]

ys is a list of K ≤ 8 candidates [N, C, H, W] (one dtype and device), read where they are: no stack. acc is
optional (ys[0]'s shape and dtype): a node's running sum, added in fp32 (one rounding, no separate add launch).

`edge_reduce` runs the C++/CUDA op (differentiable in all four inputs, traceable by torch.compile), or its
Triton edge_reduce (edge_reduce_triton.py) where the extension has no kernels for the device: `kernels.edge_reduce`
(ops/backends.py) says which; `edge_reduce_reference` is the plain-PyTorch twin used as the oracle and wherever
neither can run.
"""
from __future__ import annotations

import torch

from .backends import Kernels
from .edge_reduce_meta import MAX_CANDIDATES  # noqa: F401  (the contract's bound, for callers)


def edge_reduce_reference(ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """Same maths in PyTorch: computed in at least fp32 (fp64 stays fp64), returned in the candidates' dtype."""
    y = torch.stack(list(ys))
    k, _, c = y.shape[:3]
    dt = torch.promote_types(y.dtype, torch.float32)
    scale = (rstd.to(dt) * w.to(dt)[:, None]).view(k, 1, c, 1, 1)
    out = ((y.to(dt) - mean.to(dt).view(k, 1, c, 1, 1)) * scale).sum(0)
    return (out if acc is None else acc.to(dt) + out).to(y.dtype)


def _impl(ys, kernels: Kernels | None) -> str:
    """"cpp" or "triton" (`kernels`, or the device's default), else RuntimeError."""
    return (kernels or Kernels.for_device(ys[0].device.type)).require()


def edge_reduce(ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                acc: torch.Tensor | None = None, *, kernels: Kernels | None = None) -> torch.Tensor:
    """The fast op. ys: K ≤ 8 candidates [N,C,H,W] (fp32/bf16/fp16, one dtype), w: [K] fp32, mean/rstd: [K,C]
    fp32, acc: None or ys[0]'s like (added) -> [N,C,H,W]. `kernels`: which implementation (default: the device's).
    Raises RuntimeError when neither the extension nor the Triton edge_reduce can run (choose the reference)."""
    if _impl(ys, kernels) == "triton":
        from . import edge_reduce_triton  # needs Triton: imported only where it runs

        return edge_reduce_triton.edge_reduce_triton(ys, w, mean, rstd, acc)
    return _cpp(ys, w, mean, rstd, acc)


def _cpp(ys, w, mean, rstd, acc=None):
    return torch.ops.milenas_fast.edge_reduce(ys, w, mean, rstd, acc)


def edge_reduce_backward(grad: torch.Tensor, ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor,
                         rstd: torch.Tensor, output_mask: list[bool], *, kernels: Kernels | None = None):
    """The backward op of `kernels`' implementation: (grad_y [K,N,C,H,W], grad_w, grad_mean, grad_rstd), None where
    output_mask is False."""
    if _impl(ys, kernels) == "triton":
        from . import edge_reduce_triton

        return edge_reduce_triton.edge_reduce_triton_backward(grad, ys, w, mean, rstd, output_mask, False)
    return torch.ops.milenas_fast.edge_reduce_backward(grad, ys, w, mean, rstd, output_mask)


def edge_reduce_partials(grad: torch.Tensor, ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor,
                         rstd: torch.Tensor, *, kernels: Kernels | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's two reductions as partial sums, from `kernels`' implementation: part_gy [K, C, S] of
    grad·(ys[k] − mean[k]) and part_g [C, S] of grad, over S slices of (n, h, w); finished by their consumer
    (bn_fold_grad_partials)."""
    if _impl(ys, kernels) == "triton":
        from . import edge_reduce_triton

        return edge_reduce_triton.partials(grad, ys, w, mean, rstd)
    return torch.ops.milenas_fast.edge_reduce_partials(grad, ys, w, mean, rstd)


def edge_reduce_partials_reference(grad, ys, w, mean, rstd):
    """Plain-PyTorch twin of `edge_reduce_partials` (S = 1, in at least fp32)."""
    y = torch.stack(list(ys))
    dt = torch.promote_types(y.dtype, torch.float32)
    g = grad.to(dt)
    sgy = (g[None] * (y.to(dt) - mean.to(dt)[:, None, :, None, None])).sum(dim=(1, 3, 4))
    return sgy[..., None], g.sum(dim=(0, 2, 3))[:, None]
