"""Grouped 1×1 convolution kernels: K independent pointwise convolutions (each its own input and weight) in
one launch, for a mixed op's conv candidates, whose 1×1 stages run side by side.

Each input is NCHW contiguous, viewed as [N, B, HW]; a weight is a matrix [A, B] at (a·SA + b·SB), so the same
kernel computes the forward (W [CO, C]: SA = C, SB = 1) and the input gradient (Wᵀ: SA = 1, SB = C):
    out_k[n, a, p] = Σ_b W_k[a, b] · in_k[n, b, p]          (tl.dot, fp32 accumulation)
Program (k, n, pixel tile): run-time branches pick candidate k's pointers once. The inputs are read where they
are (tuples of K pointers; K a constexpr), so nothing is stacked.

With STATS (a constexpr bitmask over the K convolutions) the forward also leaves per-tile statistics of those
outputs for a BatchNorm that follows: stats[k, n·T + t, 0, a] = the tile's mean of channel a and
stats[k, n·T + t, 1, a] = its sum of squared deviations, both of the values as stored (rounded to the output
dtype), in fp32; the consumer merges them (Chan et al.'s pairwise rule), so no statistics pass is launched.

The weight gradient is deterministic: program (k, n, pixel tile) stores its fp32 partial
    part[k, n·T + t, a, b] = Σ_{p in tile} g_k[n, a, p] · x_k[n, b, p]
and the launcher sums the partials over (n, t) with an ordered torch sum.
"""
import triton
import triton.language as tl

from milenas_fast.kernels.pointers import pick  # absolute: tests load this file on its own


@triton.jit
def pointwise_kernel(
    ins, ws, outs, stats_ptr, A, B, HW, SA, SB,
    K: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, STATS: tl.constexpr,
):
    k = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    a = tl.arange(0, BLOCK_A)
    b = tl.arange(0, BLOCK_B)
    inp = pick(ins, k, K)
    w_ptr = pick(ws, k, K)
    out = pick(outs, k, K)
    pm = pix < HW
    x = tl.load(inp + n * B * HW + b[:, None] * HW + pix[None, :], mask=(b < B)[:, None] & pm[None, :], other=0.0)
    w = tl.load(w_ptr + a[:, None] * SA + b[None, :] * SB, mask=(a < A)[:, None] & (b < B)[None, :], other=0.0)
    if UPCAST:  # the interpreter's dot has no bf16/fp16: fp32 operands, the same exact products and fp32 sums
        x = x.to(tl.float32)
    y = tl.dot(w.to(x.dtype), x, input_precision=PRECISION, out_dtype=tl.float32)
    yq = y.to(outs[0].dtype.element_ty)
    tl.store(out + n * A * HW + a[:, None] * HW + pix[None, :], yq, mask=(a < A)[:, None] & pm[None, :])
    if STATS != 0:
        if ((STATS >> k) & 1) != 0:  # this tile's mean and squared deviations per channel, of the stored values
            v = tl.where(pm[None, :], yq.to(tl.float32), 0.0)
            cnt = tl.minimum(HW - tl.program_id(2) * BLOCK_P, BLOCK_P).to(tl.float32)
            mu = tl.sum(v, axis=1) / cnt
            d = tl.where(pm[None, :], v - mu[:, None], 0.0)
            row = stats_ptr + ((k * tl.num_programs(1) + n) * tl.num_programs(2) + tl.program_id(2)) * (2 * A)
            tl.store(row + a, mu, mask=a < A)
            tl.store(row + A + a, tl.sum(d * d, axis=1), mask=a < A)


@triton.jit
def pointwise_wgrad_kernel(
    xs, gs, part_ptr,
    A, B, HW, TILES,
    K: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """part[k, n·TILES + t] ([A, B] fp32) = g_k[n, :, tile t] · x_k[n, :, tile t]ᵀ (g: [N, A, HW], x: [N, B, HW])."""
    k = tl.program_id(0)
    n = tl.program_id(1)
    t = tl.program_id(2)
    pix = t * BLOCK_P + tl.arange(0, BLOCK_P)
    a = tl.arange(0, BLOCK_A)
    b = tl.arange(0, BLOCK_B)
    xk = pick(xs, k, K)
    gk = pick(gs, k, K)
    pm = pix < HW
    n64 = n.to(tl.int64)
    x = tl.load(xk + n64 * B * HW + b[None, :] * HW + pix[:, None], mask=pm[:, None] & (b < B)[None, :], other=0.0)
    g = tl.load(gk + n64 * A * HW + a[:, None] * HW + pix[None, :], mask=(a < A)[:, None] & pm[None, :], other=0.0)
    if UPCAST:
        g = g.to(tl.float32)
    part = tl.dot(g, x.to(g.dtype), input_precision=PRECISION, out_dtype=tl.float32)  # [A, B]
    row = part_ptr + ((k * tl.num_programs(1) + n) * TILES + t).to(tl.int64) * (A * B)
    tl.store(row + a[:, None] * B + b[None, :], part, mask=(a < A)[:, None] & (b < B)[None, :])
