"""Triton twin of the C++/CUDA `edge_reduce` (used on GPUs where the extension has no CUDA kernels).

y is viewed as [K, P, HW] (P = N·C planes, HW = H·W pixels), out as [P, HW]:
    out[p, i] = Σ_k (y[k, p, i] − mean[k, c]) · w[k] · rstd[k, c],   c = p mod C.

A program owns BLOCK_P planes × BLOCK_HW pixels and loops over k at run time, accumulating in fp32.
The backward writes grad_y = w·rstd·g (in y's dtype) and, per program, fp32 partial sums over its
pixels of g·(y_k − mean_k) and g; the launcher finishes them with an ordered torch sum (deterministic,
no atomics).
"""
import triton
import triton.language as tl


@triton.jit
def _tile(P, HW, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    planes = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    pm = planes < P
    m = pm[:, None] & (pix < HW)[None, :]
    offs = planes[:, None].to(tl.int64) * HW + pix[None, :]
    return planes, pm, m, offs


@triton.jit
def _zero():
    """An int32 0 as a tensor (a loop counter must be one, never a constexpr)."""
    return tl.program_id(0) * 0


@triton.jit
def edge_reduce_fwd_kernel(
    y_ptr, w_ptr, mean_ptr, rstd_ptr, out_ptr,
    K, P, C, HW,
    BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    planes, pm, m, offs = _tile(P, HW, BLOCK_P, BLOCK_HW)
    ch = planes % C
    acc = tl.zeros((BLOCK_P, BLOCK_HW), tl.float32)
    yk = y_ptr + offs  # advanced by one candidate (P·HW elements) per step: no k·P·HW overflow
    k = _zero()
    # Not range(K): Triton 3.6's interpreter takes int() of a 1-element array there, which numpy 2.4 rejects.
    while k < K:
        a = tl.load(w_ptr + k) * tl.load(rstd_ptr + k * C + ch, mask=pm, other=0.0)
        mu = tl.load(mean_ptr + k * C + ch, mask=pm, other=0.0)
        v = tl.load(yk, mask=m, other=0.0).to(tl.float32)
        acc += (v - mu[:, None]) * a[:, None]
        yk += P * HW
        k += 1
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def edge_reduce_bwd_kernel(
    g_ptr, y_ptr, w_ptr, mean_ptr, rstd_ptr, gy_ptr, part_gy_ptr, part_g_ptr,
    K, P, C, HW,
    GY: tl.constexpr, SUMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """grad_y (GY) and the partials part_gy[tile, k, p] = Σ g·(y_k − mean_k), part_g[tile, p] = Σ g (SUMS),
    summed over this program's pixel tile (tile = program_id(1))."""
    planes, pm, m, offs = _tile(P, HW, BLOCK_P, BLOCK_HW)
    ch = planes % C
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tile = tl.program_id(1)
    if SUMS:
        tl.store(part_g_ptr + tile * P + planes, tl.sum(g, axis=1), mask=pm)
    yk = y_ptr + offs  # both advanced by one candidate (P·HW elements) per step
    gyk = gy_ptr + offs
    k = _zero()
    while k < K:  # see the forward
        if GY:
            a = tl.load(w_ptr + k) * tl.load(rstd_ptr + k * C + ch, mask=pm, other=0.0)
            tl.store(gyk, (g * a[:, None]).to(gy_ptr.dtype.element_ty), mask=m)
        if SUMS:
            mu = tl.load(mean_ptr + k * C + ch, mask=pm, other=0.0)
            v = tl.load(yk, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - mu[:, None], 0.0)
            tl.store(part_gy_ptr + (tile * K + k) * P + planes, tl.sum(g * d, axis=1), mask=pm)
        yk += P * HW
        gyk += P * HW
        k += 1
