"""The BatchNorm fold's kernels. STATS (a constexpr bitmask) names the candidates whose non-affine BatchNorm
statistics are their batch statistics: bit k set for row k. The other rows' mean/rstd are constants (running
statistics, or the identity's 0 and 1), wherever they sit, so candidates stay stacked in PRIMITIVES order.

bn_stats: train mode's statistics of the STATS rows. running_rstd: eval mode's rstd of the STATS rows from their
running variances.

bn_fold_grad: the candidates' gradient of edge_reduce; for batch-statistics rows it also flows through mean
and rstd.

y is viewed as [K, P, HW] (P = N·C planes), g (the edge output's gradient) as [P, HW]; with c = p mod C,
a = w_k·rstd_k, and for batch-statistics rows (bit k of STATS) the statistics' share
b = −gr_k·rstd_k³/n, d = gm_k/n − b·mean_k (gm, gr: the loss's gradient wrt mean and rstd, n = N·H·W):
    gy[k, p, i] = a · g[p, i] + b · y[k, p, i] + d          (b = d = 0 for the other rows)
One pass: g read once per program for all K candidates, each y_k once, gy written once in y's dtype;
the coefficients are formed here from [K, C] vectors, so no small kernels are launched for them.
"""
import triton
import triton.language as tl


@triton.jit
def bn_fold_grad_kernel(
    g_ptr, y_ptr, w_ptr, mean_ptr, rstd_ptr, gm_ptr, gr_ptr, gy_ptr,
    K, inv_n, P, C, HW,
    STATS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    planes = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    pm = planes < P
    m = pm[:, None] & (pix < HW)[None, :]
    offs = planes[:, None].to(tl.int64) * HW + pix[None, :]
    ch = planes % C
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    yk = y_ptr + offs  # both advanced by one candidate (P·HW elements) per step
    gyk = gy_ptr + offs
    k = tl.program_id(0) * 0  # a tensor loop counter (Triton 3.6's interpreter cannot range() over K)
    while k < K:
        r = tl.load(rstd_ptr + k * C + ch, mask=pm, other=0.0)
        a = tl.load(w_ptr + k) * r
        on = ((STATS >> k) & 1).to(tl.float32)  # 0 for rows whose statistics are constants
        mu = tl.load(mean_ptr + k * C + ch, mask=pm, other=0.0)
        b = -on * tl.load(gr_ptr + k * C + ch, mask=pm, other=0.0) * r * r * r * inv_n
        d = on * tl.load(gm_ptr + k * C + ch, mask=pm, other=0.0) * inv_n - b * mu
        v = tl.load(yk, mask=m, other=0.0).to(tl.float32)
        gy = g * a[:, None] + v * b[:, None] + d[:, None]
        tl.store(gyk, gy.to(gy_ptr.dtype.element_ty), mask=m)
        yk += P * HW
        gyk += P * HW
        k += 1


@triton.jit
def bn_stats_kernel(
    y_ptr, mean_ptr, rstd_ptr, uvar_ptr,
    N, C, HW, eps,
    STATS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per (candidate k, channel) of y [K, N, C, HW]: mean, rstd = 1/sqrt(biased var + eps) and the unbiased
    var (for the running statistics), two passes in fp32 (the centred second pass keeps the variance exact
    when the mean is large), for the rows k in STATS; the others (the identity) get mean 0, rstd 1 and var 0.
    Program (k, channel block): the row test is one branch per program, none per element."""
    k = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < C
    pix = tl.arange(0, BLOCK_HW)
    cnt = N * HW * 1.0  # not .to(): N or HW equal to 1 arrive as constexprs on the GPU
    if (STATS >> k) & 1:
        base = y_ptr + k.to(tl.int64) * N * C * HW + ch[:, None].to(tl.int64) * HW
        s = tl.zeros((BLOCK_C,), tl.float32)
        n = k * 0  # tensor loop counters (Triton 3.6's interpreter cannot range() over a scalar argument)
        while n < N:
            i = k * 0
            while i < HW:
                m = cm[:, None] & (i + pix < HW)[None, :]
                s += tl.sum(tl.load(base + n * C * HW + i + pix[None, :], mask=m, other=0.0).to(tl.float32), axis=1)
                i += BLOCK_HW
            n += 1
        mean = s / cnt
        ss = tl.zeros((BLOCK_C,), tl.float32)
        n = k * 0
        while n < N:
            i = k * 0
            while i < HW:
                m = cm[:, None] & (i + pix < HW)[None, :]
                v = tl.load(base + n * C * HW + i + pix[None, :], mask=m, other=0.0).to(tl.float32)
                d = tl.where(m, v - mean[:, None], 0.0)
                ss += tl.sum(d * d, axis=1)
                i += BLOCK_HW
            n += 1
        tl.store(mean_ptr + k * C + ch, mean, mask=cm)
        tl.store(rstd_ptr + k * C + ch, 1.0 / tl.sqrt(ss / cnt + eps), mask=cm)
        tl.store(uvar_ptr + k * C + ch, ss / (cnt - 1.0), mask=cm)
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
