"""Grouped pointwise op: K ≤ 32 independent 1×1 convolutions (no bias, stride 1) in one launch each way.

    ys = pointwise(xs, ws)     xs: K inputs [N, C, H, W] (one shape and dtype), ws: K weights [CO, C, 1, 1]

ys[k] = conv2d(xs[k], ws[k]) in xs' dtype (fp32 accumulation; fp32 inputs use TF32 where cuDNN would:
torch.backends.cudnn.allow_tf32). A mixed op's conv candidates (in a fused Cell, those of all the edges leaving
the same states: space/fused_mixed_op.py) run their 1×1 stages side by side: one launch instead of K in the forward,
one for all input gradients and two (partials, their ordered sum) for all weight gradients. `pointwise_reference` is the plain-PyTorch twin.

Registered ops (opaque custom ops: torch.compile calls them; its Triton tracing takes no tuple arguments):
    milenas_fast::pointwise(xs, ws, stats) -> ys (+ [per-tile statistics of the outputs in the bitmask `stats`])
    milenas_fast::pointwise_input_grad(gs, ws) -> dxs          (the forward's kernel, ws transposed)
    milenas_fast::pointwise_wgrad(xs, gs) -> dw [K, CO, C] fp32
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from milenas_fast.kernels import pointwise as K

from .costs import states_flops
from .tiles import INTERPRET, cdiv, pointwise_blocks
from .triton_launch import launch, register

MAX_K = 32  # a DARTS cell's first stages leaving s0 and s1: 8 edges × 4 conv candidates
def stats_tile(y: torch.Tensor) -> int:
    """The pixels per tile of `pointwise`'s statistics for an output like y (a C→C convolution)."""
    return pointwise_blocks(y.shape[1], y.shape[1], y.shape[2] * y.shape[3])[2]


def stats_warps(stats: int) -> int:
    """Warps of a forward launch: 8 with statistics (Triton 3.6's ptxas spilled at 4 once K > 4), else 4."""
    return 8 if stats else 4


def _tuple(ts) -> tuple[torch.Tensor, ...]:
    """The kernels' pointer tuple (one entry per convolution)."""
    return tuple(t.contiguous() for t in ts)


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not INTERPRET else "ieee"


def _check(xs, ws) -> None:
    if not 1 <= len(xs) <= MAX_K or len(ws) != len(xs):
        raise ValueError(f"pointwise: 1 to {MAX_K} inputs with one weight each, got {len(xs)} and {len(ws)}")
    x = xs[0]
    for t in xs:
        if t.shape != x.shape or t.dtype != x.dtype or t.dim() != 4:
            raise ValueError("pointwise: inputs must be [N, C, H, W] of one shape and dtype")
    for w in ws:
        if w.shape != ws[0].shape or w.dim() != 4 or w.shape[1] != x.shape[1] or w.shape[2:] != (1, 1):
            raise ValueError(f"pointwise: weights must be [CO, {x.shape[1]}, 1, 1] of one shape")
        if w.dtype != ws[0].dtype:
            raise ValueError("pointwise: weights of one dtype")


def _apply(xs, ws, transposed: bool, stats: int = 0) -> list[torch.Tensor]:
    n, b, h, wd = xs[0].shape
    co, ci = ws[0].shape[:2]
    a = ci if transposed else co
    ys = [xs[0].new_empty(n, a, h, wd) for _ in xs]
    ba, bb, bp = pointwise_blocks(a, b, h * wd)
    tiles = cdiv(h * wd, bp)
    st = xs[0].new_empty(len(xs), n * tiles, 2, a, dtype=torch.float32) if stats else None
    sa, sb = (1, ci) if transposed else (ci, 1)
    launch(K.pointwise_kernel, (len(xs), n, tiles), _tuple(xs), _tuple(ws), tuple(ys), ys[0] if st is None else st,
           a, b, h * wd, sa, sb, K=len(xs), BLOCK_A=ba, BLOCK_B=bb, BLOCK_P=bp, PRECISION=_precision(xs[0].dtype),
           UPCAST=INTERPRET, STATS=stats, num_warps=stats_warps(stats))
    return ys if st is None else ys + [st]


@register("milenas_fast::pointwise", traceable=False)
def pointwise_op(xs: list[torch.Tensor], ws: list[torch.Tensor], stats: int) -> list[torch.Tensor]:
    """ys; with the bitmask `stats` (0: none) also, last, the per-tile statistics [K, N·T, 2, CO] fp32 of the
    outputs it names (kernels/pointwise.py: tile means and squared deviations, for a BatchNorm that follows)."""
    _check(xs, ws)
    if not 0 <= stats < 1 << len(xs):
        raise ValueError(f"pointwise: stats bitmask {stats:#x} must name some of the {len(xs)} outputs")
    return _apply(xs, ws, transposed=False, stats=stats)


@register("milenas_fast::pointwise_input_grad", traceable=False)
def pointwise_input_grad(gs: list[torch.Tensor], ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs' gradients: each g_k [N, CO, H, W] through W_kᵀ."""
    return _apply(gs, ws, transposed=True)


@register("milenas_fast::pointwise_wgrad", traceable=False)
def pointwise_wgrad(xs: list[torch.Tensor], gs: list[torch.Tensor]) -> torch.Tensor:
    """fp32 weight gradients [K, CO, C] (g_k [N, CO, H, W], x_k [N, C, H, W])."""
    n, b, h, wd = xs[0].shape
    a = gs[0].shape[1]
    ba, bb, bp = pointwise_blocks(a, b, h * wd)
    tiles = cdiv(h * wd, bp)
    part = xs[0].new_empty(len(xs), n * tiles, a, b, dtype=torch.float32)
    launch(K.pointwise_wgrad_kernel, (len(xs), n, tiles), _tuple(xs), _tuple(gs), part, a, b, h * wd, tiles,
           K=len(xs), BLOCK_A=ba, BLOCK_B=bb, BLOCK_P=bp, PRECISION=_precision(xs[0].dtype), UPCAST=INTERPRET,
           num_warps=4)
    return part.sum(dim=1)  # deterministic: an ordered sum over (image, tile)


def _flops(dim: int):
    """2·N·HW·CO·C per convolution: forward (x, w [CO, C]): w's dim 0; the gradients' (g or x, w or g): dim 1."""
    return lambda xs, ws, *_: sum(2 * a.numel() * b.shape[dim] for a, b in zip(xs, ws))


states_flops("milenas_fast::pointwise")(_flops(0))
states_flops("milenas_fast::pointwise_input_grad")(_flops(1))
states_flops("milenas_fast::pointwise_wgrad")(_flops(1))


def _setup_context(ctx, inputs, output):
    xs, ws, stats = inputs
    ctx.k = len(xs)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*xs, *ws)
    if stats:
        ctx.mark_non_differentiable(output[-1])


def _backward(ctx, grads):
    grads = grads[:ctx.k]  # (the statistics' gradient: none)
    saved = ctx.saved_tensors
    xs, ws = saved[:ctx.k], saved[ctx.k:]
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    given = [i for i, g in enumerate(grads) if g is not None]
    dxs, dws = [None] * ctx.k, [None] * ctx.k
    xi = [i for i in given if need_x[i]]
    if xi:  # one launch for every input that wants its gradient
        for i, d in zip(xi, torch.ops.milenas_fast.pointwise_input_grad([grads[i] for i in xi], [ws[i] for i in xi])):
            dxs[i] = d
    wi = [i for i in given if need_w[i]]
    if wi:  # α-only passes (weights frozen): none of this
        dw = torch.ops.milenas_fast.pointwise_wgrad([xs[i] for i in wi], [grads[i] for i in wi])
        dw = dw.to(ws[wi[0]].dtype).view(len(wi), *ws[wi[0]].shape)  # one cast where the weights are not fp32
        for i, d in zip(wi, dw.unbind(0)):
            dws[i] = d
    return dxs, dws, None


torch.library.register_autograd("milenas_fast::pointwise", _backward, setup_context=_setup_context)


def pointwise(xs: list[torch.Tensor], ws: list[torch.Tensor], stats: int = 0) -> list[torch.Tensor]:
    """[conv2d(x, w) for x, w in zip(xs, ws)], 1×1 without bias, in one launch each way (differentiable in every
    input and weight); the op checks its arguments. With `stats` (a bitmask over the outputs), the per-tile
    statistics of those outputs come last."""
    return list(torch.ops.milenas_fast.pointwise(list(xs), list(ws), stats))


def pointwise_reference(xs: list[torch.Tensor], ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """Plain-PyTorch twin of `pointwise`."""
    return [F.conv2d(x, w.to(x.dtype)) for x, w in zip(xs, ws)]
