"""The BatchNorm fold's kernels. STATS (a constexpr bitmask) names the candidates whose non-affine BatchNorm
statistics are their batch statistics: bit k set for candidate k. The other candidates' mean/rstd are constants
(running statistics, or the identity's 0 and 1), wherever they sit, so candidates stay in PRIMITIVES order.

The K ≤ 8 candidates are read where they are: one pointer argument each (y0_ptr … y7_ptr, the unused ones
aliased), K a constexpr, and `pick` (kernels/pointers.py) takes candidate k's pointer at compile time.

bn_stats: train mode's statistics of the STATS rows. running_rstd: eval mode's rstd of the STATS rows from their
running variances.

bn_fold_grad: the candidates' gradient of edge_reduce; for batch-statistics rows it also flows through mean
and rstd.

bn_backward: training-mode non-affine BatchNorm's input gradient for up to MAX_BN (16) inputs at once (the sep
convs' inner BNs of a group of edges, whose outputs the stencil never writes):
dh = rstd·(g − mean(g) − x̂·mean(g·x̂)), x̂ = (h − mean)·rstd.

Each y_k is viewed as [P, HW] (P = N·C planes), g (the edge output's gradient) too; with c = p mod C,
a = w_k·rstd_k, and for batch-statistics rows (bit k of STATS) the statistics' share
b = −gr_k·rstd_k³/n, d = gm_k/n − b·mean_k (gm, gr: the loss's gradient wrt mean and rstd, n = N·H·W):
    gy[k, p, i] = a · g[p, i] + b · y_k[p, i] + d          (b = d = 0 for the other rows)
One pass: g read once per program for all K candidates, each y_k once, gy (ONE [K, P, HW] buffer) written
once in y's dtype; the coefficients are formed here from [K, C] vectors, so no small kernels are launched
for them. With PARTS, gm and gr are formed here too, from edge_reduce's partial sums (part_gy [K, C, S] of
g·(y_k − mean_k), part_g [C, S] of g; gm = −w·rstd·Σg, gr = w·Σg(y − mean)), and program (0, 0) also writes
the mixing weights' gradient gw[k] = Σ_c rstd·Σg(y_k − mean_k): edge_reduce's backward then needs no final
launch of its own.
"""
import triton
import triton.language as tl

from milenas_fast.kernels.pointers import pick  # absolute: tests load this file on its own


@triton.jit
def _sum_parts(base, mask, S, BLOCK: tl.constexpr):
    """Σ_s base[s] for each lane (a row of S partial sums each), in order."""
    acc = tl.zeros((BLOCK,), tl.float32)
    s = tl.program_id(0) * 0  # a tensor loop counter, as _row_stats
    while s < S:
        acc += tl.load(base + s, mask=mask, other=0.0)
        s += 1
    return acc


@triton.jit
def _stat_grads(k: tl.constexpr, ch, pm, r, sg, w_ptr, gm_ptr, gr_ptr, part_gy_ptr, C, S,
                PARTS: tl.constexpr, BLOCK_P: tl.constexpr):
    """The loss's gradient wrt candidate k's mean and rstd on channels ch: given (gm, gr), or from the partials."""
    if PARTS:
        wk = tl.load(w_ptr + k)
        return -wk * r * sg, wk * _sum_parts(part_gy_ptr + (k * C + ch) * S, pm, S, BLOCK_P)
    return tl.load(gm_ptr + k * C + ch, mask=pm, other=0.0), tl.load(gr_ptr + k * C + ch, mask=pm, other=0.0)


@triton.jit
def bn_fold_grad_kernel(
    g_ptr, y0_ptr, y1_ptr, y2_ptr, y3_ptr, y4_ptr, y5_ptr, y6_ptr, y7_ptr, w_ptr, mean_ptr, rstd_ptr, gm_ptr,
    gr_ptr, gy_ptr, part_gy_ptr, part_g_ptr, gw_ptr,
    inv_n, P, C, HW, S,
    K: tl.constexpr, STATS: tl.constexpr, PARTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    planes = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    pm = planes < P
    m = pm[:, None] & (pix < HW)[None, :]
    offs = planes[:, None].to(tl.int64) * HW + pix[None, :]
    ch = planes % C
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sg = _sum_parts(part_g_ptr + ch * S, pm & PARTS, S * PARTS, BLOCK_P)  # Σg per channel (PARTS only)
    gyk = gy_ptr + offs  # advanced by one candidate (P·HW elements) per step: no k·P·HW int32 overflow
    for k in tl.static_range(K):
        r = tl.load(rstd_ptr + k * C + ch, mask=pm, other=0.0)
        gy = g * (tl.load(w_ptr + k) * r)[:, None]
        if (STATS >> k) & 1:  # batch statistics: their share too (compile-time: constant rows have none)
            mu = tl.load(mean_ptr + k * C + ch, mask=pm, other=0.0)
            gmv, grv = _stat_grads(k, ch, pm, r, sg, w_ptr, gm_ptr, gr_ptr, part_gy_ptr, C, S, PARTS, BLOCK_P)
            b = -grv * r * r * r * inv_n
            d = gmv * inv_n - b * mu
            yk = pick((y0_ptr, y1_ptr, y2_ptr, y3_ptr, y4_ptr, y5_ptr, y6_ptr, y7_ptr), k, 8)
            v = tl.load(yk + offs, mask=m, other=0.0).to(tl.float32)
            gy += v * b[:, None] + d[:, None]
        tl.store(gyk, gy.to(gy_ptr.dtype.element_ty), mask=m)
        gyk += P * HW
    if PARTS:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):  # the mixing weights' gradient, in a fixed order
            lanes = tl.arange(0, 64)
            for k in tl.static_range(K):
                acc = tl.zeros((64,), tl.float32)
                c0 = tl.program_id(0) * 0
                while c0 < C:
                    cm = c0 + lanes < C
                    rr = tl.load(rstd_ptr + k * C + c0 + lanes, mask=cm, other=0.0)
                    acc += rr * _sum_parts(part_gy_ptr + (k * C + c0 + lanes) * S, cm, S, 64)
                    c0 += 64
                tl.store(gw_ptr + k, tl.sum(acc, axis=0))


@triton.jit
def _row_stats(y_ptr, mean_ptr, rstd_ptr, uvar_ptr, ch, cm, N, C, HW, eps, BLOCK_C: tl.constexpr,
               BLOCK_HW: tl.constexpr):
    """mean, rstd and unbiased var of channels `ch` of one candidate y [N, C, HW], two passes in fp32."""
    pix = tl.arange(0, BLOCK_HW)
    cnt = N * HW * 1.0  # not .to(): N or HW equal to 1 arrive as constexprs on the GPU
    base = y_ptr + ch[:, None].to(tl.int64) * HW
    s = tl.zeros((BLOCK_C,), tl.float32)
    n = tl.program_id(0) * 0  # tensor loop counters (Triton 3.6's interpreter cannot range() over a scalar)
    while n < N:
        i = tl.program_id(0) * 0
        while i < HW:
            m = cm[:, None] & (i + pix < HW)[None, :]
            s += tl.sum(tl.load(base + n * C * HW + i + pix[None, :], mask=m, other=0.0).to(tl.float32), axis=1)
            i += BLOCK_HW
        n += 1
    mean = s / cnt
    ss = tl.zeros((BLOCK_C,), tl.float32)
    n = tl.program_id(0) * 0
    while n < N:
        i = tl.program_id(0) * 0
        while i < HW:
            m = cm[:, None] & (i + pix < HW)[None, :]
            v = tl.load(base + n * C * HW + i + pix[None, :], mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - mean[:, None], 0.0)
            ss += tl.sum(d * d, axis=1)
            i += BLOCK_HW
        n += 1
    tl.store(mean_ptr + ch, mean, mask=cm)
    tl.store(rstd_ptr + ch, 1.0 / tl.sqrt(ss / cnt + eps), mask=cm)
    tl.store(uvar_ptr + ch, ss / (cnt - 1.0), mask=cm)


@triton.jit
def bn_stats_kernel(
    ys, mean_ptr, rstd_ptr, uvar_ptr,
    N, C, HW, eps,
    K: tl.constexpr, STATS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per (candidate k, channel) of the y_k [N, C, HW]: mean, rstd = 1/sqrt(biased var + eps) and the unbiased
    var (for the running statistics), two passes in fp32 (the centred second pass keeps the variance exact
    when the mean is large), for the rows k in STATS; the others (the identity) get mean 0, rstd 1 and var 0.
    Program (k, channel block): run-time branches pick its candidate's pointer once (ys: a tuple of K, a fused
    cell's group of edges), none per element; ONE copy of the statistics code (a copy per candidate made ptxas
    spill with Triton 3.6)."""
    k = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < C
    yk = pick(ys, k, K)
    if ((STATS >> k.to(tl.int64)) & 1) != 0:  # int64: a group's bitmask has rows past 31
        _row_stats(yk, mean_ptr + k * C, rstd_ptr + k * C, uvar_ptr + k * C, ch, cm, N, C, HW, eps,
                   BLOCK_C, BLOCK_HW)
    else:
        tl.store(mean_ptr + k * C + ch, tl.zeros((BLOCK_C,), tl.float32), mask=cm)
        tl.store(rstd_ptr + k * C + ch, tl.full((BLOCK_C,), 1.0, tl.float32), mask=cm)
        tl.store(uvar_ptr + k * C + ch, tl.zeros((BLOCK_C,), tl.float32), mask=cm)


@triton.jit
def running_rstd_kernel(
    var_ptr, rstd_ptr, C, eps,
    STATS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Eval mode: rstd [K, C] = 1/sqrt(running var + eps) for the rows k in STATS, exactly 1 in the others (the
    identity: whatever its var row holds). Program (k, channel block)."""
    k = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < C
    v = tl.load(var_ptr + k * C + ch, mask=cm, other=0.0).to(tl.float32)
    tl.store(rstd_ptr + k * C + ch, tl.where(((STATS >> k) & 1) != 0, 1.0 / tl.sqrt(v + eps), 1.0), mask=cm)


@triton.jit
def bn_backward_kernel(
    gs, hs, dhs, means, rstds,
    N, C, HW,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Program (k, channel block) of BatchNorm k < K (tuples of K pointers: g, h, dh [N, C, HW] each; mean/rstd [C]
    fp32, the batch statistics): the channel sums of g and g·(h − mean) in a first pass (fp32, fixed order:
    deterministic), dh = rstd·(g − Σg/n − (h − mean)·rstd²·Σg(h − mean)/n) in a second, stored in h's dtype."""
    k = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < C
    g_ptr, h_ptr, dh_ptr = pick(gs, k, K), pick(hs, k, K), pick(dhs, k, K)
    mu = tl.load(pick(means, k, K) + ch, mask=cm, other=0.0)
    rs = tl.load(pick(rstds, k, K) + ch, mask=cm, other=0.0)
    pix = tl.arange(0, BLOCK_HW)
    cnt = N * HW * 1.0
    plane = ch[:, None].to(tl.int64) * HW
    sg = tl.zeros((BLOCK_C,), tl.float32)
    sgh = tl.zeros((BLOCK_C,), tl.float32)
    n = tl.program_id(0) * 0  # tensor loop counters, as _row_stats
    while n < N:
        i = tl.program_id(0) * 0
        while i < HW:
            m = cm[:, None] & (i + pix < HW)[None, :]
            offs = plane + n * C * HW + i + pix[None, :]
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
            sg += tl.sum(g, axis=1)
            sgh += tl.sum(g * tl.where(m, h - mu[:, None], 0.0), axis=1)
            i += BLOCK_HW
        n += 1
    a = sg / cnt
    b = sgh * rs * rs / cnt
    n = tl.program_id(0) * 0
    while n < N:
        i = tl.program_id(0) * 0
        while i < HW:
            m = cm[:, None] & (i + pix < HW)[None, :]
            offs = plane + n * C * HW + i + pix[None, :]
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
            dh = rs[:, None] * (g - a[:, None] - (h - mu[:, None]) * b[:, None])
            tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=m)
            i += BLOCK_HW
        n += 1
