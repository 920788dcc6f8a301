"""The multi-stencil op: six mixed-op candidates' first stages from one read of the edge input.

    y3, y5, yd3, yd5, ymax, yavg = stencil(x, w3, w5, wd3, wd5, stride, pools=True)
    [(y3, ..., yavg)] = stencil_group(xs, filters, stride, pools, identity)   (E edges, one launch each way)
    y = relu_depthwise(x, w, stride=1)
    y3, y5 = relu_depthwise_pair(x3, w3, x5, w5)
    y3, y5 = relu_depthwise_pair_bn(h3, w3, h5, w5, mean, rstd, eps)   (of BN(h3), BN(h5): batch statistics)
    [(y3, y5, mean, var)] = relu_depthwise_pair_bn_tiles(h3s, w3s, h5s, w5s, tile_stats, rows, tile, eps)
    xid, y3, y5, yd3, yd5, ymax, yavg = stencil_with_identity(x, w3, w5, wd3, wd5, stride, pools=True)

y3/y5/yd3/yd5: ReLU → depthwise (3×3 pad 1, 5×5 pad 2, 3×3 dil 2 pad 2, 5×5 dil 2 pad 4; stride s);
ymax/yavg: 3×3 max / avg pool (stride s, pad 1, count_include_pad=False) of the raw input.
Filters are [C, 1, k, k]. Outputs have x's dtype (fp32 accumulation); filter gradients the filters'.
A filter given as None (a MixedOp without that candidate) skips its branch: no loads, FLOPs or stores
in any kernel, no zero filter, and its output is None; `pools=False` skips both pools likewise.
`relu_depthwise` is ReLU → depthwise k×k (k 3 or 5, pad k//2, dilation 1): the sep convs' second stage,
the same kernels with the one branch selected. `relu_depthwise_pair` computes both sep convs' second stages in one
launch each way (the 5×5 branch reads x5); `relu_depthwise_pair_bn` the same from the inner BatchNorms' inputs and
batch statistics (normalised as loaded: the BN outputs are never written; its backward ends with `bn_backward`);
`relu_depthwise_pair_bn_tiles` (the fused MixedOp's) merges those statistics itself from the producing
`pointwise` launch's tile statistics.

Registered ops, one per kernel and direction; each takes E edges as lists (a single edge is a group of one; a
list is empty where its part is absent for every edge). Opaque custom ops: every kernel takes tuples of pointers,
which torch.compile's Triton tracing does not take.
    milenas_fast::stencil_fwd(xs, w3s, w5s, wd3s, wd5s, stride, pools, x5s, means, rstds, tile_stats?, groups, step,
        tile, eps, max_tile) -> 6 per edge, or with tile_stats (y3, y5, mean, rstd, unbiased var) per edge
    milenas_fast::stencil_bwd_input(xs, w3s, w5s, wd3s, wd5s, ymaxs, g3s, g5s, gd3s, gd5s, gmaxs, gavgs, stride,
        gaccs, x5s, means, rstds, max_tile) -> dx per edge (then dx5 per edge with x5)
    milenas_fast::stencil_bwd_weight(xs, g3s, g5s, gd3s, gd5s, stride, x5s, means, rstds, max_tile) -> dw [E, Σ C·k²]
        (fp32: the given gradients' branches' filter gradients one after another, w3 | w5 | wd3 | wd5, each [C, k²])
The two backward halves are separate ops so that α-only passes (no filter gradients wanted) and
frozen inputs skip the work they do not need. mean/rstd ([2, C] fp32, rows for x and x5; no pools): the inputs
are normalised as loaded, and dx/dx5 are the gradients of the normalised values. max_tile: the largest tile of a
program (0: the launcher's own, ops/tiles.py); the Python functions take it as a keyword and keep it for backward.
`stencil_reference` and
`relu_depthwise_reference` are the plain-PyTorch twins.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from milenas_fast.kernels import stencil as K

from .bn_fold import bn_backward
from .costs import states_flops
from .tiles import out_size, stencil_config
from .triton_launch import launch as _launch, register as _register

KSIZE = (3, 5, 3, 5)  # filter size of each convolution branch: w3, w5, wd3, wd5
MAX_EDGES = 8  # the stencil ops' edges per launch: a DARTS cell's edges leaving s0 and s1


def _check(x, ws, x5=None):
    assert x.dim() == 4 and x.is_contiguous(), "x must be NCHW contiguous"
    assert x5 is None or (x5.shape == x.shape and x5.dtype == x.dtype and x5.is_contiguous() and ws[1] is not None), \
        "x5 must be contiguous, of x's shape and dtype, and come with w5"
    C = x.shape[1]
    for w, k in zip(ws, KSIZE):
        assert w is None or (w.shape == (C, 1, k, k) and w.is_contiguous()), \
            f"filter must be [{C}, 1, {k}, {k}] contiguous"


def _check_edges(name: str, xs, lists, wss, x5=(), mean=(), rstd=(), pools: bool = False):
    """The ops' contract: 1 to MAX_EDGES inputs of one shape and dtype, each list empty (absent for every edge) or
    one per input, filters of the inputs' channels, x5 with w5, mean/rstd [2, C] fp32 without pools."""
    E = len(xs)
    if not 1 <= E <= MAX_EDGES or any(len(t) not in (0, E) for t in lists):
        raise ValueError(f"{name}: 1 to {MAX_EDGES} inputs, each list empty or one per input")
    if (not mean) != (not rstd) or (mean and pools):
        raise ValueError(f"{name}: mean and rstd come together, without pools")
    for e, x in enumerate(xs):
        if x.shape != xs[0].shape or x.dtype != xs[0].dtype:
            raise ValueError(f"{name}: the inputs must have one shape and dtype")
        _check(x, [w[e] if w else None for w in wss], x5[e] if x5 else None)
        if mean and not (mean[e].shape == rstd[e].shape == (2, x.shape[1]) and mean[e].dtype == rstd[e].dtype
                         == torch.float32 and mean[e].is_contiguous() and rstd[e].is_contiguous()):
            raise ValueError(f"{name}: mean/rstd must be [2, C] fp32 contiguous")


def _ptrs(ts, default) -> tuple:
    """A kernel's pointer tuple: `ts` (one per edge), or `default`'s where the part is absent (never touched)."""
    return tuple(ts) if ts else tuple(default)


class FwdArgs(NamedTuple):
    """stencil_fwd_kernel's run-time arguments (tuples of E pointers, then sizes; see kernels/stencil.py)."""
    xs: tuple
    x5s: tuple
    w3s: tuple
    w5s: tuple
    wd3s: tuple
    wd5s: tuple
    y3s: tuple
    y5s: tuple
    yd3s: tuple
    yd5s: tuple
    ymaxs: tuple
    yavgs: tuple
    means: tuple
    rstds: tuple
    uvars: tuple
    st_ptr: torch.Tensor  # tile statistics (NORM 2), else any tensor
    P: int
    C: int
    H: int
    W: int
    HO: int
    WO: int
    R: int = 1  # tile-statistics rows per group (NORM 2)
    T: int = 1  # tiles per image
    TB: int = 1  # pixels per tile
    G3: int = 0  # x's and x5's first statistics rows, and the rows between edges
    G5: int = 0
    GS: int = 0
    eps: float = 0.0


class BwdInputArgs(NamedTuple):
    """stencil_bwd_input_kernel's run-time arguments (tuples of E pointers, then sizes)."""
    xs: tuple
    x5s: tuple
    w3s: tuple
    w5s: tuple
    wd3s: tuple
    wd5s: tuple
    ymaxs: tuple
    g3s: tuple
    g5s: tuple
    gd3s: tuple
    gd5s: tuple
    gmaxs: tuple
    gavgs: tuple
    gaccs: tuple
    dxs: tuple
    dx5s: tuple
    means: tuple
    rstds: tuple
    P: int
    C: int
    H: int
    W: int
    HO: int
    WO: int


class BwdWeightArgs(NamedTuple):
    """stencil_bwd_weight_kernel's run-time arguments (tuples of E pointers, the partial sums, then sizes)."""
    xs: tuple
    x5s: tuple
    g3s: tuple
    g5s: tuple
    gd3s: tuple
    gd5s: tuple
    part_ptr: torch.Tensor
    means: tuple
    rstds: tuple
    P: int
    C: int
    H: int
    W: int
    HO: int
    WO: int


@_register("milenas_fast::stencil_fwd", traceable=False)  # tuples of pointers
def stencil_fwd(xs: list[torch.Tensor], w3: list[torch.Tensor], w5: list[torch.Tensor], wd3: list[torch.Tensor],
                wd5: list[torch.Tensor], stride: int, pools: bool, x5: list[torch.Tensor], mean: list[torch.Tensor],
                rstd: list[torch.Tensor], tile_stats: Optional[torch.Tensor], groups: list[int], step: int, tile: int,
                eps: float, max_tile: int) -> list[torch.Tensor]:
    """The forward of E edges (a group; one edge is a group of one) in ONE launch. Without `tile_stats`: 6 outputs
    per edge (y3, y5, yd3, yd5, ymax, yavg; 0-element where absent). With it (the pairs: x = h3, x5 = h5, w3 and w5
    only, stride 1): BN(h3), BN(h5) with the statistics merged from `tile_stats` ([K, N·T, 2, C], the producing
    pointwise launch's; edge e's rows groups + e·step, tiles of `tile` pixels): (y3, y5, mean, rstd, unbiased var)
    per edge, the last three [2, C] fp32. `max_tile`: the largest tile of a program (0: the launcher's own)."""
    wss = [w3, w5, wd3, wd5]
    _check_edges("stencil_fwd", xs, [*wss, x5, mean, rstd], wss, x5, mean, rstd, pools)
    E, x = len(xs), xs[0]
    N, C, H, W = x.shape
    HO, WO = out_size(H, stride), out_size(W, stride)
    bp, bhw, grid, warps = stencil_config("fwd", x.shape, stride, E, max_tile)
    has = dict(HAS3=bool(w3), HAS5=bool(w5), HASD3=bool(wd3), HASD5=bool(wd5), HASMAX=pools, HASAVG=pools)
    meta = dict(X5=bool(x5), STRIDE=stride, BLOCK_P=bp, BLOCK_HW=bhw, E=E, num_warps=warps)
    if tile_stats is None:
        ys = [[t.new_empty((N, C, HO, WO) if h else (0,)) for h in has.values()] for t in xs]
        args = FwdArgs(tuple(xs), _ptrs(x5, xs), *(_ptrs(w, xs) for w in wss),
                       *(tuple(y[b] for y in ys) for b in range(6)), _ptrs(mean, xs), _ptrs(rstd, xs), tuple(xs), x,
                       N * C, C, H, W, HO, WO)
        _launch(K.stencil_fwd_kernel, (*grid, E), *args, **has, **meta, NORM=1 if mean else 0)
        return [y for out in ys for y in out]
    k, r = tile_stats.shape[:2]
    rows = [g + e * step for g in groups for e in range(E)]
    if not (x5 and w3 and w5) or wd3 or wd5 or pools or mean or stride != 1:
        raise ValueError("stencil_fwd: tile statistics are for the pairs (x, x5, w3, w5; stride 1)")
    if tile_stats.shape[2:] != (2, C) or tile_stats.dtype != torch.float32 or r % max(N, 1) or len(groups) != 2 \
            or not 0 <= min(rows) <= max(rows) < k:
        raise ValueError(f"stencil_fwd: tile_stats must be float32 [K, N·T, 2, {C}], groups two of its rows")
    ys = [[t.new_empty(N, C, H, W) for _ in range(2)] for t in xs]
    stats = [[x.new_empty(2, C, dtype=torch.float32) for _ in range(3)] for _ in xs]
    if x.numel():
        any_ = tuple(xs)  # also the absent branches' pointers
        args = FwdArgs(any_, tuple(x5), tuple(w3), tuple(w5), any_, any_, *(tuple(y[b] for y in ys) for b in range(2)),
                       any_, any_, any_, any_, *(tuple(s[b] for s in stats) for b in range(3)),
                       tile_stats.contiguous(), N * C, C, H, W, H, W, R=r, T=r // N, TB=tile, G3=groups[0],
                       G5=groups[1], GS=step, eps=eps)
        _launch(K.stencil_fwd_kernel, (*grid, E), *args, **has, **meta, NORM=2)
    return [t for y, st in zip(ys, stats) for t in (*y, *st)]


@_register("milenas_fast::stencil_bwd_input", traceable=False)  # tuples of pointers
def stencil_bwd_input(xs: list[torch.Tensor], w3: list[torch.Tensor], w5: list[torch.Tensor],
                      wd3: list[torch.Tensor], wd5: list[torch.Tensor], ymax: list[torch.Tensor],
                      g3: list[torch.Tensor], g5: list[torch.Tensor], gd3: list[torch.Tensor],
                      gd5: list[torch.Tensor], gmax: list[torch.Tensor], gavg: list[torch.Tensor], stride: int,
                      gacc: list[torch.Tensor], x5: list[torch.Tensor], mean: list[torch.Tensor],
                      rstd: list[torch.Tensor], max_tile: int) -> list[torch.Tensor]:
    """Each edge's dx (then, with x5, each one's dx5) from the given output gradients, in ONE launch. A list is empty
    where that part is absent for every edge (a gradient counts only with its filter; gmax/gavg with ymax; with x5,
    g5 goes to dx5 and must be given). `gacc` (x's shape): a gradient of x from elsewhere, added into dx."""
    E = len(xs)
    wss = [w3, w5, wd3, wd5]
    _check_edges("stencil_bwd_input", xs, [*wss, ymax, g3, g5, gd3, gd5, gmax, gavg, gacc, x5, mean, rstd], wss,
                 mean=mean, rstd=rstd)
    gss = [[t.contiguous() for t in g] if g and need else []
           for g, need in zip((g3, g5, gd3, gd5, gmax, gavg), (*wss, ymax, ymax))]
    if x5 and not gss[1]:
        raise ValueError("stencil_bwd_input: x5 comes with g5")
    x = xs[0]
    N, C, H, W = x.shape
    dxs = [torch.empty_like(t) for t in xs]
    dx5s = [torch.empty_like(t) for t in x5]
    bp, bhw, grid, warps = stencil_config("bwd_input", x.shape, stride, E, max_tile)
    args = BwdInputArgs(tuple(xs), _ptrs(x5, xs), *(_ptrs(w, xs) for w in wss),
                        _ptrs(ymax if gss[4] or gss[5] else [], xs), *(_ptrs(g, xs) for g in gss),
                        _ptrs([t.contiguous() for t in gacc], xs), tuple(dxs), _ptrs(dx5s, xs), _ptrs(mean, xs),
                        _ptrs(rstd, xs), N * C, C, H, W, out_size(H, stride), out_size(W, stride))
    _launch(K.stencil_bwd_input_kernel, (*grid, E), *args,
            HAS3=bool(gss[0]), HAS5=bool(gss[1]), HASD3=bool(gss[2]), HASD5=bool(gss[3]), HASMAX=bool(gss[4]),
            HASAVG=bool(gss[5]), X5=bool(x5), HASACC=bool(gacc), NORM=bool(mean), STRIDE=stride, BLOCK_P=bp,
            BLOCK_HW=bhw, E=E, num_warps=warps)
    return dxs + dx5s


@_register("milenas_fast::stencil_bwd_weight", traceable=False)  # tuples of pointers
def stencil_bwd_weight(xs: list[torch.Tensor], g3: list[torch.Tensor], g5: list[torch.Tensor],
                       gd3: list[torch.Tensor], gd5: list[torch.Tensor], stride: int, x5: list[torch.Tensor],
                       mean: list[torch.Tensor], rstd: list[torch.Tensor], max_tile: int) -> torch.Tensor:
    """fp32 filter gradients [E, Σ C·k²] of the branches whose output gradients are given, in ONE launch (and one
    ordered sum): row e edge e's, one contiguous [C, k²] block per branch in the order w3 | w5 | wd3 | wd5
    (`split_taps` parts them without a copy; the caller casts to the filters' dtype). The 5×5 branch reads x5 where
    given. A list is empty where that part is absent for every edge."""
    E = len(xs)
    gss = [[t.contiguous() for t in g] for g in (g3, g5, gd3, gd5)]
    _check_edges("stencil_bwd_weight", xs, [*gss, x5, mean, rstd], [[]] * 4, mean=mean, rstd=rstd)
    x = xs[0]
    N, C, H, W = x.shape
    taps = sum(k * k for g, k in zip(gss, KSIZE) if g)
    bp, bhw, grid, warps = stencil_config("bwd_weight", x.shape, stride, E, max_tile)
    part = x.new_empty(E, grid[1] * N, C * taps, dtype=torch.float32)  # every program stores all its taps
    args = BwdWeightArgs(tuple(xs), _ptrs(x5, xs), *(_ptrs(g, xs) for g in gss), part, _ptrs(mean, xs),
                         _ptrs(rstd, xs), N * C, C, H, W, out_size(H, stride), out_size(W, stride))
    _launch(K.stencil_bwd_weight_kernel, (*grid, E), *args,
            HAS3=bool(gss[0]), HAS5=bool(gss[1]), HASD3=bool(gss[2]), HASD5=bool(gss[3]), X5=bool(x5) and bool(g5),
            NORM=bool(mean), STRIDE=stride, BLOCK_P=bp, BLOCK_HW=bhw, E=E, num_warps=warps)
    # Deterministic second stage: an ordered sum over pixel tiles and the batch, in fp32.
    return part.sum(dim=1)


def _stencil_flops(x: torch.Tensor, stride: int, present) -> int:
    """2 FLOPs per multiply-add of the computed convolution branches (`present`: w3, w5, wd3, wd5); the pools count
    0, as torch.utils.flop_counter's do; the transposed stencils (backward) as many per given gradient."""
    n, c, h, w = x.shape
    return 2 * n * c * out_size(h, stride) * out_size(w, stride) * sum(k * k for k, p in zip(KSIZE, present) if p)


@states_flops("milenas_fast::stencil_fwd")
def _fwd_flops(xs, w3, w5, wd3, wd5, stride, *_) -> int:
    return sum(_stencil_flops(x, stride, [bool(w) for w in (w3, w5, wd3, wd5)]) for x in xs)


@states_flops("milenas_fast::stencil_bwd_input")
def _bwd_input_flops(xs, w3, w5, wd3, wd5, ymax, g3, g5, gd3, gd5, gmax, gavg, stride, *_) -> int:
    present = [bool(w) and bool(g) for w, g in zip((w3, w5, wd3, wd5), (g3, g5, gd3, gd5))]
    return sum(_stencil_flops(x, stride, present) for x in xs)


@states_flops("milenas_fast::stencil_bwd_weight")
def _bwd_weight_flops(xs, g3, g5, gd3, gd5, stride, *_) -> int:
    return sum(_stencil_flops(x, stride, [bool(g) for g in (g3, g5, gd3, gd5)]) for x in xs)


def split_taps(dw: torch.Tensor, C: int, present) -> list:
    """stencil_bwd_weight's flat row as one contiguous [C, 1, k, k] view per present branch, None elsewhere
    (autograd's AccumulateGrad then keeps it as the .grad, no copy)."""
    parts = iter(torch.split(dw, [C * k * k for k, p in zip(KSIZE, present) if p]))
    return [next(parts).view(C, 1, k, k) if p else None for k, p in zip(KSIZE, present)]


def _present(ts):
    """The kernels' HAS flags for optional tensors."""
    return [t is not None for t in ts]


class Saved(NamedTuple):
    """One edge's forward, as its backward needs it (absent parts None)."""
    x: torch.Tensor
    w3: Optional[torch.Tensor]
    w5: Optional[torch.Tensor]
    wd3: Optional[torch.Tensor]
    wd5: Optional[torch.Tensor]
    ymax: Optional[torch.Tensor]  # the pools ran: the max pool's argmax in backward
    x5: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    rstd: Optional[torch.Tensor] = None


def _column(items, i: int) -> list:
    """Part i of every edge, or [] where it is absent (for all of them: the grouping keys say so)."""
    return [] if items[0][i] is None else [t[i] for t in items]


def edge_grads(edges: list[Saved], stride: int, needs: list, grads: list, gaccs: list, max_tile: int = 0
               ) -> list[list]:
    """Gradients [dx, dw3, dw5, dwd3, dwd5, dx5] per edge of the stencils `edges`, for each edge's needs (x, w3, w5,
    wd3, wd5, x5), six output gradients and gacc (x's gradient from elsewhere, added in; None: none). Edges whose
    launches have the same parts present share one (usually all of them): one input-gradient and one filter-gradient
    launch; frozen inputs and filters, and branches without a gradient, cost nothing. The statistics are constants
    here."""
    out = [[None] * 6 for _ in edges]
    wants_x, wants_w = {}, {}
    for e, (s, n, g, gacc) in enumerate(zip(edges, needs, grads, gaccs)):
        ws = (s.w3, s.w5, s.wd3, s.wd5)
        want_x, want_x5 = n[0], s.x5 is not None and n[5] and g[1] is not None
        if want_x or want_x5:
            # without x5 the 5×5 branch's gradient belongs to x; with it, to x5 (left out where x5 wants none, the
            # others where x wants none)
            g5x = g[1] if s.x5 is None or want_x5 else None
            gs = (g[0], g5x, *g[2:]) if want_x else (None, g[1], None, None, None, None)
            gs = [t if need is not None else None for t, need in zip(gs, (*ws, s.ymax, s.ymax))]
            split = s.x5 is not None and gs[1] is not None
            parts = (*ws, s.ymax, *gs, gacc if want_x else None, s.x5 if split else None, s.mean, s.rstd)
            parts = [p if (i >= 4 or gs[i] is not None) and (i != 4 or gs[4] is not None or gs[5] is not None)
                     else None for i, p in enumerate(parts)]  # filters (ymax) only where their gradients are
            wants_x.setdefault(tuple(_present(parts)), []).append((e, parts, want_x, want_x5))
        gw = [t if w is not None and need else None for t, w, need in zip(g[:4], ws, n[1:5])]
        if any(t is not None for t in gw):
            parts = (s.x, *gw, s.x5, s.mean, s.rstd)
            wants_w.setdefault(tuple(_present(parts)), []).append((e, parts))
    for items in wants_x.values():
        cols = [_column([p for _, p, _, _ in items], i) for i in range(15)]
        res = torch.ops.milenas_fast.stencil_bwd_input([edges[e].x for e, *_ in items], *cols[:11], stride,
                                                       *cols[11:], max_tile)
        E = len(items)
        for i, (e, _, want_x, want_x5) in enumerate(items):
            out[e][0] = res[i] if want_x else None
            out[e][5] = res[E + i] if want_x5 else None
    for items in wants_w.values():
        cols = [_column([p for _, p in items], i) for i in range(8)]
        dw = torch.ops.milenas_fast.stencil_bwd_weight(*cols[:5], stride, *cols[5:], max_tile)
        for row, (e, parts) in enumerate(items):
            ws = (edges[e].w3, edges[e].w5, edges[e].wd3, edges[e].wd5)
            for b, d in enumerate(split_taps(dw[row], edges[e].x.shape[1], _present(parts[1:5]))):
                out[e][1 + b] = None if d is None else d.to(ws[b].dtype)  # a cast only where not fp32
    return out


def _setup_context(ctx, inputs, output):
    xs, w3, w5, wd3, wd5, stride, pools, x5, mean, rstd, tile_stats = inputs[:11]
    E = len(xs)
    parts = [xs, w3, w5, wd3, wd5, [output[6 * e + 4] for e in range(E)] if pools and tile_stats is None else [],
             x5, mean, rstd]
    ctx.E, ctx.stride, ctx.tiles, ctx.max_tile = E, stride, tile_stats is not None, inputs[15]
    ctx.lens = [len(t) if isinstance(t, (list, tuple)) else None for t in inputs]  # the gradients' structure
    ctx.save_for_backward(*(p[e] if p else None for p in parts for e in range(E)))
    # Unused outputs (skipped branches' 0-element ones included) get None, not zero tensors to launch fills for:
    # their branches then cost nothing in backward.
    ctx.set_materialize_grads(False)


def _needs(flag, e: int) -> bool:
    return bool(flag[e]) if isinstance(flag, (list, tuple)) and len(flag) else False


def _backward(ctx, grads):
    if ctx.tiles:
        raise RuntimeError("stencil_fwd with tile statistics: differentiate relu_depthwise_pair_bn_tiles instead")
    E, saved, n = ctx.E, ctx.saved_tensors, ctx.needs_input_grad
    edges = [Saved(*(saved[p * E + e] for p in range(9))) for e in range(E)]
    needs = [[_needs(n[i], e) for i in (0, 1, 2, 3, 4, 7)] for e in range(E)]
    res = edge_grads(edges, ctx.stride, needs, [grads[6 * e:6 * e + 6] for e in range(E)], [None] * E, ctx.max_tile)
    by_input = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 7: 5}  # input -> position in edge_grads' rows
    return tuple(None if k is None else [res[e][by_input[i]] for e in range(k)] if i in by_input and k
                 else [None] * k for i, k in enumerate(ctx.lens))


torch.library.register_autograd("milenas_fast::stencil_fwd", _backward, setup_context=_setup_context)


def _fwd(xs, wss, stride: int, pools: bool, x5=(), mean=(), rstd=(), max_tile: int = 0) -> list:
    """stencil_fwd without tile statistics (wss: the four filters' lists, empty where absent)."""
    return torch.ops.milenas_fast.stencil_fwd(xs, *wss, stride, pools, list(x5), list(mean), list(rstd), None, [], 0,
                                              0, 0.0, max_tile)


class _WithIdentity(torch.autograd.Function):
    """The stencil of E edges, plus each edge's x itself as a first output whose gradient (the identity candidate's)
    the input-gradient kernel adds into dx: no separate add per edge and backward pass."""

    @staticmethod
    def forward(ctx, stride, pools, max_tile, *args):
        E = len(args) // 5
        xs, wss = list(args[:E]), [list(args[E * (b + 1):E * (b + 2)]) for b in range(4)]
        ys = _fwd(xs, [[] if w[0] is None else w for w in wss], stride, pools, max_tile=max_tile)
        ctx.stride, ctx.E, ctx.max_tile = stride, E, max_tile
        ctx.save_for_backward(*args, *(ys[6 * e + 4] if pools else None for e in range(E)))
        ctx.set_materialize_grads(False)
        return tuple(t for e in range(E) for t in (xs[e].view_as(xs[e]), *ys[6 * e:6 * e + 6]))

    @staticmethod
    def backward(ctx, *grads):
        E, saved, n = ctx.E, ctx.saved_tensors, ctx.needs_input_grad[3:]
        edges = [Saved(*(saved[b * E + e] for b in range(6))) for e in range(E)]
        needs = [[n[b * E + e] for b in range(5)] + [False] for e in range(E)]
        res = edge_grads(edges, ctx.stride, needs, [grads[7 * e + 1:7 * e + 7] for e in range(E)],
                         [grads[7 * e] for e in range(E)], ctx.max_tile)
        return (None, None, None, *(r[b] for b in range(5) for r in res))


def stencil_group(xs: list[torch.Tensor], filters: list[tuple], stride: int, pools: bool, identity: bool, *,
                  max_tile: int = 0) -> list:
    """[stencil(x, *f, stride, pools) (with x first: `stencil_with_identity`) for x, f in zip(xs, filters)] in one
    launch each way (inputs of one shape and dtype, up to MAX_EDGES; the same branches present in every edge).
    `max_tile`: the largest tile of a program, both ways (0: the launchers' own)."""
    xs = [x.contiguous() for x in xs]
    wss = [[_contiguous(f[b]) for f in filters] for b in range(4)]
    if identity and not torch.compiler.is_compiling():
        out, per = _WithIdentity.apply(stride, pools, max_tile, *xs, *(w for ws in wss for w in ws)), 7
    else:  # compiled code (torch.compile) gets x itself: the compiler fuses the add
        out, per = _fwd(xs, [[] if w[0] is None else w for w in wss], stride, pools, max_tile=max_tile), 6
    return [((xs[e],) if identity and per == 6 else ()) + tuple(out[per * e:per * e + per - 6])
            + _outputs(out[per * e + per - 6:per * (e + 1)], filters[e], pools) for e in range(len(xs))]


def _contiguous(t):
    return None if t is None else t.contiguous()


def _outputs(ys, ws, pools: bool) -> tuple:
    """The op's six outputs with the skipped branches' 0-element ones as None."""
    return tuple(y if has else None for y, has in zip(ys, _present(ws) + [pools, pools]))


def stencil_with_identity(x: torch.Tensor, w3: Optional[torch.Tensor], w5: Optional[torch.Tensor],
                          wd3: Optional[torch.Tensor], wd5: Optional[torch.Tensor], stride: int, pools: bool = True, *,
                          max_tile: int = 0):
    """(x, *stencil(...)): x as an output of the op, so that its gradient joins dx inside the input-gradient
    kernel (a mixed op's identity candidate: stride 1, where tests/test_sm90.py checks that kernel for spills)."""
    return stencil_group([x], [(w3, w5, wd3, wd5)], stride, pools, True, max_tile=max_tile)[0]


def stencil(x: torch.Tensor, w3: Optional[torch.Tensor], w5: Optional[torch.Tensor], wd3: Optional[torch.Tensor],
            wd5: Optional[torch.Tensor], stride: int, pools: bool = True, *, max_tile: int = 0):
    """The differentiable Triton op (gradients flow to x and the filters). A None filter (or pools=False) skips that
    branch: its output is None. `max_tile`: the largest tile of a program, both ways (0: the launchers' own)."""
    return stencil_group([x], [(w3, w5, wd3, wd5)], stride, pools, False, max_tile=max_tile)[0]


def relu_depthwise(x: torch.Tensor, w: torch.Tensor, stride: int = 1, *, max_tile: int = 0) -> torch.Tensor:
    """depthwise_conv(ReLU(x), w), w [C, 1, k, k] with k 3 or 5, padding k//2: `stencil` with one branch."""
    k = w.shape[-1]
    if k not in (3, 5):
        raise ValueError(f"relu_depthwise: filter size {k} (3 or 5 supported)")
    ws = (w, None) if k == 3 else (None, w)
    return stencil(x, *ws, None, None, stride, pools=False, max_tile=max_tile)[0 if k == 3 else 1]


def relu_depthwise_pair(x3: Optional[torch.Tensor], w3: Optional[torch.Tensor], x5: Optional[torch.Tensor],
                        w5: Optional[torch.Tensor], *, max_tile: int = 0) -> tuple:
    """(relu_depthwise(x3, w3), relu_depthwise(x5, w5)) in one launch each way (the stencil's 3×3 branch on x3,
    its 5×5 branch on x5); a None input (with its filter) gives None."""
    if x3 is None or x5 is None:
        return ((None if x3 is None else relu_depthwise(x3, w3, max_tile=max_tile)),
                (None if x5 is None else relu_depthwise(x5, w5, max_tile=max_tile)))
    y3, y5 = _fwd([x3.contiguous()], [[w3.contiguous()], [w5.contiguous()], [], []], 1, False, [x5.contiguous()],
                  max_tile=max_tile)[:2]
    return y3, y5


class _PairBN(torch.autograd.Function):
    """relu_depthwise_pair of the training-mode, non-affine BatchNorms of h3 and h5 for E pairs of one shape and
    dtype (a fused cell's group; one pair is a group of one), with batch statistics mean/rstd ([2, C] fp32,
    treated as functions of h: the backward's `bn_backward` flows through them, as aten's batch-norm backward
    does). `stats` per pair: (mean, rstd), or (tile statistics, rows) to merge them from in the forward launch."""

    @staticmethod
    def forward(ctx, eps, tile, stats, max_tile, *args):
        E = len(stats)
        h3s, w3s, h5s, w5s = (list(args[b * E:(b + 1) * E]) for b in range(4))
        tiles = [st for st, _ in stats]
        if tile == 0:  # given statistics (one pair)
            means, rstds = [st for st, _ in stats], [r for _, r in stats]
            ys = _fwd(h3s, [w3s, w5s, [], []], 1, False, h5s, means, rstds, max_tile)
            res = [t for e in range(E) for t in (ys[6 * e], ys[6 * e + 1], means[e], rstds[e], None)]
        else:
            rows = [r for _, r in stats]
            step = rows[1][0] - rows[0][0] if E > 1 else 0
            if all(st is tiles[0] for st in tiles) and all(r == (rows[0][0] + e * step, rows[0][1] + e * step)
                                                           for e, r in enumerate(rows)):  # the fused cell's: one launch
                res = torch.ops.milenas_fast.stencil_fwd(h3s, w3s, w5s, [], [], 1, False, h5s, [], [], tiles[0],
                                                         list(rows[0]), step, tile, eps, max_tile)
            else:
                res = [t for e in range(E) for t in torch.ops.milenas_fast.stencil_fwd(
                    [h3s[e]], [w3s[e]], [w5s[e]], [], [], 1, False, [h5s[e]], [], [], tiles[e], list(rows[e]), 0, tile,
                    eps, max_tile)]
        outs, saved = [], []
        for e in range(E):
            y3, y5, mean, rstd, var = res[5 * e:5 * e + 5]
            outs += [y3, y5] if var is None else [y3, y5, mean, var]
            saved += [h3s[e], w3s[e], w5s[e], h5s[e], mean, rstd]
            if var is not None:
                ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(*saved)
        ctx.E, ctx.eps, ctx.per, ctx.max_tile = E, eps, 2 if tile == 0 else 4, max_tile
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        E, saved, n = ctx.E, ctx.saved_tensors, ctx.needs_input_grad[4:]
        pairs = [saved[6 * e:6 * e + 6] for e in range(E)]
        needs = [tuple(n[b * E + e] for b in range(4)) for e in range(E)]
        g3s, g5s = grads[0::ctx.per], grads[1::ctx.per]
        full = [e for e in range(E) if g3s[e] is not None and g5s[e] is not None]
        dh, dw = [None] * E, [None] * E
        es = [e for e in full if needs[e][0] and needs[e][2]]
        if len(es) > 1:  # the normalised inputs' gradients, then the inner BNs' backward: one launch each
            h3, w3, w5, h5, mean, rstd = zip(*(pairs[e] for e in es))
            gm = torch.ops.milenas_fast.stencil_bwd_input(
                list(h3), list(w3), list(w5), [], [], [], [g3s[e] for e in es], [g5s[e] for e in es], [], [], [], [],
                1, [], list(h5), list(mean), list(rstd), ctx.max_tile)
            E2 = len(es)
            out = torch.ops.milenas_fast.bn_backward(
                [g for i in range(E2) for g in (gm[i], gm[E2 + i])], [h for i in range(E2) for h in (h3[i], h5[i])],
                [m[k] for m in mean for k in (0, 1)], [r[k] for r in rstd for k in (0, 1)])
            for i, e in enumerate(es):
                dh[e] = (out[2 * i], out[2 * i + 1])
        es = [e for e in full if needs[e][1] and needs[e][3]]
        if len(es) > 1:
            h3, _, _, h5, mean, rstd = zip(*(pairs[e] for e in es))
            d = torch.ops.milenas_fast.stencil_bwd_weight(
                list(h3), [g3s[e] for e in es], [g5s[e] for e in es], [], [], 1, list(h5), list(mean), list(rstd),
                ctx.max_tile)
            for i, e in enumerate(es):
                parts = split_taps(d[i], h3[0].shape[1], (True, True, False, False))
                dw[e] = tuple(p.to(w.dtype) for p, w in zip(parts, pairs[e][1:3]))
        grads_in = [_pair_grads(pairs[e], needs[e], g3s[e], g5s[e], ctx.eps, dh[e], dw[e], ctx.max_tile)
                    for e in range(E)]
        return (None, None, None, None, *(g[b] for b in range(4) for g in grads_in))


def _pair_grads(saved, n, g3, g5, eps: float, dh=None, dw=None, max_tile: int = 0) -> tuple:
    """A pair's gradients (h3, w3, h5, w5) for its saved (h3, w3, w5, h5, mean, rstd) and needs `n` (h3, w3, h5,
    w5); dh = (dh3, dh5) and dw = (gw3, gw5): the inputs' and the filters' gradients where a group's launches gave
    them already."""
    h3, w3, w5, h5, mean, rstd = saved
    needs = (n[0] and dh is None, n[1] and dw is None, n[3] and dw is None, False, False, n[2] and dh is None)
    gm3, gw3, gw5, _, _, gm5 = edge_grads([Saved(h3, w3, w5, None, None, None, h5, mean, rstd)], 1, [needs],
                                          [(g3, g5, None, None, None, None)], [None], max_tile)[0]
    gw3, gw5 = dw or (gw3, gw5)
    if dh is not None:
        dh3, dh5 = dh
    elif gm3 is not None and gm5 is not None:  # both BNs' backward in one kernel
        dh3, dh5 = bn_backward(gm3, gm5, h3, h5, mean, rstd)
    else:
        dh3, dh5 = (None if g is None else
                    torch.ops.aten.native_batch_norm_backward(g, h, None, None, None, mean[k], rstd[k], True,
                                                              eps, [True, False, False])[0]
                    for k, (g, h) in enumerate(((gm3, h3), (gm5, h5))))
    return dh3, gw3, dh5, gw5


def relu_depthwise_pair_bn(h3: torch.Tensor, w3: torch.Tensor, h5: torch.Tensor, w5: torch.Tensor,
                           mean: torch.Tensor, rstd: torch.Tensor, eps: float, *, max_tile: int = 0) -> tuple:
    """relu_depthwise_pair(BN(h3), w3, BN(h5), w5) for training-mode non-affine BatchNorms whose batch statistics
    are mean/rstd ([2, C] fp32: h3's row 0, h5's row 1; `bn_stats`), without writing BN(h): the kernels normalise
    as they load. The gradients flow through the statistics, as nn.BatchNorm2d's do."""
    return _PairBN.apply(eps, 0, [(mean.contiguous(), rstd.contiguous())], max_tile,
                         *(t.contiguous() for t in (h3, w3, h5, w5)))


def relu_depthwise_pair_bn_tiles(h3s: list, w3s: list, h5s: list, w5s: list, tile_stats: list, rows: list,
                                 tile: int, eps: float, *, max_tile: int = 0) -> list[tuple]:
    """`relu_depthwise_pair_bn` of E pairs of one shape and dtype (a fused cell's group; one pair is a group of one),
    with the statistics merged by the forward launch from each pair's producer's tile statistics (`pointwise(...,
    stats=...)`, rows `rows[e]`, tiles of `tile` pixels): [(y3, y5, mean, unbiased var)] per pair, the last two
    [2, C] fp32 for the running statistics. No statistics launch; one launch each way for all pairs."""
    E = len(h3s)
    out = _PairBN.apply(eps, tile, [(st, tuple(r)) for st, r in zip(tile_stats, rows)], max_tile,
                        *(t.contiguous() for t in (*h3s, *w3s, *h5s, *w5s)))
    return [tuple(out[4 * e:4 * e + 4]) for e in range(E)]


def relu_depthwise_pair_bn_reference(h3, w3, h5, w5, mean, rstd, eps):
    """Plain-PyTorch twin of `relu_depthwise_pair_bn` (F.batch_norm on h with its own batch statistics)."""
    bn = [F.batch_norm(h, None, None, training=True, eps=eps) for h in (h3, h5)]
    return relu_depthwise_reference(bn[0], w3), relu_depthwise_reference(bn[1], w5)


def relu_depthwise_reference(x: torch.Tensor, w: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Plain-PyTorch twin of `relu_depthwise`."""
    k = w.shape[-1]
    return F.conv2d(F.relu(x), w.to(x.dtype), stride=stride, padding=k // 2, groups=x.shape[1])


def stencil_reference(x: torch.Tensor, w3: Optional[torch.Tensor], w5: Optional[torch.Tensor],
                      wd3: Optional[torch.Tensor], wd5: Optional[torch.Tensor], stride: int, pools: bool = True,
                      x5: Optional[torch.Tensor] = None):
    """Plain-PyTorch twin of `stencil` (same six outputs, None for skipped branches, same autograd)."""
    C = x.shape[1]
    r = F.relu(x)

    def dw(w, pad, dil, r=r):
        return None if w is None else F.conv2d(r, w.to(x.dtype), stride=stride, padding=pad, dilation=dil, groups=C)

    pooled = (F.max_pool2d(x, 3, stride, 1), F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)) if pools \
        else (None, None)
    return (dw(w3, 1, 1), dw(w5, 2, 1, r if x5 is None else F.relu(x5)), dw(wd3, 2, 2), dw(wd5, 4, 2), *pooled)
