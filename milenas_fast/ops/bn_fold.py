"""edge_reduce with some candidates' non-affine BatchNorm in training mode: batch statistics.

    out = folded_reduce(ys, w, mean, rstd, stats)   ys: K ≤ 8 candidates [N, C, H, W], w [K], mean/rstd [K, C] fp32

The candidates are a list, read where they are (no stack), as by edge_reduce.
`stats` is a bitmask over the candidates: bit k set says mean[k] / rstd[k] are ys[k]'s batch statistics
(`bn_stats`), and the gradient then flows through them, as through nn.BatchNorm2d; the other rows' mean/rstd
are constants (running statistics, the identity's 0 and 1), in whatever row they sit. Autograd through
torch.var_mean would cost a copy of ys to fp32 (bf16), the statistics' backward (five full-size elementwise
passes) and a saved fp32 copy; instead the backward is written out in two launches: `edge_reduce_partials`
leaves the two reductions (of g·(y_k − mean_k) and of g) as partial sums, and ONE kernel
(`bn_fold_grad_partials`, kernels/bn_fold.py) finishes them as it loads, forms every candidate's input gradient
and the mixing weights' gradient. `bn_stats_reference`, `bn_fold_grad_reference` and
`bn_fold_grad_partials_reference` are the plain-PyTorch twins.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch

from milenas_fast.kernels import bn_fold as K

from .backends import Kernels
from .costs import states_flops
from .edge_reduce import edge_reduce, edge_reduce_backward, edge_reduce_partials
from .edge_reduce_meta import CANDIDATE_PTRS, MAX_CANDIDATES, check_candidates
from .tiles import PLANE_TILE, cdiv, channel_config, plane_config, pow2
from .triton_launch import launch, pointers, register


MAX_STATS = 64  # bn_stats' candidates per launch: a DARTS cell's 8 edges leaving s0 and s1, 7 candidates each


def stats_mask(rows) -> int:
    """The `stats` bitmask of the row indices `rows`."""
    return sum(1 << k for k in set(rows))


def _check(stats: int, k: int) -> None:
    if stats < 0 or stats >> k:
        raise ValueError(f"stats bitmask {stats:#x} names rows beyond the {k} candidates")


def _rows(stats: int, k: int, device) -> torch.Tensor:
    """[k, 1] bool: which rows `stats` names (the twins' form of the bitmask)."""
    _check(stats, k)
    return ((stats >> torch.arange(k, device=device)) & 1).bool()[:, None]


def _check_list(ys: list[torch.Tensor], stats: int) -> None:
    """edge_reduce's contract on the candidates (count, shapes, dtypes, devices), and the bitmask's rows."""
    check_candidates(ys)
    _check(stats, len(ys))


@register("milenas_fast::bn_stats", traceable=False)  # a tuple of candidates
def bn_stats(ys: list[torch.Tensor], stats: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONE kernel (kernels/bn_fold.py) for the statistics of the candidates ys (each [N, C, H, W]; up to
    MAX_STATS: a fused cell's group of edges), fp32 whatever their dtype: (mean, rstd, unbiased var), each [K, C];
    rows named by `stats` are ys[k]'s batch statistics, the others (the identity) mean 0, rstd 1 and var 0, so
    nothing is concatenated per call."""
    check_candidates(ys, MAX_STATS)
    _check(stats, len(ys))
    kt, (n, c, h, wd) = len(ys), ys[0].shape
    mean = ys[0].new_empty(kt, c, dtype=torch.float32)
    rstd, uvar = torch.empty_like(mean), torch.empty_like(mean)
    bc, bhw = channel_config(c, h * wd)
    launch(K.bn_stats_kernel, (kt, cdiv(c, bc)), tuple(y.contiguous() for y in ys), mean, rstd, uvar, n, c,
           h * wd, eps, K=kt, STATS=stats, BLOCK_C=bc, BLOCK_HW=bhw, num_warps=4)
    return mean, rstd, uvar


def bn_stats_reference(ys: list[torch.Tensor], stats: int, eps: float):
    """Plain-PyTorch twin of `bn_stats`."""
    ys = torch.stack(list(ys))
    c = ys.shape[2]
    on = _rows(stats, ys.shape[0], ys.device)
    var, mean = torch.var_mean(ys.float(), dim=(1, 3, 4), correction=0)
    n = ys[0].numel() // c
    zero = mean.new_zeros(())
    return mean.where(on, zero), torch.rsqrt(var + eps).where(on, zero + 1), (var * (n / (n - 1))).where(on, zero)


@register("milenas_fast::bn_running_rstd")
def running_rstd(var: torch.Tensor, stats: int, eps: float) -> torch.Tensor:
    """Eval mode, ONE kernel: rstd [K, C] fp32 = 1/sqrt(var + eps) from running variances var [K, C] for the
    rows named by `stats`, exactly 1 in the others (the identity), so nothing is concatenated per call."""
    k, c = var.shape
    _check(stats, k)
    var = var.contiguous()
    rstd = var.new_empty(k, c, dtype=torch.float32)
    if var.numel():
        bc = min(pow2(c), PLANE_TILE)
        launch(K.running_rstd_kernel, (k, cdiv(c, bc)), var, rstd, c, eps, STATS=stats, BLOCK_C=bc, num_warps=1)
    return rstd


def running_rstd_reference(var: torch.Tensor, stats: int, eps: float) -> torch.Tensor:
    """Plain-PyTorch twin of `running_rstd` (in at least fp32: fp64 stays fp64)."""
    var = var.to(torch.promote_types(var.dtype, torch.float32))
    return torch.rsqrt(var + eps).where(_rows(stats, var.shape[0], var.device), 1.0)


# bn_fold_grad_kernel's run-time arguments, named (tests/test_stencil.py keeps them equal to its parameters)
FoldGradArgs = namedtuple("FoldGradArgs", ["g_ptr", *CANDIDATE_PTRS, "w_ptr", "mean_ptr", "rstd_ptr", "gm_ptr",
                                           "gr_ptr", "gy_ptr", "part_gy_ptr", "part_g_ptr", "gw_ptr", "inv_n",
                                           "P", "C", "HW", "S"])


@register("milenas_fast::bn_fold_grad")
def bn_fold_grad_op(g: torch.Tensor, ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                    gmean: Optional[torch.Tensor], grstd: Optional[torch.Tensor], part_gy: Optional[torch.Tensor],
                    part_g: Optional[torch.Tensor], stats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every candidate's input gradient in ONE [K, N, C, H, W] buffer (autograd hands out its rows), from the
    statistics' gradients gmean/grstd [K, C], or (gy, gw) finishing edge_reduce's partial sums itself
    (`edge_reduce_partials`: part_gy [K, C, S], part_g [C, S]) and also the mixing weights' gradient gw [K]: ONE
    launch either way. Without the partials gw is 0-element."""
    _check_list(ys, stats)
    k, (n, c, h, wd) = len(ys), ys[0].shape
    parts = part_gy is not None
    if parts == (gmean is not None) or (gmean is None) != (grstd is None) or (part_gy is None) != (part_g is None):
        raise ValueError("bn_fold_grad: either gmean and grstd or part_gy and part_g")
    if parts and (part_gy.dim() != 3 or part_gy.shape[:2] != (k, c) or part_g.shape != (c, part_gy.shape[2])):
        raise ValueError(f"bn_fold_grad: partials must be [K={k}, C={c}, S] and [C, S], got "
                         f"{list(part_gy.shape)} and {list(part_g.shape)}")
    g = g.contiguous()
    gy = ys[0].new_empty(k, n, c, h, wd)
    gw = w.new_empty(0) if not parts else w.new_zeros(k) if not gy.numel() else w.new_empty(k)
    if gy.numel():
        bp, bhw, grid, warps = plane_config(n * c, h * wd)
        part_gy, part_g = (part_gy.contiguous(), part_g.contiguous()) if parts else (w, w)
        # the pointers one mode does not read alias w (never written)
        args = FoldGradArgs(g, *pointers(ys, MAX_CANDIDATES), w_ptr=w, mean_ptr=mean, rstd_ptr=rstd,
                            gm_ptr=w if parts else gmean, gr_ptr=w if parts else grstd, gy_ptr=gy, part_gy_ptr=part_gy,
                            part_g_ptr=part_g, gw_ptr=gw if parts else w, inv_n=1.0 / (n * h * wd), P=n * c, C=c,
                            HW=h * wd, S=part_gy.shape[2] if parts else 1)
        launch(K.bn_fold_grad_kernel, grid, *args, K=k, STATS=stats, PARTS=parts, BLOCK_P=bp, BLOCK_HW=bhw,
               num_warps=warps)
    return gy, gw


@states_flops("milenas_fast::bn_fold_grad")
def _fold_grad_flops(g, ys, *_) -> int:
    return 5 * sum(y.numel() for y in ys)  # gy = a·g + b·y + d per candidate element (the partials' sums are small)


@states_flops("milenas_fast::bn_backward")
def _bn_backward_flops(gs, hs, *_) -> int:
    return 9 * sum(h.numel() for h in hs)  # sums of g and g·(h − mean), then rstd·(g − a − (h − mean)·b)


def bn_fold_grad(g: torch.Tensor, ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 gmean: torch.Tensor, grstd: torch.Tensor, stats: int) -> torch.Tensor:
    """Every candidate's input gradient [K, N, C, H, W] from the statistics' gradients gmean/grstd."""
    return torch.ops.milenas_fast.bn_fold_grad(g, ys, w, mean, rstd, gmean, grstd, None, None, stats)[0]


def bn_fold_grad_partials(g: torch.Tensor, ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, part_gy: torch.Tensor, part_g: torch.Tensor, stats: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`bn_fold_grad` that finishes edge_reduce's partial sums itself: (gy [K, N, C, H, W], gw [K])."""
    gy, gw = torch.ops.milenas_fast.bn_fold_grad(g, ys, w, mean, rstd, None, None, part_gy, part_g, stats)
    return gy, gw


def bn_fold_grad_partials_reference(g, ys, w, mean, rstd, part_gy, part_g, stats: int):
    """Plain-PyTorch twin of `bn_fold_grad_partials`."""
    sgy, sg = part_gy.sum(2), part_g.sum(1)
    gy = bn_fold_grad_reference(g, ys, w, mean, rstd, -w[:, None] * rstd * sg, w[:, None] * sgy, stats)
    return gy, (rstd * sgy).sum(1)


def bn_fold_grad_reference(g, ys: list[torch.Tensor], w, mean, rstd, gmean, grstd, stats: int) -> torch.Tensor:
    """Plain-PyTorch twin of `bn_fold_grad` (fp32 arithmetic, gy [K, N, C, H, W] in the candidates' dtype)."""
    y = torch.stack(list(ys))
    k, n, c, h, wd = y.shape
    on = _rows(stats, k, y.device).float()
    b = -on * grstd * rstd ** 3 / (n * h * wd)
    d = on * gmean / (n * h * wd) - b * mean
    v = lambda t: t.view(k, 1, c, 1, 1)  # noqa: E731
    return (g.float() * v(w[:, None] * rstd) + y.float() * v(b) + v(d)).to(y.dtype)


MAX_BN = 16  # bn_backward's BatchNorms per launch: the pairs of a fused cell's group of 8 edges


@register("milenas_fast::bn_backward", traceable=False)  # tuples of pointers
def bn_backward_op(gs: list[torch.Tensor], hs: list[torch.Tensor], means: list[torch.Tensor],
                      rstds: list[torch.Tensor]) -> list[torch.Tensor]:
    """ONE kernel for the input gradients of K ≤ MAX_BN training-mode non-affine BatchNorms (inputs hs [N, C, H, W],
    one shape and dtype; output gradients gs of that dtype; means/rstds [C] fp32 their batch statistics): the
    gradient through the statistics included, as aten's batch-norm backward computes it, in h's dtype."""
    h0 = hs[0]
    n, c, h, wd = h0.shape
    if not 1 <= len(hs) <= MAX_BN or any(len(t) != len(hs) for t in (gs, means, rstds)):
        raise ValueError(f"bn_backward: 1 to {MAX_BN} BatchNorms, a gradient, mean and rstd each")
    for t in (*gs, *hs):
        if t.shape != h0.shape or t.dtype != h0.dtype:
            raise ValueError(f"bn_backward: every g and h must match h0 ({list(h0.shape)}, {h0.dtype}), got "
                             f"{list(t.shape)}, {t.dtype}")
    if any(t.shape != (c,) or t.dtype != torch.float32 for t in (*means, *rstds)):
        raise ValueError(f"bn_backward: mean and rstd must be float32 [{c}] each")
    gs, hs, means, rstds = ([t.contiguous() for t in ts] for ts in (gs, hs, means, rstds))
    dhs = [torch.empty_like(t) for t in hs]
    if h0.numel():
        bc, bhw = channel_config(c, h * wd)
        launch(K.bn_backward_kernel, (len(hs), cdiv(c, bc)), *map(tuple, (gs, hs, dhs, means, rstds)), n, c, h * wd,
               K=len(hs), BLOCK_C=bc, BLOCK_HW=bhw, num_warps=4)
    return dhs


def bn_backward(g0: torch.Tensor, g1: torch.Tensor, h0: torch.Tensor, h1: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`bn_backward_op` of two BatchNorms whose statistics are the rows of mean/rstd [2, C] (fp32)."""
    c = h0.shape[1]
    if mean.shape != (2, c) or rstd.shape != (2, c) or mean.dtype != torch.float32 or rstd.dtype != torch.float32:
        raise ValueError(f"bn_backward: mean and rstd must be float32 [2, {c}]")
    dh0, dh1 = torch.ops.milenas_fast.bn_backward([g0, g1], [h0, h1], [mean[0], mean[1]], [rstd[0], rstd[1]])
    return dh0, dh1


def bn_backward_reference(g0, g1, h0, h1, mean, rstd):
    """Plain-PyTorch twin of `bn_backward`: aten's batch-norm backward per input (eps unused: rstd is given)."""
    return tuple(torch.ops.aten.native_batch_norm_backward(g, h, None, None, None, mean[k], rstd[k], True, 0.0,
                                                           [True, False, False])[0]
                 for k, (g, h) in enumerate(((g0, h0), (g1, h1))))


class _FoldedReduce(torch.autograd.Function):
    """Candidates as trailing arguments: autograd tracks tensors given directly, not inside a list."""

    @staticmethod
    def forward(ctx, w, mean, rstd, stats, kernels, acc, *ys):
        ctx.save_for_backward(w, mean, rstd, *ys)
        ctx.stats, ctx.kernels = stats, kernels
        return edge_reduce(list(ys), w, mean, rstd, acc, kernels=kernels)  # no graph: autograd is off in here

    @staticmethod
    def backward(ctx, grad):
        w, mean, rstd, *ys = ctx.saved_tensors
        need_w, need_acc, need_ys = ctx.needs_input_grad[0], ctx.needs_input_grad[5], ctx.needs_input_grad[6:]
        need_y = any(need_ys)
        grad = grad.contiguous()
        through = need_y and ctx.stats != 0  # the gradient flows through some batch statistics
        gys = [None] * len(ys)
        if need_y and (need_w or through):  # the sums finished by bn_fold_grad's launch: two launches in all
            part_gy, part_g = edge_reduce_partials(grad, ys, w, mean, rstd, kernels=ctx.kernels)
            gy, gw = bn_fold_grad_partials(grad, ys, w, mean, rstd, part_gy, part_g, ctx.stats)
            gw = gw if need_w else None
        else:
            _, gw, _, _ = edge_reduce_backward(grad, ys, w, mean, rstd, [False, need_w, False, False],
                                               kernels=ctx.kernels)
            gy = bn_fold_grad(grad, ys, w, mean, rstd, mean, rstd, 0) if need_y else None
        if need_y:
            gys = [t if n else None for t, n in zip(gy.unbind(0), need_ys)]
        return gw, None, None, None, None, grad if need_acc else None, *gys


def folded_reduce(ys: list[torch.Tensor], w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, stats: int,
                  acc: torch.Tensor | None = None, kernels: Kernels | None = None):
    """(acc +) Σ_k w_k (ys_k − mean_k) rstd_k over the candidates ys (a list, read where they are), differentiable
    in ys, w and acc (a node's running sum, added in the same launch); the rows named by the bitmask `stats` have
    their batch statistics as mean/rstd (constants otherwise: running statistics, the identity's 0 and 1). `kernels`:
    edge_reduce's implementation (default: the device's)."""
    return _FoldedReduce.apply(w, mean.detach(), rstd.detach(), stats, kernels, acc, *ys)
