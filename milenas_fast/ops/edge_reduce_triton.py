"""Triton version of the C++/CUDA edge_reduce: the same semantics (output mask included), one op per direction.

    milenas_fast::edge_reduce_triton(ys, w, mean, rstd, acc=None) -> out
    milenas_fast::edge_reduce_triton_backward(grad_out, ys, w, mean, rstd, bool[] output_mask (4 entries), partials)
        -> (grad_y [K, N, C, H, W], grad_w, grad_mean, grad_rstd)     unselected outputs are None
        with `partials`: (part_gy [K, C, S], part_g [C, S], None, None), what the C++ edge_reduce_partials gives

It runs where the extension has no CUDA kernels (torch wheels ship no nvcc, so the JIT build is then
CPU-only); ops/backends.py decides. Both are registered by triton_launch (triton_ops on the GPU,
visible to torch.compile), with autograd attached to the forward. Importing it needs Triton.
"""
from __future__ import annotations

from collections import namedtuple

import torch

from milenas_fast.kernels import edge_reduce as K

from .edge_reduce_meta import (CANDIDATE_PTRS, MAX_CANDIDATES, backward_flops, backward_with, check, fake_backward,
                               fake_forward, forward_flops, partials_flops, setup_context)
from .costs import states_flops
from .tiles import plane_config
from .triton_launch import launch, pointers, register


# the kernels' run-time arguments, named (tests/test_stencil.py keeps them equal to the kernels' parameters)
FwdArgs = namedtuple("FwdArgs", [*CANDIDATE_PTRS, "w_ptr", "mean_ptr", "rstd_ptr", "acc_ptr", "out_ptr",
                                 "P", "C", "HW"])
BwdArgs = namedtuple("BwdArgs", ["g_ptr", *CANDIDATE_PTRS, "w_ptr", "mean_ptr", "rstd_ptr", "gy_ptr", "part_gy_ptr",
                                 "part_g_ptr", "P", "C", "HW"])


@register("milenas_fast::edge_reduce_triton")
def edge_reduce_triton(ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                       acc: torch.Tensor | None = None) -> torch.Tensor:
    check(ys, w, mean, rstd)
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
        bp, bhw, grid, warps = plane_config(n * c, h * wd)
        args = FwdArgs(*pointers(ys, MAX_CANDIDATES), w_ptr=w, mean_ptr=mean, rstd_ptr=rstd,
                       acc_ptr=out if acc is None else acc.contiguous(),  # without acc: never read
                       out_ptr=out, P=n * c, C=c, HW=h * wd)
        launch(K.edge_reduce_fwd_kernel, grid, *args, K=len(ys), HASACC=acc is not None, BLOCK_P=bp, BLOCK_HW=bhw,
               num_warps=warps)
    return out


@register("milenas_fast::edge_reduce_triton_backward")
def edge_reduce_triton_backward(grad_out: torch.Tensor, ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor,
                                rstd: torch.Tensor, output_mask: list[bool], partials: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unselected outputs are None (the schema cannot say Tensor?: undefined tensors, as the C++ op's). With
    `partials` (output_mask unused): the backward kernel's partial sums, unfinished (see the module docstring)."""
    check(ys, w, mean, rstd)
    y = ys[0]
    what = "edge_reduce_partials" if partials else "edge_reduce_backward"
    if grad_out.shape != y.shape or grad_out.dtype != y.dtype or grad_out.device != y.device:
        raise RuntimeError(f"{what}: grad_out must match ys[0] ({list(y.shape)}, {y.dtype}), "
                           f"got {list(grad_out.shape)}, {grad_out.dtype}")
    k, (n, c, h, wd) = len(ys), y.shape
    if partials:
        if not y.numel():
            tiles = plane_config(max(n, 1) * c, h * wd)[2][1]
            return w.new_zeros(k, c, tiles * n), w.new_zeros(c, tiles * n), None, None
        g, w, mean, rstd = (t.contiguous() for t in (grad_out, w, mean, rstd))
        return (*_partials(g, ys, w, mean, rstd, None, True), None, None)
    g, w, mean, rstd = (t.contiguous() for t in (grad_out, w, mean, rstd))
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
    bp, bhw, grid, warps = plane_config(n * c, h * wd)
    part_gy = w.new_empty(k, c, grid[1] * n) if sums else w
    part_g = w.new_empty(c, grid[1] * n) if sums else w
    args = BwdArgs(g, *pointers(ys, MAX_CANDIDATES), w_ptr=w, mean_ptr=mean, rstd_ptr=rstd,
                   gy_ptr=g if grad_y is None else grad_y,  # unused pointers alias a live tensor: never written
                   part_gy_ptr=part_gy, part_g_ptr=part_g, P=n * c, C=c, HW=h * wd)
    launch(K.edge_reduce_bwd_kernel, grid, *args, K=k, GY=grad_y is not None, SUMS=sums, BLOCK_P=bp, BLOCK_HW=bhw,
           num_warps=warps)
    return part_gy, part_g


def partials(grad_out, ys, w, mean, rstd) -> tuple[torch.Tensor, torch.Tensor]:
    """What the C++ edge_reduce_partials gives: part_gy [K, C, S], part_g [C, S] with S = pixel tiles × N."""
    part_gy, part_g, _, _ = edge_reduce_triton_backward(grad_out, ys, w, mean, rstd, [False] * 4, True)
    return part_gy, part_g


@edge_reduce_triton_backward.register_fake
def _fake_backward(grad_out, ys, w, mean, rstd, output_mask, partials):
    """The C++ op's fake where it is cheaper than the body (no checks, no partial-sum buffers)."""
    if partials:  # shapes from the tiling
        k, (n, c, h, wd) = len(ys), ys[0].shape
        s = plane_config(max(n, 1) * c, h * wd)[2][1] * n
        return w.new_empty(k, c, s), w.new_empty(c, s), None, None
    return fake_backward(grad_out, ys, w, mean, rstd, output_mask)


torch.library.register_autograd(
    "milenas_fast::edge_reduce_triton",
    backward_with(lambda *a: torch.ops.milenas_fast.edge_reduce_triton_backward(*a, False)),
    setup_context=setup_context)
edge_reduce_triton.register_fake(fake_forward)
states_flops("milenas_fast::edge_reduce_triton")(forward_flops)
states_flops("milenas_fast::edge_reduce_triton_backward")(
    lambda grad, ys, w, mean, rstd, mask, partials: (partials_flops if partials else backward_flops)(grad, ys))
