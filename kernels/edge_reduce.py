"""Triton version of the C++/CUDA `edge_reduce` (used on GPUs where the extension has no CUDA kernels).

The K ≤ 8 candidates y_k are read where they are: one pointer argument each (y0_ptr … y7_ptr, the unused
ones aliased to y0_ptr), K a constexpr, so the candidate loop is unrolled and `pick` picks each pointer at
compile time. Each y_k is viewed as [P, HW] (P = N·C planes, HW = H·W pixels), like out:
    out[p, i] = Σ_k (y_k[p, i] − mean[k, c]) · w[k] · rstd[k, c],   c = p mod C.

A program owns BLOCK_P planes × BLOCK_HW pixels, accumulating in fp32. The backward writes grad_y (ONE
[K, P, HW] buffer) = w·rstd·g in y's dtype and, per program, fp32 partial sums over its pixels of
g·(y_k − mean_k) and g ([K, C, S] and [C, S], as the C++ op's partials); the launcher finishes them with an
ordered torch sum, or hands them on (`edge_reduce_partials`; deterministic, no atomics).
"""
import triton
import triton.language as tl

from milenas_fast.kernels.pointers import pick  # absolute: tests load this file on its own


@triton.jit
def _tile(P, HW, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    planes = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    pm = planes < P
    m = pm[:, None] & (pix < HW)[None, :]
    offs = planes[:, None].to(tl.int64) * HW + pix[None, :]
    return planes, pm, m, offs


@triton.jit
def edge_reduce_fwd_kernel(
    y0_ptr, y1_ptr, y2_ptr, y3_ptr, y4_ptr, y5_ptr, y6_ptr, y7_ptr, w_ptr, mean_ptr, rstd_ptr, acc_ptr, out_ptr,
    P, C, HW,
    K: tl.constexpr, HASACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """out = (acc +) Σ_k (y_k − mean_k)·w_k·rstd_k, in fp32 (with HASACC, acc: a node's running sum)."""
    planes, pm, m, offs = _tile(P, HW, BLOCK_P, BLOCK_HW)
    ch = planes % C
    acc = tl.zeros((BLOCK_P, BLOCK_HW), tl.float32)
    if HASACC:
        acc += tl.load(acc_ptr + offs, mask=m, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        a = tl.load(w_ptr + k) * tl.load(rstd_ptr + k * C + ch, mask=pm, other=0.0)
        mu = tl.load(mean_ptr + k * C + ch, mask=pm, other=0.0)
        yk = pick((y0_ptr, y1_ptr, y2_ptr, y3_ptr, y4_ptr, y5_ptr, y6_ptr, y7_ptr), k, 8)
        v = tl.load(yk + offs, mask=m, other=0.0).to(tl.float32)
        acc += (v - mu[:, None]) * a[:, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def edge_reduce_bwd_kernel(
    g_ptr, y0_ptr, y1_ptr, y2_ptr, y3_ptr, y4_ptr, y5_ptr, y6_ptr, y7_ptr, w_ptr, mean_ptr, rstd_ptr, gy_ptr,
    part_gy_ptr, part_g_ptr,
    P, C, HW,
    K: tl.constexpr, GY: tl.constexpr, SUMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """grad_y (GY) and the partials part_gy[k, c, s] = Σ g·(y_k − mean_k), part_g[c, s] = Σ g (SUMS), summed
    over this program's pixel tile of image n, s = tile·N + n (tile = program_id(1); S = tiles·N): the C++ op's
    [K, C, S] layout."""
    planes, pm, m, offs = _tile(P, HW, BLOCK_P, BLOCK_HW)
    ch = planes % C
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    n_img = P // C
    split = tl.program_id(1) * n_img + planes // C  # s of each plane
    S = tl.num_programs(1) * n_img
    if SUMS:
        tl.store(part_g_ptr + ch * S + split, tl.sum(g, axis=1), mask=pm)
    gyk = gy_ptr + offs  # advanced by one candidate (P·HW elements) per step: no k·P·HW int32 overflow
    for k in tl.static_range(K):
        if GY:
            a = tl.load(w_ptr + k) * tl.load(rstd_ptr + k * C + ch, mask=pm, other=0.0)
            tl.store(gyk, (g * a[:, None]).to(gy_ptr.dtype.element_ty), mask=m)
        if SUMS:
            mu = tl.load(mean_ptr + k * C + ch, mask=pm, other=0.0)
            yk = pick((y0_ptr, y1_ptr, y2_ptr, y3_ptr, y4_ptr, y5_ptr, y6_ptr, y7_ptr), k, 8)
            v = tl.load(yk + offs, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - mu[:, None], 0.0)
            tl.store(part_gy_ptr + (k * C + ch) * S + split, tl.sum(g * d, axis=1), mask=pm)
        gyk += P * HW
