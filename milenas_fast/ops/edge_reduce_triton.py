"""Triton twin of the C++/CUDA edge_reduce: the same two ops, the same semantics (output mask included).

    milenas_fast::edge_reduce_triton(y, w, mean, rstd) -> out
    milenas_fast::edge_reduce_triton_backward(grad_out, y, w, mean, rstd, bool[] output_mask (4 entries))
        -> (grad_y, grad_w, grad_mean, grad_rstd)     unselected outputs are None

It runs where the extension has no CUDA kernels (torch wheels ship no nvcc, so the JIT build is then
CPU-only); milenas_fast.ops.select decides. Both are registered by triton_launch (triton_ops on the GPU,
visible to torch.compile), with autograd attached to the forward. Imported lazily: importing it needs Triton.
"""
from __future__ import annotations

import torch

from milenas_fast.kernels import edge_reduce as K

from .edge_reduce import _fake_backward, _fake_forward
from .triton_launch import INTERPRET, launch, register

# Largest tile (elements) of one program: 1024 = a 32×32 plane on 4 warps on the GPU; the interpreter
# pays per program, so there one program takes (nearly) everything. Tests lower it to force many programs.
MAX_TILE = 1 << 16 if INTERPRET else 1024


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(planes: int, pixels: int, max_tile: int | None = None) -> tuple[int, int, tuple[int, int], int]:
    """(BLOCK_P, BLOCK_HW, grid, num_warps) for `planes` planes of `pixels` pixels."""
    tile = MAX_TILE if max_tile is None else max_tile
    bhw = min(_pow2(pixels), tile)
    bp = max(1, min(_pow2(planes), tile // bhw))
    return bp, bhw, (-(-planes // bp), -(-pixels // bhw)), max(1, min(8, bp * bhw // 256))


def _check(y, w, mean, rstd):
    """The C++ op's input contract (csrc/edge_reduce.h), with its messages."""
    if y.dim() != 5:
        raise RuntimeError(f"edge_reduce: y must be [K, N, C, H, W], got {list(y.shape)}")
    if y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"edge_reduce: y must be float32, bfloat16 or float16, got {y.dtype}")
    k, c = y.shape[0], y.shape[2]
    if k < 1:
        raise RuntimeError("edge_reduce: need at least one candidate (K >= 1)")
    if w.dtype != torch.float32 or w.shape != (k,):
        raise RuntimeError(f"edge_reduce: w must be float32 [K={k}], got {w.dtype} {list(w.shape)}")
    for t in (mean, rstd):
        if t.dtype != torch.float32 or t.shape != (k, c):
            raise RuntimeError(f"edge_reduce: mean and rstd must be float32 [K={k}, C={c}], got {t.dtype} "
                               f"{list(t.shape)}")
    for t in (w, mean, rstd):
        if t.device != y.device:
            raise RuntimeError(f"edge_reduce: all inputs must be on {y.device}, got {t.device}")


@register("milenas_fast::edge_reduce_triton")
def edge_reduce_triton(y: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    _check(y, w, mean, rstd)
    y, w, mean, rstd = (t.contiguous() for t in (y, w, mean, rstd))
    k, n, c, h, wd = y.shape
    out = y.new_empty(y.shape[1:])
    if out.numel() >= 2**31:
        raise RuntimeError(f"edge_reduce: {out.numel()} output elements exceed the kernels' int32 indexing")
    if out.numel():
        bp, bhw, grid, warps = launch_config(n * c, h * wd)
        launch(K.edge_reduce_fwd_kernel, grid, y, w, mean, rstd, out, k, n * c, c, h * wd,
               BLOCK_P=bp, BLOCK_HW=bhw, num_warps=warps)
    return out


@register("milenas_fast::edge_reduce_triton_backward")
def edge_reduce_triton_backward(grad_out: torch.Tensor, y: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                                rstd: torch.Tensor, output_mask: list[bool]
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unselected outputs are None (the schema cannot say Tensor?: undefined tensors, as the C++ op's)."""
    _check(y, w, mean, rstd)
    if grad_out.shape != y.shape[1:] or grad_out.dtype != y.dtype or grad_out.device != y.device:
        raise RuntimeError(f"edge_reduce_backward: grad_out must match y[0] ({list(y.shape[1:])}, {y.dtype}), "
                           f"got {list(grad_out.shape)}, {grad_out.dtype}")
    g, y, w, mean, rstd = (t.contiguous() for t in (grad_out, y, w, mean, rstd))
    k, n, c, h, wd = y.shape
    want_y, sums = bool(output_mask[0]), any(output_mask[1:])
    grad_y = torch.empty_like(y) if want_y else None
    sgy = w.new_zeros(k, c)  # empty sums (N = 0) are zero
    sg = w.new_zeros(c)
    if y.numel() and (want_y or sums):
        bp, bhw, grid, warps = launch_config(n * c, h * wd)
        part_gy = w.new_empty(grid[1], k, n * c) if sums else w
        part_g = w.new_empty(grid[1], n * c) if sums else w
        launch(K.edge_reduce_bwd_kernel, grid, g, y, w, mean, rstd, grad_y if want_y else g, part_gy, part_g,
               k, n * c, c, h * wd, GY=want_y, SUMS=sums, BLOCK_P=bp, BLOCK_HW=bhw, num_warps=warps)
        if sums:  # second stage: ordered sums over pixel tiles, then the batch
            sgy = part_gy.sum(0).view(k, n, c).sum(1)
            sg = part_g.sum(0).view(n, c).sum(0)
    return (grad_y,
            (rstd * sgy).sum(1) if output_mask[1] else None,
            -w[:, None] * rstd * sg if output_mask[2] else None,
            w[:, None] * sgy if output_mask[3] else None)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    y, w, mean, rstd = ctx.saved_tensors
    return torch.ops.milenas_fast.edge_reduce_triton_backward(grad, y, w, mean, rstd, list(ctx.needs_input_grad))


torch.library.register_autograd("milenas_fast::edge_reduce_triton", _backward, setup_context=_setup_context)
# The C++ op's fakes: cheaper than the bodies (no checks, no partial-sum buffers) and the same for both ops.
edge_reduce_triton.register_fake(_fake_forward)
edge_reduce_triton_backward.register_fake(_fake_backward)
