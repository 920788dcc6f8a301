"""The multi-stencil op: six mixed-op candidates' first stages from one read of the edge input.

    y3, y5, yd3, yd5, ymax, yavg = stencil(x, w3, w5, wd3, wd5, stride)

y3/y5/yd3/yd5: ReLU → depthwise (3×3 pad 1, 5×5 pad 2, 3×3 dil 2 pad 2, 5×5 dil 2 pad 4; stride s);
ymax/yavg: 3×3 max / avg pool (stride s, pad 1, count_include_pad=False) of the raw input.
Filters are [C, 1, k, k]. Outputs have x's dtype (fp32 accumulation); filter gradients the filters'.

Registered ops (torch.library.triton_op, visible to torch.compile):
    milenas_fast::stencil_fwd(x, w3, w5, wd3, wd5, stride) -> 6 tensors
    milenas_fast::stencil_bwd_input(x, w3, w5, wd3, wd5, ymax, g3, g5, gd3, gd5, gmax, gavg, stride) -> dx
    milenas_fast::stencil_bwd_weight(x, g3, g5, gd3, gd5, stride) -> (dw3, dw5, dwd3, dwd5)
The two backward halves are separate ops so that α-only passes (no filter gradients wanted) and
frozen inputs skip the work they do not need. `stencil_reference` is the plain-PyTorch twin.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F

from milenas_fast.kernels import stencil as K

from .triton_launch import launch as _launch, register as _register

# Largest tile (elements) of one program. On the GPU 1024 covers a whole 32×32 plane with 4 warps;
# the interpreter pays per program, so there one program takes (nearly) everything.
# $MILENAS_FAST_MAX_TILE (or `max_tile(n)`) forces smaller tiles: tests use it to run many programs in
# both grid dimensions under the interpreter, as the GPU does.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU_MAX_TILE = 1024
_MAX_TILE_ENV = "MILENAS_FAST_MAX_TILE"


def _tile_limit(value) -> int:
    n = int(value)
    if n < 4 or n & (n - 1):
        raise ValueError(f"{_MAX_TILE_ENV}={value!r}: must be a power of two >= 4")
    return n


MAX_TILE = _tile_limit(os.environ.get(_MAX_TILE_ENV, 1 << 16 if _INTERPRET else GPU_MAX_TILE))


@contextlib.contextmanager
def max_tile(n: int):
    """Launch with tiles of at most `n` elements inside the block (torch.compile bakes it in at trace)."""
    global MAX_TILE
    saved, MAX_TILE = MAX_TILE, _tile_limit(n)
    try:
        yield
    finally:
        MAX_TILE = saved


def out_size(n: int, stride: int) -> int:
    return (n - 1) // stride + 1  # the same for all six branches (each "same"-padded)


def launch_config(kernel: str, shape, stride: int, tile: int | None = None):
    """(BLOCK_P, BLOCK_HW, grid, num_warps) the launcher uses for `kernel` ("fwd", "bwd_input",
    "bwd_weight") on an NCHW input of `shape`; `tile` defaults to the current limit."""
    N, C, H, W = shape
    pixels = H * W if kernel == "bwd_input" else out_size(H, stride) * out_size(W, stride)
    return _blocks(N * C, pixels, MAX_TILE if tile is None else tile)


def _blocks(planes: int, pixels: int, tile: int):
    hw = min(triton_next_pow2(pixels), tile)
    # Several planes per program cost registers (per-plane filter vectors, 2-D indices): such programs take
    # half a tile at 2 elements per thread, others 4 (the forward keeps six fp32 accumulators and many
    # in-flight loads per element). ptxas for sm_90 (tests/test_sm90.py): no spills this way (the fp32
    # whole-plane forward uses all 255 registers); packed programs at 4 elements per thread spilled.
    p = max(1, min(triton_next_pow2(planes), tile // 2 // hw))
    per_thread = 4 if p == 1 else 2
    return p, hw, (triton_cdiv(planes, p), triton_cdiv(pixels, hw)), max(1, min(8, p * hw // (32 * per_thread)))


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(x, ws):
    assert x.dim() == 4 and x.is_contiguous(), "x must be NCHW contiguous"
    C = x.shape[1]
    for w, k in zip(ws, (3, 5, 3, 5)):
        assert w.shape == (C, 1, k, k) and w.is_contiguous(), f"filter must be [{C}, 1, {k}, {k}] contiguous"


@_register("milenas_fast::stencil_fwd")
def stencil_fwd(x: torch.Tensor, w3: torch.Tensor, w5: torch.Tensor, wd3: torch.Tensor, wd5: torch.Tensor,
                stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, (w3, w5, wd3, wd5))
    N, C, H, W = x.shape
    HO, WO = out_size(H, stride), out_size(W, stride)
    ys = [x.new_empty(N, C, HO, WO) for _ in range(6)]
    bp, bhw, grid, warps = launch_config("fwd", x.shape, stride)
    _launch(
        K.stencil_fwd_kernel, grid, x, w3, w5, wd3, wd5, *ys, N * C, C, H, W, HO, WO,
        STRIDE=stride, BLOCK_P=bp, BLOCK_HW=bhw, num_warps=warps)
    return tuple(ys)


@_register("milenas_fast::stencil_bwd_input")
def stencil_bwd_input(x: torch.Tensor, w3: torch.Tensor, w5: torch.Tensor, wd3: torch.Tensor, wd5: torch.Tensor,
                      ymax: torch.Tensor, g3: Optional[torch.Tensor], g5: Optional[torch.Tensor],
                      gd3: Optional[torch.Tensor], gd5: Optional[torch.Tensor], gmax: Optional[torch.Tensor],
                      gavg: Optional[torch.Tensor], stride: int) -> torch.Tensor:
    N, C, H, W = x.shape
    gs = [g.contiguous() if g is not None else None for g in (g3, g5, gd3, gd5, gmax, gavg)]
    dx = torch.empty_like(x)
    bp, bhw, grid, warps = launch_config("bwd_input", x.shape, stride)
    _launch(
        K.stencil_bwd_input_kernel, grid, x, w3, w5, wd3, wd5, ymax.contiguous(), *[g if g is not None else x for g in gs], dx,
        N * C, C, H, W, out_size(H, stride), out_size(W, stride),
        *[g is not None for g in gs],
        STRIDE=stride, BLOCK_P=bp, BLOCK_HW=bhw, num_warps=warps)
    return dx


@_register("milenas_fast::stencil_bwd_weight")
def stencil_bwd_weight(x: torch.Tensor, g3: Optional[torch.Tensor], g5: Optional[torch.Tensor],
                       gd3: Optional[torch.Tensor], gd5: Optional[torch.Tensor],
                       stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 filter gradients (the caller casts to the filters' dtype)."""
    N, C, H, W = x.shape
    HO, WO = out_size(H, stride), out_size(W, stride)
    gs = [g.contiguous() if g is not None else None for g in (g3, g5, gd3, gd5)]
    bp, bhw, grid, warps = launch_config("bwd_weight", x.shape, stride)
    # Zeroed so that absent branches (never stored) reduce to exact zeros.
    part = x.new_zeros(grid[1], N, C, K.TAPS, dtype=torch.float32)
    _launch(
        K.stencil_bwd_weight_kernel, grid, x, *[g if g is not None else x for g in gs], part, N * C, H, W, HO, WO,
        *[g is not None for g in gs],
        STRIDE=stride, BLOCK_P=bp, BLOCK_HW=bhw, num_warps=warps)
    # Deterministic second stage: an ordered sum over pixel tiles and the batch, in fp32.
    dw = part.sum(dim=(0, 1))
    bounds = (0, K.OFF5, K.OFFD3, K.OFFD5, K.TAPS)
    return tuple(dw[:, bounds[i]:bounds[i + 1]].reshape(C, 1, k, k).clone() for i, k in enumerate((3, 5, 3, 5)))


def _setup_context(ctx, inputs, output):
    x, w3, w5, wd3, wd5, stride = inputs
    ctx.save_for_backward(x, w3, w5, wd3, wd5, output[4])  # ymax locates the argmax in backward
    ctx.stride = stride


def _backward(ctx, g3, g5, gd3, gd5, gmax, gavg):
    x, w3, w5, wd3, wd5, ymax = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w = any(ctx.needs_input_grad[1:5])
    dx = dws = None
    if need_x:
        dx = torch.ops.milenas_fast.stencil_bwd_input(x, w3, w5, wd3, wd5, ymax, g3, g5, gd3, gd5, gmax, gavg,
                                                      ctx.stride)
    if need_w:
        dws = torch.ops.milenas_fast.stencil_bwd_weight(x, g3, g5, gd3, gd5, ctx.stride)
        dws = [d.to(w.dtype) for d, w in zip(dws, (w3, w5, wd3, wd5))]
    return (dx, *(dws if dws is not None else (None,) * 4), None)


torch.library.register_autograd("milenas_fast::stencil_fwd", _backward, setup_context=_setup_context)


def stencil(x: torch.Tensor, w3: torch.Tensor, w5: torch.Tensor, wd3: torch.Tensor, wd5: torch.Tensor,
            stride: int):
    """The differentiable Triton op (gradients flow to x and all four filters)."""
    return torch.ops.milenas_fast.stencil_fwd(x.contiguous(), w3.contiguous(), w5.contiguous(),
                                              wd3.contiguous(), wd5.contiguous(), stride)


def stencil_reference(x: torch.Tensor, w3: torch.Tensor, w5: torch.Tensor, wd3: torch.Tensor, wd5: torch.Tensor,
                      stride: int):
    """Plain-PyTorch twin of `stencil` (same six outputs, same autograd semantics)."""
    C = x.shape[1]
    r = F.relu(x)

    def dw(w, pad, dil):
        return F.conv2d(r, w.to(x.dtype), stride=stride, padding=pad, dilation=dil, groups=C)

    return (dw(w3, 1, 1), dw(w5, 2, 1), dw(wd3, 2, 2), dw(wd5, 4, 2),
            F.max_pool2d(x, 3, stride, 1), F.avg_pool2d(x, 3, stride, 1, count_include_pad=False))
