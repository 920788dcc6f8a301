"""edge_reduce with the first B candidates' non-affine BatchNorm in training mode: batch statistics.

    out = folded_reduce(ys, w, mean, rstd, B)       ys [K, N, C, H, W], w [K], mean/rstd [K, C] fp32

For k < B, mean[k] / rstd[k] must be ys[k]'s batch statistics (`bn_stats`): the gradient then flows
through them, as through nn.BatchNorm2d. Autograd through torch.var_mean would cost a copy of ys to fp32
(bf16), the statistics' backward (five full-size elementwise passes) and a saved fp32 copy; instead the
backward is written out: edge_reduce_backward gives the loss's gradient wrt w, mean and rstd (two reductions),
and ONE kernel (`bn_fold_grad`, kernels/bn_fold.py) forms every candidate's input gradient from it.
`bn_stats_reference` and `bn_fold_grad_reference` are the plain-PyTorch twins.
"""
from __future__ import annotations

import torch

from milenas_fast.kernels import bn_fold as K

from .edge_reduce import edge_reduce, edge_reduce_backward
from .edge_reduce_triton import MAX_TILE, _pow2, launch_config
from .triton_launch import INTERPRET, launch, register


@register("milenas_fast::bn_stats")
def bn_stats(ys: torch.Tensor, batch: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONE kernel (kernels/bn_fold.py) for the statistics of ys [K, N, C, H, W], fp32 whatever ys's dtype:
    (mean [K, C], rstd [K, C], unbiased var [batch, C]); rows k < batch are ys[k]'s batch statistics, later
    rows (the identity) mean 0 and rstd 1, so nothing is concatenated per call."""
    kt, n, c, h, wd = ys.shape
    ys = ys.contiguous()
    mean = ys.new_empty(kt, c, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    uvar = ys.new_empty(batch, c, dtype=torch.float32)
    bhw = min(_pow2(h * wd), MAX_TILE)
    bc = _pow2(c) if INTERPRET else max(1, min(_pow2(c), MAX_TILE // bhw // 4))  # the interpreter pays per program
    launch(K.bn_stats_kernel, (kt, -(-c // bc)), ys, mean, rstd, uvar, batch, n, c, h * wd, eps,
           BLOCK_C=bc, BLOCK_HW=bhw, num_warps=4)
    return mean, rstd, uvar


def bn_stats_reference(ys: torch.Tensor, batch: int, eps: float):
    """Plain-PyTorch twin of `bn_stats`."""
    kt, c = ys.shape[0], ys.shape[2]
    var, mean = torch.var_mean(ys[:batch].float(), dim=(1, 3, 4), correction=0)
    n = ys[0].numel() // c
    pad = kt - batch
    return (torch.cat([mean, mean.new_zeros(pad, c)]), torch.cat([torch.rsqrt(var + eps), mean.new_ones(pad, c)]),
            var * (n / (n - 1)))


@register("milenas_fast::bn_fold_grad")
def bn_fold_grad(g: torch.Tensor, y: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 gmean: torch.Tensor, grstd: torch.Tensor, batch: int) -> torch.Tensor:
    k, n, c, h, wd = y.shape
    g, y = g.contiguous(), y.contiguous()
    gy = torch.empty_like(y)
    if y.numel():
        bp, bhw, grid, warps = launch_config(n * c, h * wd)
        launch(K.bn_fold_grad_kernel, grid, g, y, w, mean, rstd, gmean, grstd, gy, k, batch, 1.0 / (n * h * wd),
               n * c, c, h * wd, BLOCK_P=bp, BLOCK_HW=bhw, num_warps=warps)
    return gy


def bn_fold_grad_reference(g, y, w, mean, rstd, gmean, grstd, batch: int) -> torch.Tensor:
    """Plain-PyTorch twin of `bn_fold_grad` (fp32 arithmetic, gy in y's dtype)."""
    k, n, c, h, wd = y.shape
    on = (torch.arange(k, device=y.device) < batch).float()[:, None]
    b = -on * grstd * rstd ** 3 / (n * h * wd)
    d = on * gmean / (n * h * wd) - b * mean
    v = lambda t: t.view(k, 1, c, 1, 1)  # noqa: E731
    return (g.float() * v(w[:, None] * rstd) + y.float() * v(b) + v(d)).to(y.dtype)


class _FoldedReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, w, mean, rstd, batch):
        ctx.save_for_backward(ys, w, mean, rstd)
        ctx.batch = batch
        return edge_reduce(ys, w, mean, rstd)  # no graph: autograd is off in here

    @staticmethod
    def backward(ctx, grad):
        ys, w, mean, rstd = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[:2]
        grad = grad.contiguous()
        stats = need_y and ctx.batch > 0
        _, gw, gmean, grstd = edge_reduce_backward(grad, ys, w, mean, rstd, [False, need_w, stats, stats])
        gy = None
        if need_y:
            gm, gr = (gmean, grstd) if stats else (mean, rstd)  # unread when batch == 0
            gy = torch.ops.milenas_fast.bn_fold_grad(grad, ys, w, mean, rstd, gm, gr, ctx.batch if stats else 0)
        return gy, gw, None, None, None


def folded_reduce(ys: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, batch: int):
    """Σ_k w_k (ys_k − mean_k) rstd_k, differentiable in ys and w; the first `batch` candidates' mean/rstd
    are their batch statistics (constants otherwise: running statistics, the identity's 0 and 1)."""
    return _FoldedReduce.apply(ys, w, mean.detach(), rstd.detach(), batch)
