"""Triton twin of the C++/CUDA edge_reduce: the same two ops, the same semantics (output mask included).

    milenas_fast::edge_reduce_triton(ys, w, mean, rstd, acc=None) -> out
    milenas_fast::edge_reduce_triton_backward(grad_out, ys, w, mean, rstd, bool[] output_mask (4 entries))
        -> (grad_y [K, N, C, H, W], grad_w, grad_mean, grad_rstd)     unselected outputs are None

It runs where the extension has no CUDA kernels (torch wheels ship no nvcc, so the JIT build is then
CPU-only); milenas_fast.ops.select decides. Both are registered by triton_launch (triton_ops on the GPU,
visible to torch.compile), with autograd attached to the forward. Imported lazily: importing it needs Triton.
"""
from __future__ import annotations

import torch

from milenas_fast.kernels import edge_reduce as K

from .edge_reduce import MAX_CANDIDATES, _backward_with, _fake_backward, _fake_forward, _setup_context
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


def check_candidates(ys, most: int = MAX_CANDIDATES) -> None:
    """The C++ op's contract on the candidates (csrc/edge_reduce.h), with its messages (`most`: bn_stats takes
    a fused cell's group of edges)."""
    k = len(ys)
    if not 1 <= k <= most:
        raise RuntimeError(f"edge_reduce: need 1 to {most} candidates, got {k}")
    y = ys[0]
    if y.dim() != 4:
        raise RuntimeError(f"edge_reduce: each candidate must be [N, C, H, W], got {list(y.shape)}")
    if y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"edge_reduce: candidates must be float32, bfloat16 or float16, got {y.dtype}")
    for i, t in enumerate(ys[1:], 1):
        if t.shape != y.shape or t.dtype != y.dtype or t.device != y.device:
            raise RuntimeError(f"edge_reduce: ys[{i}] must match ys[0] ({list(y.shape)}, {y.dtype}, {y.device}), "
                               f"got {list(t.shape)}, {t.dtype}, {t.device}")


def _check(ys, w, mean, rstd):
    """The C++ op's input contract (csrc/edge_reduce.h), with its messages."""
    check_candidates(ys)
    k, c, y = len(ys), ys[0].shape[1], ys[0]
    if w.dtype != torch.float32 or w.shape != (k,):
        raise RuntimeError(f"edge_reduce: w must be float32 [K={k}], got {w.dtype} {list(w.shape)}")
    for t in (mean, rstd):
        if t.dtype != torch.float32 or t.shape != (k, c):
            raise RuntimeError(f"edge_reduce: mean and rstd must be float32 [K={k}, C={c}], got {t.dtype} "
                               f"{list(t.shape)}")
    for t in (w, mean, rstd):
        if t.device != y.device:
            raise RuntimeError(f"edge_reduce: all inputs must be on {y.device}, got {t.device}")


def pointers(ys: list[torch.Tensor], slots: int = MAX_CANDIDATES) -> list[torch.Tensor]:
    """A kernel's `slots` (eight for the candidates) pointer arguments: ys (contiguous), the unused slots aliased
    to ys[0]."""
    ys = [y.contiguous() for y in ys]
    return ys + [ys[0]] * (slots - len(ys))


@register("milenas_fast::edge_reduce_triton")
def edge_reduce_triton(ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                       acc: torch.Tensor | None = None) -> torch.Tensor:
    _check(ys, w, mean, rstd)
    y = ys[0]
    if acc is not None and (acc.shape != y.shape or acc.dtype != y.dtype or acc.device != y.device):
        raise RuntimeError(f"edge_reduce: acc must match ys[0] ({list(y.shape)}, {y.dtype}, {y.device}), got "
                           f"{list(acc.shape)}, {acc.dtype}, {acc.device}")
    w, mean, rstd = (t.contiguous() for t in (w, mean, rstd))
    n, c, h, wd = ys[0].shape
    out = ys[0].new_empty(ys[0].shape)
    if out.numel() >= 2**31:
        raise RuntimeError(f"edge_reduce: {out.numel()} output elements exceed the kernels' int32 indexing")
    if out.numel():
        bp, bhw, grid, warps = launch_config(n * c, h * wd)
        launch(K.edge_reduce_fwd_kernel, grid, *pointers(ys), w, mean, rstd,
               out if acc is None else acc.contiguous(), out, n * c, c, h * wd,
               K=len(ys), HASACC=acc is not None, BLOCK_P=bp, BLOCK_HW=bhw, num_warps=warps)
    return out


@register("milenas_fast::edge_reduce_triton_backward")
def edge_reduce_triton_backward(grad_out: torch.Tensor, ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor,
                                rstd: torch.Tensor, output_mask: list[bool]
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unselected outputs are None (the schema cannot say Tensor?: undefined tensors, as the C++ op's)."""
    _check(ys, w, mean, rstd)
    y = ys[0]
    if grad_out.shape != y.shape or grad_out.dtype != y.dtype or grad_out.device != y.device:
        raise RuntimeError(f"edge_reduce_backward: grad_out must match ys[0] ({list(y.shape)}, {y.dtype}), "
                           f"got {list(grad_out.shape)}, {grad_out.dtype}")
    g, w, mean, rstd = (t.contiguous() for t in (grad_out, w, mean, rstd))
    k, (n, c, h, wd) = len(ys), y.shape
    want_y, sums = bool(output_mask[0]), any(output_mask[1:])
    grad_y = y.new_empty(k, n, c, h, wd) if want_y else None
    sgy = w.new_zeros(k, c)  # empty sums (N = 0) are zero
    sg = w.new_zeros(c)
    if y.numel() and (want_y or sums):
        part_gy, part_g = _partials(g, ys, w, mean, rstd, grad_y if want_y else None, sums)
        if sums:  # second stage: ordered sums over the slices
            sgy, sg = part_gy.sum(2), part_g.sum(1)
    return (grad_y,
            (rstd * sgy).sum(1) if output_mask[1] else None,
            -w[:, None] * rstd * sg if output_mask[2] else None,
            w[:, None] * sgy if output_mask[3] else None)


def _partials(g, ys, w, mean, rstd, grad_y, sums: bool):
    """The backward kernel: grad_y (when given) and, with `sums`, the partials [K, C, S] and [C, S]."""
    k, (n, c, h, wd) = len(ys), ys[0].shape
    bp, bhw, grid, warps = launch_config(n * c, h * wd)
    part_gy = w.new_empty(k, c, grid[1] * n) if sums else w
    part_g = w.new_empty(c, grid[1] * n) if sums else w
    launch(K.edge_reduce_bwd_kernel, grid, g, *pointers(ys), w, mean, rstd, g if grad_y is None else grad_y,
           part_gy, part_g, n * c, c, h * wd, K=k, GY=grad_y is not None, SUMS=sums, BLOCK_P=bp, BLOCK_HW=bhw,
           num_warps=warps)
    return part_gy, part_g


@register("milenas_fast::edge_reduce_triton_partials")
def edge_reduce_triton_partials(grad_out: torch.Tensor, ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor,
                                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ edge_reduce_partials' twin: part_gy [K, C, S], part_g [C, S] with S = pixel tiles × N."""
    _check(ys, w, mean, rstd)
    y = ys[0]
    if grad_out.shape != y.shape or grad_out.dtype != y.dtype or grad_out.device != y.device:
        raise RuntimeError(f"edge_reduce_partials: grad_out must match ys[0] ({list(y.shape)}, {y.dtype}), "
                           f"got {list(grad_out.shape)}, {grad_out.dtype}")
    k, (n, c, h, wd) = len(ys), y.shape
    if not y.numel():
        tiles = launch_config(max(n, 1) * c, h * wd)[2][1]
        return w.new_zeros(k, c, tiles * n), w.new_zeros(c, tiles * n)
    g, w, mean, rstd = (t.contiguous() for t in (grad_out, w, mean, rstd))
    return _partials(g, ys, w, mean, rstd, None, True)


torch.library.register_autograd("milenas_fast::edge_reduce_triton",
                                _backward_with(lambda *a: torch.ops.milenas_fast.edge_reduce_triton_backward(*a)),
                                setup_context=_setup_context)
# The C++ op's fakes: cheaper than the bodies (no checks, no partial-sum buffers) and the same for both ops.
edge_reduce_triton.register_fake(_fake_forward)
edge_reduce_triton_backward.register_fake(_fake_backward)
