"""The multi-stencil op: six mixed-op candidates' first stages from one read of the edge input.

    y3, y5, yd3, yd5, ymax, yavg = stencil(x, w3, w5, wd3, wd5, stride, pools=True, x5=None)
    y = relu_depthwise(x, w, stride=1)
    y3, y5 = relu_depthwise_pair(x3, w3, x5, w5)
    y3, y5 = relu_depthwise_pair_bn(h3, w3, h5, w5, mean, rstd, eps)   (of BN(h3), BN(h5): batch statistics)
    y3, y5, mean, var = relu_depthwise_pair_bn_tiles(h3, w3, h5, w5, tile_stats, rows, tile, eps)
    xid, y3, y5, yd3, yd5, ymax, yavg = stencil_with_identity(x, w3, w5, wd3, wd5, stride, pools=True)

y3/y5/yd3/yd5: ReLU → depthwise (3×3 pad 1, 5×5 pad 2, 3×3 dil 2 pad 2, 5×5 dil 2 pad 4; stride s);
ymax/yavg: 3×3 max / avg pool (stride s, pad 1, count_include_pad=False) of the raw input.
Filters are [C, 1, k, k]. Outputs have x's dtype (fp32 accumulation); filter gradients the filters'.
A filter given as None (a MixedOp without that candidate) skips its branch: no loads, FLOPs or stores
in any kernel, no zero filter, and its output is None; `pools=False` skips both pools likewise.
`relu_depthwise` is ReLU → depthwise k×k (k 3 or 5, pad k//2, dilation 1): the sep convs' second stage,
the same kernels with the one branch selected. With `x5` the 5×5 branch reads x5 instead of x (its gradient goes
to x5): `relu_depthwise_pair` computes both sep convs' second stages in one launch each way;
`relu_depthwise_pair_bn` the same from the inner BatchNorms' inputs and batch statistics (normalised as loaded:
the BN outputs are never written; its backward ends with `bn_backward`); `relu_depthwise_pair_bn_tiles` (the fused
MixedOp's) merges those statistics itself from the producing `pointwise` launch's tile statistics.

Registered ops (opaque custom ops: every kernel takes tuples of pointers, which torch.compile's Triton tracing does not
take); an absent branch is None on input and a 0-element tensor on output:
    milenas_fast::stencil_fwd(x, w3?, w5?, wd3?, wd5?, stride, pools, x5?, mean?, rstd?) -> 6 tensors
    milenas_fast::stencil_fwd_group(xs, w3s, w5s, wd3s, wd5s, stride, pools) -> 6·E tensors (E inputs, one launch)
    milenas_fast::stencil_bwd_input(x, w3?, w5?, wd3?, wd5?, ymax?, g3?, g5?, gd3?, gd5?, gmax?, gavg?, stride, x5?,
        gacc?, mean?, rstd?) -> dx (+ gacc), dx5 (0-element without x5)
    milenas_fast::stencil_bwd_weight(x, g3?, g5?, gd3?, gd5?, stride, x5?, mean?, rstd?) -> dw [Σ C·k²]
        (fp32: the given gradients' branches' filter gradients one after another, w3 | w5 | wd3 | wd5, each [C, k²])
    milenas_fast::stencil_fwd_bn_group, stencil_bwd_input_group, stencil_bwd_weight_group: the same for E edges
        (lists) in one launch (`stencil_group`'s backward; the fused cell's pairs, `relu_depthwise_pair_bn_tiles_group`)
The two backward halves are separate ops so that α-only passes (no filter gradients wanted) and
frozen inputs skip the work they do not need. mean/rstd ([2, C] fp32, rows for x and x5; no pools): the inputs
are normalised as loaded, and dx/dx5 are the gradients of the normalised values. `stencil_reference` and
`relu_depthwise_reference` are the plain-PyTorch twins.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F

from milenas_fast.kernels import stencil as K

from .bn_fold import bn_backward
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


GROUP_TILE = 512  # stencil_fwd_group's largest tile on the GPU, at 2 elements per thread (see group_config)


def group_config(shape, stride: int, tile: int | None = None, kernel: str = "fwd"):
    """`launch_config` of the group ops (stencil_fwd_group, ..._bwd_input_group, ..._bwd_weight_group): their
    pointers are picked per program (registers, not kernel parameters), and at the whole-plane fp32 forward
    configuration ptxas (Triton 3.8) spilled; tiles of at most GROUP_TILE elements at 2 per thread do not
    (tests/test_sm90.py). The input gradient's group takes the per-edge tiles."""
    if kernel == "bwd_input":  # the per-edge tiles; at stride 2 at most 2 elements per thread, 16 warps (ptxas of
        # Triton 3.6 spilled at stride 2 with 8 warps, whether 2 or 4 elements per thread)
        p, hw, grid, warps = launch_config(kernel, shape, stride, tile)
        return p, hw, grid, max(warps, min(16, p * hw // 32)) if stride > 1 else warps
    N, C, H, W = shape
    pixels = out_size(H, stride) * out_size(W, stride)
    if tile is None:  # the interpreter's large tiles (few programs) stay; the GPU's are capped
        t = MAX_TILE if _INTERPRET else min(MAX_TILE, GROUP_TILE)
    else:  # an explicit GPU tile (tests/test_sm90.py asks for the GPU's configurations under the interpreter)
        t = min(tile, GROUP_TILE)
    hw = min(triton_next_pow2(pixels), t)
    p = max(1, min(triton_next_pow2(N * C), t // hw))
    return p, hw, (triton_cdiv(N * C, p), triton_cdiv(pixels, hw)), max(1, min(8, p * hw // 64))


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


KSIZE = (3, 5, 3, 5)  # filter size of each convolution branch: w3, w5, wd3, wd5
MAX_EDGES = 8  # stencil_fwd_group's inputs per launch: a DARTS cell's edges leaving s0 and s1


def _check(x, ws, x5=None):
    assert x.dim() == 4 and x.is_contiguous(), "x must be NCHW contiguous"
    assert x5 is None or (x5.shape == x.shape and x5.dtype == x.dtype and x5.is_contiguous() and ws[1] is not None), \
        "x5 must be contiguous, of x's shape and dtype, and come with w5"
    C = x.shape[1]
    for w, k in zip(ws, KSIZE):
        assert w is None or (w.shape == (C, 1, k, k) and w.is_contiguous()), \
            f"filter must be [{C}, 1, {k}, {k}] contiguous"


def _check_norm(x, pools, mean, rstd):
    assert (mean is None) == (rstd is None), "mean and rstd come together"
    assert mean is None or (not pools and mean.shape == rstd.shape == (2, x.shape[1]) and mean.dtype == rstd.dtype
                            == torch.float32 and mean.is_contiguous() and rstd.is_contiguous()), \
        "mean/rstd must be [2, C] fp32 contiguous, without pools"


def _present(ts):
    """The kernels' HAS flags for optional tensors."""
    return [t is not None for t in ts]


def _or(ts, default):
    """Absent branches' pointers: any tensor does, the kernel never touches them."""
    return [default if t is None else t for t in ts]


@_register("milenas_fast::stencil_fwd", traceable=False)  # tuples of pointers
def stencil_fwd(x: torch.Tensor, w3: Optional[torch.Tensor], w5: Optional[torch.Tensor],
                wd3: Optional[torch.Tensor], wd5: Optional[torch.Tensor], stride: int,
                pools: bool = True, x5: Optional[torch.Tensor] = None, mean: Optional[torch.Tensor] = None,
                rstd: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ws = (w3, w5, wd3, wd5)
    _check(x, ws, x5)
    _check_norm(x, pools, mean, rstd)
    N, C, H, W = x.shape
    HO, WO = out_size(H, stride), out_size(W, stride)
    has = _present(ws) + [pools, pools]
    ys = [x.new_empty((N, C, HO, WO) if h else (0,)) for h in has]
    bp, bhw, grid, warps = launch_config("fwd", x.shape, stride)
    _launch(
        K.stencil_fwd_kernel, (*grid, 1), *_one(x, x if x5 is None else x5, *_or(ws, x), *ys, *_or((mean, rstd), x), x),
        x, N * C, C, H, W, HO, WO, 1, 1, 1, 0, 0, 0, 0.0, *has,
        X5=x5 is not None, NORM=mean is not None, STRIDE=stride, BLOCK_P=bp, BLOCK_HW=bhw, E=1, num_warps=warps)
    return tuple(ys)


def _one(*ts) -> list[tuple]:
    """stencil_fwd_kernel's per-edge pointer tuples for one edge."""
    return [(t,) for t in ts]


@_register("milenas_fast::stencil_fwd_group", traceable=False)  # tuples of pointers
def stencil_fwd_group(xs: list[torch.Tensor], w3: list[torch.Tensor], w5: list[torch.Tensor],
                      wd3: list[torch.Tensor], wd5: list[torch.Tensor], stride: int, pools: bool) -> list[torch.Tensor]:
    """`stencil_fwd` of E inputs of one shape and dtype (a fused cell's group of edges), each with its own filters,
    in ONE launch: 6·E outputs, edge by edge. A filter list is empty where its branch is absent (for every edge)."""
    E = len(xs)
    wss = [w3, w5, wd3, wd5]
    if not 1 <= E <= MAX_EDGES or any(len(w) not in (0, E) for w in wss):
        raise ValueError(f"stencil_fwd_group: 1 to {MAX_EDGES} inputs, each filter list empty or one per input")
    _check_group(xs, wss)
    N, C, H, W = xs[0].shape
    HO, WO = out_size(H, stride), out_size(W, stride)
    has = [bool(w) for w in wss] + [pools, pools]
    ys = [[x.new_empty((N, C, HO, WO) if h else (0,)) for h in has] for x in xs]
    bp, bhw, grid, warps = group_config(xs[0].shape, stride)
    per = [tuple(xs), tuple(xs), *(tuple(w) if w else tuple(xs) for w in wss),
           *(tuple(y[b] for y in ys) for b in range(6)), *(tuple(xs),) * 3]
    _launch(K.stencil_fwd_kernel, (*grid, E), *per, xs[0], N * C, C, H, W, HO, WO, 1, 1, 1, 0, 0, 0, 0.0, *has,
            X5=False, NORM=False, STRIDE=stride, BLOCK_P=bp, BLOCK_HW=bhw, E=E, num_warps=warps)
    return [y for out in ys for y in out]


def _check_group(xs, wss):
    for i, x in enumerate(xs):
        _check(x, [w[i] if w else None for w in wss])
        if x.shape != xs[0].shape or x.dtype != xs[0].dtype:
            raise ValueError("a stencil group's inputs must have one shape and dtype")


@_register("milenas_fast::stencil_fwd_bn", traceable=False)
def stencil_fwd_bn(h3: torch.Tensor, w3: torch.Tensor, h5: torch.Tensor, w5: torch.Tensor, tile_stats: torch.Tensor,
                   groups: list[int], tile: int, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pair's forward on BN(h3), BN(h5) with the statistics merged from `tile_stats` ([K, N·T, 2, C]: the
    producing `pointwise_with_stats`' per-tile statistics, rows `groups` = (h3's, h5's), tiles of `tile` pixels):
    (y3, y5, mean, rstd, unbiased var), the last three [2, C] fp32, written by the same launch."""
    return tuple(_fwd_bn([h3], [w3], [h5], [w5], tile_stats, groups, 0, tile, eps,
                         lambda shape: launch_config("fwd", shape, 1)))


@_register("milenas_fast::stencil_fwd_bn_group", traceable=False)
def stencil_fwd_bn_group(h3: list[torch.Tensor], w3: list[torch.Tensor], h5: list[torch.Tensor],
                         w5: list[torch.Tensor], tile_stats: torch.Tensor, groups: list[int], step: int, tile: int,
                         eps: float) -> list[torch.Tensor]:
    """`stencil_fwd_bn` of E pairs of one shape and dtype in ONE launch: pair e's statistics are the rows
    groups + e·step of the one `tile_stats`; (y3, y5, mean, rstd, unbiased var) per pair, pair by pair."""
    if not 1 <= len(h3) <= MAX_EDGES or any(len(t) != len(h3) for t in (w3, h5, w5)):
        raise ValueError(f"stencil_fwd_bn_group: 1 to {MAX_EDGES} pairs, each with both inputs and filters")
    return _fwd_bn(h3, w3, h5, w5, tile_stats, groups, step, tile, eps,
                   lambda shape: group_config(shape, 1))


def _fwd_bn(h3s, w3s, h5s, w5s, tile_stats, groups, step: int, tile: int, eps: float, config) -> list:
    """stencil_fwd_kernel with NORM 2 for E pairs (lists) in one launch; the ops' checks and outputs."""
    _check_group(h3s, [w3s, w5s, [], []])
    N, C, H, W = h3s[0].shape
    for h3, h5, w3, w5 in zip(h3s, h5s, w3s, w5s):
        _check(h3, (w3, w5, None, None), h5)
    k, r = tile_stats.shape[:2]
    E = len(h3s)
    rows = [g + e * step for g in groups for e in range(E)]
    if tile_stats.shape[2:] != (2, C) or tile_stats.dtype != torch.float32 or r % max(N, 1) or len(groups) != 2 \
            or not 0 <= min(rows) <= max(rows) < k:
        raise ValueError(f"stencil_fwd_bn: tile_stats must be float32 [K, N·T, 2, {C}], groups two of its rows")
    ys = [[h.new_empty(N, C, H, W) for _ in range(2)] for h in h3s]
    stats = [[h3s[0].new_empty(2, C, dtype=torch.float32) for _ in range(3)] for _ in h3s]
    if h3s[0].numel():
        bp, bhw, grid, warps = config(h3s[0].shape)
        any_ = tuple(h3s)  # also the absent branches' pointers
        _launch(K.stencil_fwd_kernel, (*grid, E), any_, tuple(h5s), tuple(w3s), tuple(w5s), any_, any_,
                *(tuple(y[b] for y in ys) for b in range(2)), any_, any_, any_, any_,
                *(tuple(s[b] for s in stats) for b in range(3)), tile_stats.contiguous(), N * C, C, H, W, H, W, r,
                r // N, tile, groups[0], groups[1], step, eps, True, True, False, False, False, False, X5=True,
                NORM=2, STRIDE=1, BLOCK_P=bp, BLOCK_HW=bhw, E=E, num_warps=warps)
    return [t for y, st in zip(ys, stats) for t in (*y, *st)]


def _bwd_input(xs, x5s, wss, ymaxs, gss, gaccs, means, rstds, stride: int, config) -> tuple[list, list]:
    """stencil_bwd_input_kernel for E edges in one launch: every argument a list of E (None: absent for every
    edge; wss/gss: the four filters' and six gradients' lists); (dxs, dx5s), dx5s None without x5."""
    x, E = xs[0], len(xs)
    N, C, H, W = x.shape
    dxs = [torch.empty_like(t) for t in xs]
    dx5s = [torch.empty_like(t) for t in xs] if x5s[0] is not None else [None] * E
    bp, bhw, grid, warps = config(x.shape, stride)

    def tup(ts):
        return tuple(xs if ts[0] is None else ts)

    _launch(K.stencil_bwd_input_kernel, (*grid, E), tup(xs), tup(x5s), *map(tup, wss), tup(ymaxs), *map(tup, gss),
            tup(gaccs), tup(dxs), tup(dx5s), tup(means), tup(rstds), N * C, C, H, W, out_size(H, stride),
            out_size(W, stride), *(g[0] is not None for g in gss), X5=x5s[0] is not None, HASACC=gaccs[0] is not None,
            NORM=means[0] is not None, STRIDE=stride, BLOCK_P=bp, BLOCK_HW=bhw, E=E, num_warps=warps)
    return dxs, dx5s


@_register("milenas_fast::stencil_bwd_input", traceable=False)  # tuples of pointers
def stencil_bwd_input(x: torch.Tensor, w3: Optional[torch.Tensor], w5: Optional[torch.Tensor],
                      wd3: Optional[torch.Tensor], wd5: Optional[torch.Tensor], ymax: Optional[torch.Tensor],
                      g3: Optional[torch.Tensor], g5: Optional[torch.Tensor], gd3: Optional[torch.Tensor],
                      gd5: Optional[torch.Tensor], gmax: Optional[torch.Tensor], gavg: Optional[torch.Tensor],
                      stride: int, x5: Optional[torch.Tensor] = None, gacc: Optional[torch.Tensor] = None,
                      mean: Optional[torch.Tensor] = None, rstd: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dx5) from the given output gradients (a branch without its gradient, or without its filter or ymax,
    costs nothing); dx5 (x5's, the 5×5 branch's input when given) is 0-element without x5 or g5. `gacc` (x's
    shape): a gradient of x from elsewhere, added into dx in the same pass."""
    gs = [g.contiguous() if g is not None and need is not None else None
          for g, need in zip((g3, g5, gd3, gd5, gmax, gavg), (w3, w5, wd3, wd5, ymax, ymax))]  # ymax: pools ran
    split = x5 is not None and gs[1] is not None
    dxs, dx5s = _bwd_input([x], [x5 if split else None], [[w] for w in (w3, w5, wd3, wd5)],
                           [ymax.contiguous() if gs[4] is not None else None], [[g] for g in gs],
                           [None if gacc is None else gacc.contiguous()], [mean], [rstd], stride,
                           lambda shape, s: launch_config("bwd_input", shape, s))
    return dxs[0], dx5s[0] if split else x.new_empty((0,))


@_register("milenas_fast::stencil_bwd_input_group", traceable=False)
def stencil_bwd_input_group(xs: list[torch.Tensor], w3: list[torch.Tensor], w5: list[torch.Tensor],
                            wd3: list[torch.Tensor], wd5: list[torch.Tensor], ymax: list[torch.Tensor],
                            g3: list[torch.Tensor], g5: list[torch.Tensor], gd3: list[torch.Tensor],
                            gd5: list[torch.Tensor], gmax: list[torch.Tensor], gavg: list[torch.Tensor], stride: int,
                            gacc: list[torch.Tensor], x5: list[torch.Tensor], mean: list[torch.Tensor],
                            rstd: list[torch.Tensor]) -> list[torch.Tensor]:
    """`stencil_bwd_input` of E edges of one shape and dtype (a stencil group's, or pairs' with x5 and mean/rstd) in
    ONE launch: each edge's dx (then, with x5, each one's dx5). A list is empty where that part is absent for every
    edge (a gradient counts only with its filter; gmax/gavg with ymax; with x5, g5 goes to dx5 and must be given)."""
    E = len(xs)
    lists = [w3, w5, wd3, wd5, ymax, g3, g5, gd3, gd5, gmax, gavg, gacc, x5, mean, rstd]
    if not 1 <= E <= MAX_EDGES or any(len(t) not in (0, E) for t in lists):
        raise ValueError(f"stencil_bwd_input_group: 1 to {MAX_EDGES} inputs, each list empty or one per input")
    _check_group(xs, [w3, w5, wd3, wd5])
    ws = [w if w else [None] * E for w in (w3, w5, wd3, wd5)]
    gss = [[t.contiguous() for t in g] if g and need[0] is not None else [None] * E
           for g, need in zip((g3, g5, gd3, gd5, gmax, gavg), (*ws, ymax or [None], ymax or [None]))]
    if x5 and gss[1][0] is None:
        raise ValueError("stencil_bwd_input_group: x5 comes with g5")
    dxs, dx5s = _bwd_input(xs, x5 or [None] * E, ws, ymax if gss[4][0] is not None else [None] * E, gss,
                           [t.contiguous() for t in gacc] if gacc else [None] * E, mean or [None] * E,
                           rstd or [None] * E, stride, lambda shape, s: group_config(shape, s, kernel="bwd_input"))
    return dxs + (dx5s if x5 else [])


def _bwd_weight(xs, x5s, gss, means, rstds, stride: int, config) -> torch.Tensor:
    """stencil_bwd_weight_kernel for E edges in one launch (lists of E, None: absent for every edge): the fp32
    filter gradients [E, Σ C·k²] (the present branches' blocks, w3 | w5 | wd3 | wd5), summed over tiles and the
    batch in order."""
    x, E = xs[0], len(xs)
    N, C, H, W = x.shape
    taps = sum(k * k for g, k in zip(gss, KSIZE) if g[0] is not None)
    bp, bhw, grid, warps = config(x.shape, stride)
    part = x.new_empty(E, grid[1] * N, C * taps, dtype=torch.float32)  # every program stores all its taps

    def tup(ts):
        return tuple(xs if ts[0] is None else ts)

    _launch(K.stencil_bwd_weight_kernel, (*grid, E), tup(xs), tup(x5s), *map(tup, gss), part, tup(means), tup(rstds),
            N * C, C, H, W, out_size(H, stride), out_size(W, stride), *(g[0] is not None for g in gss),
            X5=x5s[0] is not None and gss[1][0] is not None, NORM=means[0] is not None, STRIDE=stride, BLOCK_P=bp,
            BLOCK_HW=bhw, E=E, num_warps=warps)
    # Deterministic second stage: an ordered sum over pixel tiles and the batch, in fp32.
    return part.sum(dim=1)


@_register("milenas_fast::stencil_bwd_weight", traceable=False)  # tuples of pointers
def stencil_bwd_weight(x: torch.Tensor, g3: Optional[torch.Tensor], g5: Optional[torch.Tensor],
                       gd3: Optional[torch.Tensor], gd5: Optional[torch.Tensor], stride: int,
                       x5: Optional[torch.Tensor] = None, mean: Optional[torch.Tensor] = None,
                       rstd: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 filter gradients of the branches whose output gradient is given, flat: one contiguous [C, k²]
    block per branch in the order w3 | w5 | wd3 | wd5 (`split_taps` parts them without a copy; the caller
    casts to the filters' dtype). The 5×5 branch reads x5 where given."""
    gs = [[None if g is None else g.contiguous()] for g in (g3, g5, gd3, gd5)]
    return _bwd_weight([x], [x5], gs, [mean], [rstd], stride,
                       lambda shape, s: launch_config("bwd_weight", shape, s))[0]


@_register("milenas_fast::stencil_bwd_weight_group", traceable=False)
def stencil_bwd_weight_group(xs: list[torch.Tensor], g3: list[torch.Tensor], g5: list[torch.Tensor],
                             gd3: list[torch.Tensor], gd5: list[torch.Tensor], stride: int, x5: list[torch.Tensor],
                             mean: list[torch.Tensor], rstd: list[torch.Tensor]) -> torch.Tensor:
    """`stencil_bwd_weight` of E edges of one shape and dtype in ONE launch (and one sum): [E, Σ C·k²] fp32, row e
    edge e's. A list is empty where that part is absent for every edge (a branch that wants no filter gradient)."""
    E = len(xs)
    if not 1 <= E <= MAX_EDGES or any(len(g) not in (0, E) for g in (g3, g5, gd3, gd5, x5, mean, rstd)):
        raise ValueError(f"stencil_bwd_weight_group: 1 to {MAX_EDGES} inputs, each list empty or one per input")
    _check_group(xs, [[]] * 4)
    gss = [[t.contiguous() for t in g] if g else [None] * E for g in (g3, g5, gd3, gd5)]
    return _bwd_weight(xs, x5 or [None] * E, gss, mean or [None] * E, rstd or [None] * E, stride,
                       lambda shape, s: group_config(shape, s, kernel="bwd_weight"))


def split_taps(dw: torch.Tensor, C: int, present) -> list:
    """stencil_bwd_weight's flat result as one contiguous [C, 1, k, k] view per present branch, None
    elsewhere (autograd's AccumulateGrad then keeps it as the .grad, no copy)."""
    parts = iter(torch.split(dw, [C * k * k for k, p in zip(KSIZE, present) if p]))
    return [next(parts).view(C, 1, k, k) if p else None for k, p in zip(KSIZE, present)]


def _setup_context(ctx, inputs, output):
    x, w3, w5, wd3, wd5, stride, pools, *rest = inputs
    x5, mean, rstd = (list(rest) + [None] * 3)[:3]
    # ymax: the argmax in backward
    ctx.save_for_backward(x, w3, w5, wd3, wd5, output[4] if pools else None, x5, mean, rstd)
    ctx.stride = stride
    # Unused outputs (skipped branches' 0-element ones included) get None, not zero tensors to launch
    # fills for: their branches then cost nothing in backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, g3, g5, gd3, gd5, gmax, gavg, gacc=None, needs=None):
    """The op's gradients (x, 4 filters, stride, pools, x5, mean, rstd: the statistics are constants here);
    `gacc`: x's gradient from elsewhere, added in; `needs`: the op's needs_input_grad where ctx is another
    Function's."""
    return _grads(ctx.saved_tensors, ctx.stride, ctx.needs_input_grad if needs is None else needs,
                  (g3, g5, gd3, gd5, gmax, gavg), gacc)


def _grads(saved, stride: int, needs, grads, gacc=None):
    """`_backward` for the saved (x, w3, w5, wd3, wd5, ymax, x5, mean, rstd) and output gradients."""
    x, w3, w5, wd3, wd5, ymax, x5, mean, rstd = saved
    g3, g5, gd3, gd5, gmax, gavg = grads
    ws = (w3, w5, wd3, wd5)
    dx, dws, dx5 = None, [None] * 4, None
    want_x, want_x5 = needs[0], x5 is not None and needs[7] and g5 is not None
    if want_x or want_x5:
        # without x5, the 5×5 branch's gradient belongs to x; with it, to x5 (its branch is left out when x5
        # wants none, the others when x wants none)
        g5x = g5 if x5 is None or want_x5 else None
        gs = (g3, g5x, gd3, gd5, gmax, gavg) if want_x else (None, g5, None, None, None, None)
        dx, dx5 = torch.ops.milenas_fast.stencil_bwd_input(x, *ws, ymax, *gs, stride, x5,
                                                           gacc if want_x else None, mean, rstd)
        dx, dx5 = (dx if want_x else None), (dx5 if want_x5 else None)
    # only the filters that want a gradient and whose output has one (frozen filters: no kernel at all)
    gw = [g if w is not None and need else None
          for g, w, need in zip((g3, g5, gd3, gd5), ws, needs[1:5])]
    if any(g is not None for g in gw):
        dw = torch.ops.milenas_fast.stencil_bwd_weight(x, *gw, stride, x5, mean, rstd)
        dws = [d if d is None else d.to(w.dtype)  # a cast only where the filter is not fp32
               for d, w in zip(split_taps(dw, x.shape[1], _present(gw)), ws)]
    return (dx, *dws, None, None, dx5, None, None)


torch.library.register_autograd("milenas_fast::stencil_fwd", _backward, setup_context=_setup_context)


class _WithIdentity(torch.autograd.Function):
    """The stencil op, plus x itself as a first output whose gradient (the identity candidate's) the input-gradient
    kernel adds into dx: no separate add of the two per edge and backward pass."""

    @staticmethod
    def forward(ctx, x, w3, w5, wd3, wd5, stride, pools):
        ys = torch.ops.milenas_fast.stencil_fwd(x, w3, w5, wd3, wd5, stride, pools, None)
        _setup_context(ctx, (x, w3, w5, wd3, wd5, stride, pools), ys)
        return (x.view_as(x), *ys)

    @staticmethod
    def backward(ctx, gid, *gs):
        return _backward(ctx, *gs, gacc=gid)[:7]


class _Group(torch.autograd.Function):
    """`stencil_fwd_group` for E edges (x_e and its four filters each; a None filter: that branch absent for every
    edge), with each edge's x as a first output when `identity` (its gradient joins dx, as `_WithIdentity`'s). The
    backward is one input-gradient and one filter-gradient launch for all edges (more where the edges' gradients
    differ in which branches they have)."""

    @staticmethod
    def forward(ctx, stride, pools, identity, *args):
        E = len(args) // 5
        xs, wss = list(args[:E]), [list(args[E * (b + 1):E * (b + 2)]) for b in range(4)]
        ys = torch.ops.milenas_fast.stencil_fwd_group(xs, *([] if w[0] is None else w for w in wss), stride, pools)
        ctx.stride, ctx.E, ctx.identity = stride, E, identity
        ctx.save_for_backward(*xs, *(w for ws in wss for w in ws), *(ys[6 * e + 4] if pools else None
                                                                        for e in range(E)))
        ctx.set_materialize_grads(False)
        out = []
        for e in range(E):
            out += ([xs[e].view_as(xs[e])] if identity else []) + ys[6 * e:6 * e + 6]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        E, saved, n = ctx.E, ctx.saved_tensors, ctx.needs_input_grad[3:]
        per = 7 if ctx.identity else 6
        xs, ymaxs = saved[:E], saved[5 * E:6 * E]
        wss = [saved[E * (b + 1):E * (b + 2)] for b in range(4)]
        # Edges whose gradients have the same branches present share a launch (usually the whole group).
        wants_x, wants_w = {}, {}
        for e in range(E):
            g = grads[per * e:per * (e + 1)]
            gacc, g = (g[0], g[1:]) if ctx.identity else (None, g)
            if n[e]:  # a branch's gradient counts with its filter (the pools': with ymax)
                gs = [t if need is not None else None for t, need in zip(g, [w[e] for w in wss] + [ymaxs[e]] * 2)]
                wants_x.setdefault(tuple(_present(gs + [gacc])), []).append((e, gs, gacc))
            gw = [t if w[e] is not None and n[E * (b + 1) + e] else None for b, (t, w) in enumerate(zip(g, wss))]
            if any(t is not None for t in gw):
                wants_w.setdefault(tuple(_present(gw)), []).append((e, gw))
        dxs, dws = [None] * E, [[None] * E for _ in range(4)]
        for key, items in wants_x.items():
            es = [e for e, _, _ in items]
            ws = [[w[e] for e in es] if w[0] is not None else [] for w in wss]
            gs = [[it[1][b] for it in items] if key[b] else [] for b in range(6)]
            out = torch.ops.milenas_fast.stencil_bwd_input_group(
                [xs[e] for e in es], *ws, [ymaxs[e] for e in es] if key[4] or key[5] else [], *gs, ctx.stride,
                [it[2] for it in items] if key[6] else [], [], [], [])
            for e, dx in zip(es, out):
                dxs[e] = dx
        for key, items in wants_w.items():
            es = [e for e, _ in items]
            dw = torch.ops.milenas_fast.stencil_bwd_weight_group(
                [xs[e] for e in es], *([it[1][b] for it in items] if key[b] else [] for b in range(4)), ctx.stride,
                [], [], [])
            for row, e in enumerate(es):
                for b, d in enumerate(split_taps(dw[row], xs[e].shape[1], key)):
                    dws[b][e] = None if d is None else d.to(wss[b][e].dtype)
        return (None, None, None, *dxs, *(d for ws in dws for d in ws))


def stencil_group(xs: list[torch.Tensor], filters: list[tuple], stride: int, pools: bool, identity: bool) -> list:
    """[stencil(x, *f, stride, pools) (with x first: `stencil_with_identity`) for x, f in zip(xs, filters)] in one
    launch each way (inputs of one shape and dtype, up to MAX_EDGES; the same branches present in every edge)."""
    E = len(xs)
    args = [x.contiguous() for x in xs] + [_contiguous(f[b]) for b in range(4) for f in filters]
    out = _Group.apply(stride, pools, identity, *args)
    per = 7 if identity else 6
    res = []
    for e in range(E):
        o = out[per * e:per * (e + 1)]
        res.append(((o[0],) if identity else ()) + _outputs(o[-6:], filters[e], pools))
    return res


def _contiguous(t):
    return None if t is None else t.contiguous()


def _outputs(ys, ws, pools: bool) -> tuple:
    """The op's six outputs with the skipped branches' 0-element ones as None."""
    return tuple(y if has else None for y, has in zip(ys, _present(ws) + [pools, pools]))


def stencil_with_identity(x: torch.Tensor, w3: Optional[torch.Tensor], w5: Optional[torch.Tensor],
                          wd3: Optional[torch.Tensor], wd5: Optional[torch.Tensor], stride: int, pools: bool = True):
    """(x, *stencil(...)): x as an output of the op, so that its gradient joins dx inside the input-gradient
    kernel (a mixed op's identity candidate: stride 1, where tests/test_sm90.py checks that kernel for spills).
    Compiled code (torch.compile) gets x itself and the plain op (the compiler fuses the add)."""
    if torch.compiler.is_compiling():
        return (x, *stencil(x, w3, w5, wd3, wd5, stride, pools))
    ys = _WithIdentity.apply(x.contiguous(), *map(_contiguous, (w3, w5, wd3, wd5)), stride, pools)
    return (ys[0], *_outputs(ys[1:], (w3, w5, wd3, wd5), pools))


def stencil(x: torch.Tensor, w3: Optional[torch.Tensor], w5: Optional[torch.Tensor], wd3: Optional[torch.Tensor],
            wd5: Optional[torch.Tensor], stride: int, pools: bool = True, x5: Optional[torch.Tensor] = None):
    """The differentiable Triton op (gradients flow to x, x5 and the filters). A None filter (or pools=False)
    skips that branch: its output is None. `x5` (x's shape and dtype): the 5×5 branch's input instead of x."""
    ys = torch.ops.milenas_fast.stencil_fwd(x.contiguous(), *map(_contiguous, (w3, w5, wd3, wd5)), stride, pools,
                                            _contiguous(x5))
    return _outputs(ys, (w3, w5, wd3, wd5), pools)


def relu_depthwise(x: torch.Tensor, w: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """depthwise_conv(ReLU(x), w), w [C, 1, k, k] with k 3 or 5, padding k//2: `stencil` with one branch."""
    k = w.shape[-1]
    if k not in (3, 5):
        raise ValueError(f"relu_depthwise: filter size {k} (3 or 5 supported)")
    ws = (w, None) if k == 3 else (None, w)
    return stencil(x, *ws, None, None, stride, pools=False)[0 if k == 3 else 1]


def relu_depthwise_pair(x3: Optional[torch.Tensor], w3: Optional[torch.Tensor], x5: Optional[torch.Tensor],
                        w5: Optional[torch.Tensor]) -> tuple:
    """(relu_depthwise(x3, w3), relu_depthwise(x5, w5)) in one launch each way (the stencil's 3×3 branch on x3,
    its 5×5 branch on x5); a None input (with its filter) gives None."""
    if x3 is None or x5 is None:
        return (None if x3 is None else relu_depthwise(x3, w3)), (None if x5 is None else relu_depthwise(x5, w5))
    y3, y5 = stencil(x3, w3, w5, None, None, 1, pools=False, x5=x5)[:2]
    return y3, y5


class _PairBN(torch.autograd.Function):
    """relu_depthwise_pair of the training-mode, non-affine BatchNorms of h3 and h5 with batch statistics mean/rstd
    ([2, C] fp32, treated as functions of h: the backward's `bn_backward` flows through them, as aten's batch-norm
    backward does)."""

    @staticmethod
    def forward(ctx, h3, w3, h5, w5, stats, eps):
        """stats: (mean, rstd) [2, C] of h3 and h5, or (tile statistics, groups, tile) to merge them from."""
        if len(stats) == 2:
            mean, rstd = stats
            ys = torch.ops.milenas_fast.stencil_fwd(h3, w3, w5, None, None, 1, False, h5, mean, rstd)
            var = None
        else:
            y3, y5, mean, rstd, var = torch.ops.milenas_fast.stencil_fwd_bn(h3, w3, h5, w5, *stats, eps)
            ys = (y3, y5, None, None, None, None)
            ctx.mark_non_differentiable(mean, var)
        _setup_context(ctx, (h3, w3, w5, None, None, 1, False, h5, mean, rstd), ys)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return (ys[0], ys[1]) if var is None else (ys[0], ys[1], mean, var)

    @staticmethod
    def backward(ctx, g3, g5, *_):
        return (*_pair_grads(ctx.saved_tensors, ctx.needs_input_grad, g3, g5, ctx.eps), None, None)


def _pair_grads(saved, n, g3, g5, eps: float, dh=None, dw=None) -> tuple:
    """A pair's gradients (h3, w3, h5, w5) for its saved (h3, w3, w5, None, None, None, h5, mean, rstd) and needs
    `n` (h3, w3, h5, w5, ...); dh = (dh3, dh5) and dw = (gw3, gw5): the inputs' and the filters' gradients where
    a group's launches gave them already."""
    h3, w3, w5, _, _, _, h5, mean, rstd = saved
    # as the stencil op's (x, w3, w5, wd3, wd5, stride, pools, x5, mean, rstd)
    needs = (n[0] and dh is None, n[1] and dw is None, n[3] and dw is None, False, False, False, False,
             n[2] and dh is None, False, False)
    gm3, gw3, gw5, _, _, _, _, gm5, _, _ = _grads(saved, 1, needs, (g3, g5, None, None, None, None))
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


class _PairBNGroup(torch.autograd.Function):
    """`_PairBN` (statistics from tile statistics) for E edges of one shape and dtype: one forward launch (where
    their statistics are rows of one tile-statistics tensor, evenly spaced: the fused cell's; else one per edge),
    then for all edges whose pair wants every gradient (the search's; the others each their own, as `_PairBN`) one
    input-gradient launch, one `bn_backward` launch and one filter-gradient launch."""

    @staticmethod
    def forward(ctx, eps, tile, rows, *args):
        E = len(rows)
        h3s, w3s, h5s, w5s, sts = (args[b * E:(b + 1) * E] for b in range(5))
        step = rows[1][0] - rows[0][0] if E > 1 else 0
        if all(st is sts[0] for st in sts) and all(r == (rows[0][0] + e * step, rows[0][1] + e * step)
                                                   for e, r in enumerate(rows)):  # the fused cell's: one launch
            res = torch.ops.milenas_fast.stencil_fwd_bn_group(list(h3s), list(w3s), list(h5s), list(w5s), sts[0],
                                                              list(rows[0]), step, tile, eps)
        else:
            res = [t for e in range(E) for t in torch.ops.milenas_fast.stencil_fwd_bn(
                h3s[e], w3s[e], h5s[e], w5s[e], sts[e], list(rows[e]), tile, eps)]
        outs, saved = [], []
        for e in range(E):
            y3, y5, mean, rstd, var = res[5 * e:5 * e + 5]
            outs += [y3, y5, mean, var]
            saved += [h3s[e], w3s[e], w5s[e], None, None, None, h5s[e], mean, rstd]  # as `_PairBN` saves them
            ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(*saved)
        ctx.E, ctx.eps = E, eps
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        E, saved, n = ctx.E, ctx.saved_tensors, ctx.needs_input_grad[3:]
        pairs = [saved[9 * e:9 * e + 9] for e in range(E)]
        needs = [tuple(n[b * E + e] for b in range(4)) for e in range(E)]
        g3s, g5s = grads[0::4], grads[1::4]
        full = [e for e in range(E) if g3s[e] is not None and g5s[e] is not None]
        dh, dw = [None] * E, [None] * E
        es = [e for e in full if needs[e][0] and needs[e][2]]
        if len(es) > 1:  # the normalised inputs' gradients, then the inner BNs' backward: one launch each
            h3, w3, w5, _, _, _, h5, mean, rstd = zip(*(pairs[e] for e in es))
            gm = torch.ops.milenas_fast.stencil_bwd_input_group(
                list(h3), list(w3), list(w5), [], [], [], [g3s[e] for e in es], [g5s[e] for e in es], [], [], [], [],
                1, [], list(h5), list(mean), list(rstd))
            E2 = len(es)
            out = torch.ops.milenas_fast.bn_backward(
                [g for i in range(E2) for g in (gm[i], gm[E2 + i])], [h for i in range(E2) for h in (h3[i], h5[i])],
                [m[k] for m in mean for k in (0, 1)], [r[k] for r in rstd for k in (0, 1)])
            for i, e in enumerate(es):
                dh[e] = (out[2 * i], out[2 * i + 1])
        es = [e for e in full if needs[e][1] and needs[e][3]]
        if len(es) > 1:
            h3, _, _, _, _, _, h5, mean, rstd = zip(*(pairs[e] for e in es))
            d = torch.ops.milenas_fast.stencil_bwd_weight_group(
                list(h3), [g3s[e] for e in es], [g5s[e] for e in es], [], [], 1, list(h5), list(mean), list(rstd))
            for i, e in enumerate(es):
                parts = split_taps(d[i], h3[0].shape[1], (True, True, False, False))
                dw[e] = tuple(p.to(w.dtype) for p, w in zip(parts, pairs[e][1:3]))
        grads_in = [_pair_grads(pairs[e], needs[e], g3s[e], g5s[e], ctx.eps, dh[e], dw[e]) for e in range(E)]
        return (None, None, None, *(g[b] for b in range(4) for g in grads_in), *([None] * E))


def relu_depthwise_pair_bn(h3: torch.Tensor, w3: torch.Tensor, h5: torch.Tensor, w5: torch.Tensor,
                           mean: torch.Tensor, rstd: torch.Tensor, eps: float) -> tuple:
    """relu_depthwise_pair(BN(h3), w3, BN(h5), w5) for training-mode non-affine BatchNorms whose batch statistics
    are mean/rstd ([2, C] fp32: h3's row 0, h5's row 1; `bn_stats`), without writing BN(h): the kernels normalise
    as they load. The gradients flow through the statistics, as nn.BatchNorm2d's do."""
    return _PairBN.apply(h3.contiguous(), w3.contiguous(), h5.contiguous(), w5.contiguous(),
                         (mean.contiguous(), rstd.contiguous()), eps)


def relu_depthwise_pair_bn_tiles(h3: torch.Tensor, w3: torch.Tensor, h5: torch.Tensor, w5: torch.Tensor,
                                 tile_stats: torch.Tensor, groups: tuple[int, int], tile: int, eps: float) -> tuple:
    """`relu_depthwise_pair_bn` with the statistics merged by the same launch from the producer's tile statistics
    (`pointwise(..., stats=...)`): (y3, y5, mean, unbiased var), the last two [2, C] fp32 for the running
    statistics. No statistics launch."""
    return _PairBN.apply(h3.contiguous(), w3.contiguous(), h5.contiguous(), w5.contiguous(),
                         (tile_stats, list(groups), tile), eps)


def relu_depthwise_pair_bn_tiles_group(h3s: list, w3s: list, h5s: list, w5s: list, tile_stats: list, rows: list,
                                       tile: int, eps: float) -> list[tuple]:
    """`relu_depthwise_pair_bn_tiles` for E edges of one shape and dtype (a fused cell's group), each with its own
    tile statistics and rows: [(y3, y5, mean, var)] per edge. Their backward takes one launch each way for all."""
    E = len(h3s)
    out = _PairBNGroup.apply(eps, tile, [tuple(r) for r in rows], *(t.contiguous() for t in (*h3s, *w3s, *h5s, *w5s)),
                             *tile_stats)
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
