"""How the Triton ops tile their work: block sizes, grids and warps of every launcher, in one place.

Largest tiles (elements of one program): on the GPU 1024 covers a whole 32×32 plane with 4 warps (stencil,
edge_reduce, bn_fold) and 4096 the larger operand of a pointwise program; the interpreter pays per program, so
there one program takes (nearly) everything. The stencil ops take a smaller largest tile as an argument
(`max_tile`, from Kernels.max_tile or $MILENAS_FAST_MAX_TILE): tests use it to run many programs in both grid
dimensions under the interpreter, as the GPU does. Nothing here changes at run time.
"""
from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU_MAX_TILE = 1024
_MAX_TILE_ENV = "MILENAS_FAST_MAX_TILE"


def pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_tile(value, what: str = "max_tile") -> int:
    n = int(value)
    if n < 4 or n & (n - 1):
        raise ValueError(f"{what}={value!r}: must be a power of two >= 4")
    return n


# the stencil's
MAX_TILE = check_tile(os.environ.get(_MAX_TILE_ENV, 1 << 16 if INTERPRET else GPU_MAX_TILE), _MAX_TILE_ENV)
PLANE_TILE = 1 << 16 if INTERPRET else GPU_MAX_TILE  # edge_reduce's and bn_fold's
GPU_POINTWISE_TILE = 4096  # elements of the larger operand per pointwise program
POINTWISE_TILE = 1 << 16 if INTERPRET else GPU_POINTWISE_TILE


# --- the stencil ---------------------------------------------------------------------------------------------
def out_size(n: int, stride: int) -> int:
    return (n - 1) // stride + 1  # the same for all six branches (each "same"-padded)


def launch_config(kernel: str, shape, stride: int, tile: int | None = None):
    """(BLOCK_P, BLOCK_HW, grid, num_warps) of one edge's stencil `kernel` ("fwd", "bwd_input", "bwd_weight") on
    an NCHW input of `shape`; `tile` defaults to the current limit."""
    N, C, H, W = shape
    pixels = H * W if kernel == "bwd_input" else out_size(H, stride) * out_size(W, stride)
    return _stencil_blocks(N * C, pixels, MAX_TILE if tile is None else tile)


GROUP_TILE = 512  # a group's (E > 1) largest stencil tile on the GPU, at 2 elements per thread (see group_config)


def group_config(shape, stride: int, tile: int | None = None, kernel: str = "fwd"):
    """`launch_config` of a group of E > 1 edges: their pointers are picked per program (registers, not kernel
    parameters), and at the whole-plane fp32 forward configuration ptxas (Triton 3.8) spilled; tiles of at most
    GROUP_TILE elements at 2 per thread do not (tests/test_sm90.py). The input gradient's group takes the per-edge
    tiles."""
    if kernel == "bwd_input":  # the per-edge tiles; at stride 2 at most 2 elements per thread, 16 warps (ptxas of
        # Triton 3.6 spilled at stride 2 with 8 warps, whether 2 or 4 elements per thread)
        p, hw, grid, warps = launch_config(kernel, shape, stride, tile)
        return p, hw, grid, max(warps, min(16, p * hw // 32)) if stride > 1 else warps
    N, C, H, W = shape
    pixels = out_size(H, stride) * out_size(W, stride)
    if tile is None:  # the interpreter's large tiles (few programs) stay; the GPU's are capped
        t = MAX_TILE if INTERPRET else min(MAX_TILE, GROUP_TILE)
    else:  # an explicit GPU tile (tests/test_sm90.py asks for the GPU's configurations under the interpreter)
        t = min(tile, GROUP_TILE)
    hw = min(pow2(pixels), t)
    p = max(1, min(pow2(N * C), t // hw))
    return p, hw, (cdiv(N * C, p), cdiv(pixels, hw)), max(1, min(8, p * hw // 64))


def stencil_config(kernel: str, shape, stride: int, edges: int, max_tile: int = 0):
    """One edge takes the per-edge tiles; a group of edges picks its pointers per program, hence `group_config`.
    `max_tile` (0: MAX_TILE) limits the tile as the launchers' own limit does."""
    tile = check_tile(max_tile) if max_tile else None
    return launch_config(kernel, shape, stride, tile) if edges == 1 else group_config(shape, stride, tile, kernel)


def _stencil_blocks(planes: int, pixels: int, tile: int):
    hw = min(pow2(pixels), tile)
    # Several planes per program cost registers (per-plane filter vectors, 2-D indices): such programs take
    # half a tile at 2 elements per thread, others 4 (the forward keeps six fp32 accumulators and many
    # in-flight loads per element). ptxas for sm_90 (tests/test_sm90.py): no spills this way (the fp32
    # whole-plane forward uses all 255 registers); packed programs at 4 elements per thread spilled.
    p = max(1, min(pow2(planes), tile // 2 // hw))
    per_thread = 4 if p == 1 else 2
    return p, hw, (cdiv(planes, p), cdiv(pixels, hw)), max(1, min(8, p * hw // (32 * per_thread)))


# --- planes × pixels (edge_reduce, bn_fold) --------------------------------------------------------------------
def plane_config(planes: int, pixels: int, tile: int | None = None) -> tuple[int, int, tuple[int, int], int]:
    """(BLOCK_P, BLOCK_HW, grid, num_warps) for `planes` planes of `pixels` pixels."""
    tile = PLANE_TILE if tile is None else tile
    bhw = min(pow2(pixels), tile)
    bp = max(1, min(pow2(planes), tile // bhw))
    return bp, bhw, (cdiv(planes, bp), cdiv(pixels, bhw)), max(1, min(8, bp * bhw // 256))


def channel_config(c: int, pixels: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of a per-channel statistics program (bn_stats, bn_backward): the interpreter takes every
    channel at once; on the GPU at most a quarter tile of channels × pixels."""
    bhw = min(pow2(pixels), PLANE_TILE)
    bc = pow2(c) if INTERPRET else max(1, min(pow2(c), PLANE_TILE // bhw // 4))
    return bc, bhw


# --- pointwise ------------------------------------------------------------------------------------------------
def pointwise_blocks(a: int, b: int, hw: int, tile: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_A, BLOCK_B, BLOCK_P): channel blocks cover all channels (≥ 16, tl.dot's minimum), pixel tiles fill
    the rest of a program's tile."""
    ba, bb = max(16, pow2(a)), max(16, pow2(b))
    return ba, bb, max(16, min(pow2(hw), (POINTWISE_TILE if tile is None else tile) // max(ba, bb)))
