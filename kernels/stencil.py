"""Multi-stencil kernels: the six candidates of a mixed op that read the edge input directly.

One launch reads x [N, C, H, W] (NCHW contiguous) and emits, all with the same output grid
(H_out = (H - 1) // s + 1):
  the first ReLU → depthwise stage of sep_conv_3x3 (3×3, pad 1), sep_conv_5x5 (5×5, pad 2),
  dil_conv_3x3 (3×3 dil 2, pad 2) and dil_conv_5x5 (5×5 dil 2, pad 4), plus max/avg pool 3×3 (pad 1)
  on the raw input.
Every footprint is centred on the same input pixel (o·s), so one sweep over the 9×9 offsets (41 of
them are used) loads each shifted view of x once and feeds every branch that has a tap there.

Tiling: a program owns BLOCK_P planes (n·C + c) × BLOCK_HW flattened output pixels. For the search's
≤ 32×32 planes BLOCK_HW covers the whole plane, so the halo re-reads of the 41 shifted views hit L1/L2
and DRAM sees x once; consecutive pixels are consecutive addresses (coalesced for stride 1). Small
planes (8×8) pack several planes per program to keep programs large.

Branch selection: constexpr flags HAS3, HAS5, HASD3, HASD5 (the four convolutions) and HASMAX, HASAVG
(the pools) choose which branches a launch computes. An unselected branch is not compiled in: no
loads (of x at offsets only it uses, of its filter or gradient), no FLOPs, no stores; its pointers may
be any tensor. ReLU → one depthwise conv alone (the sep convs' second stage) is the 3×3 or 5×5 branch.
With X5 (constexpr) the 5×5 branch reads a second input x5 of x's shape (its gradient goes to dx5): the two sep
convs' second stages, ReLU → 3×3 of one tensor and ReLU → 5×5 of another, in one launch.
With NORM (constexpr; convolution branches only, no pools) the inputs are the sep convs' inner BatchNorm's inputs:
every load of x (x5) is normalised on the fly, (v − mean)·rstd with mean/rstd [2, C] fp32 (row 0 x's, row 1
x5's), padding staying 0, so the BN's output is never written; the input-gradient kernel then returns the
gradient with respect to that normalised value (the BN's backward is the caller's). With NORM == 2 (forward
only) the statistics come from the producer's per-tile statistics (kernels/pointwise.py's STATS: st [K, R, 2, C],
rows G3 and G5, R = N·T tiles of TB pixels), merged per channel by every program as it starts (Chan et al.'s
rule, fp32); the programs of image 0 also write mean, rstd and the unbiased variance ([2, C]) for the backward
and the running statistics: no statistics launch at all.

Filter gradients are deterministic: each program writes fp32 per-(pixel tile, plane, tap) partial
sums, and the launcher reduces them over tiles and the batch with a plain (ordered) torch sum. The
partials hold the selected convolutions' taps only, one row per (pixel tile, image), filter-major: the
filters w3 (9 taps), w5 (25), wd3 (9), wd5 (25) in this order, each a [C, k²] block, so the summed row
parts into contiguous filter gradients with no copy.
"""
import triton
import triton.language as tl

from milenas_fast.kernels.pointers import pick  # absolute: tests load this file on its own


@triton.jit
def _tile(P, HWO, WO, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    planes = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return planes, pix, planes < P, pix < HWO, pix // WO, pix % WO


@triton.jit
def _norm(mean_ptr, rstd_ptr, ch, pm, C, NORM: tl.constexpr):
    """(mean, rstd) per plane of x and of x5 from mean/rstd [2, C] with NORM, else (0, 1) twice (never applied)."""
    if NORM:
        return (tl.load(mean_ptr + ch, mask=pm, other=0.0), tl.load(rstd_ptr + ch, mask=pm, other=1.0),
                tl.load(mean_ptr + C + ch, mask=pm, other=0.0), tl.load(rstd_ptr + C + ch, mask=pm, other=1.0))
    zero = tl.zeros(ch.shape, tl.float32)
    return zero, zero + 1.0, zero, zero + 1.0


@triton.jit
def _norm_fwd(mean_ptr, rstd_ptr, uvar_ptr, st_ptr, planes, ch, pm, C, HW, R, T, TB, G3, G5, eps,
              NORM: tl.constexpr, BLOCK_P: tl.constexpr):
    """The forward's (mean, rstd) of x and x5: merged from tile statistics (NORM == 2; image 0's programs store
    them), else as _norm. The merge: (mean, Σ squared deviations) per channel from R tile rows (mean at
    row·2C, squared deviations at + C; tile t = r mod T holds TB values, the last of each image fewer), two
    ordered passes over both inputs' rows at once."""
    if NORM == 2:
        cnt = (R // T) * HW * 1.0
        last = (HW - (T - 1) * TB) * 1.0
        b3 = st_ptr + G3 * R * 2 * C + ch
        b5 = st_ptr + G5 * R * 2 * C + ch
        s3 = tl.zeros((BLOCK_P,), tl.float32)
        s5 = tl.zeros((BLOCK_P,), tl.float32)
        r = tl.program_id(0) * 0  # tensor loop counters, as bn_fold's _row_stats
        while r < R:
            c = tl.where(r % T == T - 1, last, TB * 1.0)
            s3 += c * tl.load(b3 + r * 2 * C, mask=pm, other=0.0)
            s5 += c * tl.load(b5 + r * 2 * C, mask=pm, other=0.0)
            r += 1
        mu = s3 / cnt
        mu5 = s5 / cnt
        m2 = tl.zeros((BLOCK_P,), tl.float32)
        m25 = tl.zeros((BLOCK_P,), tl.float32)
        r = tl.program_id(0) * 0
        while r < R:
            c = tl.where(r % T == T - 1, last, TB * 1.0)
            d3 = tl.load(b3 + r * 2 * C, mask=pm, other=0.0) - mu
            d5 = tl.load(b5 + r * 2 * C, mask=pm, other=0.0) - mu5
            m2 += tl.load(b3 + r * 2 * C + C, mask=pm, other=0.0) + c * d3 * d3
            m25 += tl.load(b5 + r * 2 * C + C, mask=pm, other=0.0) + c * d5 * d5
            r += 1
        rs = 1.0 / tl.sqrt(m2 / cnt + eps)
        rs5 = 1.0 / tl.sqrt(m25 / cnt + eps)
        first = pm & (planes < C)
        tl.store(mean_ptr + ch, mu, mask=first)
        tl.store(mean_ptr + C + ch, mu5, mask=first)
        tl.store(rstd_ptr + ch, rs, mask=first)
        tl.store(rstd_ptr + C + ch, rs5, mask=first)
        tl.store(uvar_ptr + ch, m2 / (cnt - 1.0), mask=first)
        tl.store(uvar_ptr + C + ch, m25 / (cnt - 1.0), mask=first)
        return mu, rs, mu5, rs5
    return _norm(mean_ptr, rstd_ptr, ch, pm, C, NORM)


@triton.jit
def stencil_fwd_kernel(
    xs, x5s, w3s, w5s, wd3s, wd5s, y3s, y5s, yd3s, yd5s, ymaxs, yavgs, means, rstds, uvars, st_ptr,
    P, C, H, W, HO, WO, R, T, TB, G3, G5, GS, eps,
    HAS3: tl.constexpr, HAS5: tl.constexpr, HASD3: tl.constexpr, HASD5: tl.constexpr,
    HASMAX: tl.constexpr, HASAVG: tl.constexpr, X5: tl.constexpr, NORM: tl.constexpr,
    STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, E: tl.constexpr,
):
    """Every pointer but st_ptr is a tuple of E: program (planes, pixels, e) computes edge e (a fused cell's group
    of edges of one shape: one launch for all); with NORM == 2 edge e's statistics rows are G3 + e·GS, G5 + e·GS."""
    e = tl.program_id(2)
    x_ptr, x5_ptr = pick(xs, e, E), pick(x5s, e, E)
    w3_ptr, w5_ptr, wd3_ptr, wd5_ptr = pick(w3s, e, E), pick(w5s, e, E), pick(wd3s, e, E), pick(wd5s, e, E)
    mean_ptr, rstd_ptr, uvar_ptr = pick(means, e, E), pick(rstds, e, E), pick(uvars, e, E)
    planes, pix, pm, sm, oh, ow = _tile(P, HO * WO, WO, BLOCK_P, BLOCK_HW)
    ch = planes % C
    mu, rs, mu5, rs5 = _norm_fwd(mean_ptr, rstd_ptr, uvar_ptr, st_ptr, planes, ch, pm, C, H * W, R, T, TB,
                                 G3 + e * GS, G5 + e * GS,
                                 eps, NORM, BLOCK_P)
    x_base = x_ptr + planes[:, None].to(tl.int64) * (H * W)
    x5_base = x5_ptr + planes[:, None].to(tl.int64) * (H * W)
    ch_ = oh * STRIDE  # centre of every footprint
    cw_ = ow * STRIDE

    acc3 = tl.zeros((BLOCK_P, BLOCK_HW), tl.float32)
    acc5 = tl.zeros((BLOCK_P, BLOCK_HW), tl.float32)
    accd3 = tl.zeros((BLOCK_P, BLOCK_HW), tl.float32)
    accd5 = tl.zeros((BLOCK_P, BLOCK_HW), tl.float32)
    vmax = tl.full((BLOCK_P, BLOCK_HW), float("-inf"), tl.float32)
    vsum = tl.zeros((BLOCK_P, BLOCK_HW), tl.float32)

    for a in tl.static_range(9):
        for b in tl.static_range(9):
            dy = a - 4
            dx = b - 4
            in3 = (dy >= -1) and (dy <= 1) and (dx >= -1) and (dx <= 1)
            in5 = (dy >= -2) and (dy <= 2) and (dx >= -2) and (dx <= 2)
            even = (dy % 2 == 0) and (dx % 2 == 0)
            use3 = in3 and HAS3
            use_pool = in3 and (HASMAX or HASAVG)
            use5 = in5 and HAS5
            used3 = in5 and even and HASD3
            used5 = even and HASD5
            if use3 or use_pool or use5 or used3 or used5:  # all six: 41 of the 81 offsets
                ih = ch_ + dy
                iw = cw_ + dx
                m = pm[:, None] & (sm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[None, :]
                # x at every used offset (with X5 also where only the 5×5 branch reads, from x5: a cached re-read;
                # a load guarded by its own condition would not compile, the value defined in an `if` being local)
                v = tl.load(x_base + (ih * W + iw)[None, :], mask=m, other=0.0).to(tl.float32)
                if NORM:  # the BN's output, 0 in the padding
                    v = tl.where(m, (v - mu[:, None]) * rs[:, None], 0.0)
                r = tl.maximum(v, 0.0)
                if use3:
                    wv = tl.load(w3_ptr + ch * 9 + (dy + 1) * 3 + (dx + 1), mask=pm, other=0.0)
                    acc3 += r * wv.to(tl.float32)[:, None]
                if use_pool and HASMAX:
                    vmax = tl.maximum(vmax, tl.where(m, v, float("-inf")))
                if use_pool and HASAVG:
                    vsum += v
                if use5:
                    wv = tl.load(w5_ptr + ch * 25 + (dy + 2) * 5 + (dx + 2), mask=pm, other=0.0).to(tl.float32)
                    if X5:
                        v5 = tl.load(x5_base + (ih * W + iw)[None, :], mask=m, other=0.0).to(tl.float32)
                        if NORM:
                            v5 = tl.where(m, (v5 - mu5[:, None]) * rs5[:, None], 0.0)
                        acc5 += tl.maximum(v5, 0.0) * wv[:, None]
                    else:
                        acc5 += r * wv[:, None]
                if used3:
                    wv = tl.load(wd3_ptr + ch * 9 + (dy // 2 + 1) * 3 + (dx // 2 + 1), mask=pm, other=0.0)
                    accd3 += r * wv.to(tl.float32)[:, None]
                if used5:
                    wv = tl.load(wd5_ptr + ch * 25 + (dy // 2 + 2) * 5 + (dx // 2 + 2), mask=pm, other=0.0)
                    accd5 += r * wv.to(tl.float32)[:, None]

    if HASAVG:  # before the stores (as the kernel had it: ptxas keeps fewer values live, no spills)
        # count_include_pad=False: divide by the in-bounds part of each 3×3 window.
        cnt = ((tl.minimum(ch_ + 2, H) - tl.maximum(ch_ - 1, 0)) * (tl.minimum(cw_ + 2, W) - tl.maximum(cw_ - 1, 0)))
        yavg = vsum / tl.maximum(cnt, 1).to(tl.float32)[None, :]  # max: lanes past the end have cnt <= 0

    out = planes[:, None].to(tl.int64) * (HO * WO) + pix[None, :]
    om = pm[:, None] & sm[None, :]
    dt = xs[0].dtype.element_ty  # every output has x's dtype
    # the outputs' pointers picked here, not live through the loop (ptxas spilled for E = 8 otherwise)
    y3_ptr, y5_ptr, yd3_ptr, yd5_ptr = pick(y3s, e, E), pick(y5s, e, E), pick(yd3s, e, E), pick(yd5s, e, E)
    ymax_ptr, yavg_ptr = pick(ymaxs, e, E), pick(yavgs, e, E)
    if HAS3:
        tl.store(y3_ptr + out, acc3.to(dt), mask=om)
    if HAS5:
        tl.store(y5_ptr + out, acc5.to(dt), mask=om)
    if HASD3:
        tl.store(yd3_ptr + out, accd3.to(dt), mask=om)
    if HASD5:
        tl.store(yd5_ptr + out, accd5.to(dt), mask=om)
    if HASMAX:
        tl.store(ymax_ptr + out, vmax.to(dt), mask=om)
    if HASAVG:
        tl.store(yavg_ptr + out, yavg.to(dt), mask=om)


@triton.jit
def _gather_conv(acc, g_ptr, w_ptr, planes, ch, pm, ih, iw, HO, WO,
                 K: tl.constexpr, DIL: tl.constexpr, PAD: tl.constexpr, STRIDE: tl.constexpr):
    """acc += Σ_taps w[c, tap] · g[o] over the outputs o whose tap lands on input (ih, iw)."""
    g_base = g_ptr + planes[:, None].to(tl.int64) * (HO * WO)
    # A runtime loop over rows (columns unrolled): a quarter of the code, far quicker to compile.
    for kh in range(K):
        for kw in tl.static_range(K):
            th = ih + PAD - kh * DIL  # = o_h · STRIDE
            tw = iw + PAD - kw * DIL
            ok = (th >= 0) & (tw >= 0)
            if STRIDE > 1:
                ok = ok & (th % STRIDE == 0) & (tw % STRIDE == 0)
            oh = th // STRIDE
            ow = tw // STRIDE
            ok = ok & (oh < HO) & (ow < WO)
            m = pm[:, None] & ok
            g = tl.load(g_base + oh * WO + ow, mask=m, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + ch * (K * K) + kh * K + kw, mask=pm, other=0.0).to(tl.float32)
            acc += g * wv[:, None]
    return acc


@triton.jit
def stencil_bwd_input_kernel(
    xs, x5s, w3s, w5s, wd3s, wd5s, ymaxs, g3s, g5s, gd3s, gd5s, gmaxs, gavgs, gaccs, dxs, dx5s, means, rstds,
    P, C, H, W, HO, WO,
    HAS3: tl.constexpr, HAS5: tl.constexpr, HASD3: tl.constexpr, HASD5: tl.constexpr,
    HASMAX: tl.constexpr, HASAVG: tl.constexpr, X5: tl.constexpr, HASACC: tl.constexpr, NORM: tl.constexpr,
    STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, E: tl.constexpr,
):
    """Gather form (one program per input tile, no atomics): dx = relu'(x)·Σ conv grads + pool grads
    (+ gacc with HASACC: x's gradient from elsewhere, the identity candidate's; with X5, the 5×5 branch's part
    goes to dx5 = relu'(x5)·its conv grad; with NORM, x and x5 normalised: the gradients are the normalised
    values'). Every pointer is a tuple of E: program (planes, pixels, e) computes edge e."""
    e = tl.program_id(2)
    x_ptr, x5_ptr, ymax_ptr = pick(xs, e, E), pick(x5s, e, E), pick(ymaxs, e, E)
    w3_ptr, w5_ptr, wd3_ptr, wd5_ptr = pick(w3s, e, E), pick(w5s, e, E), pick(wd3s, e, E), pick(wd5s, e, E)
    g3_ptr, g5_ptr, gd3_ptr, gd5_ptr = pick(g3s, e, E), pick(g5s, e, E), pick(gd3s, e, E), pick(gd5s, e, E)
    gmax_ptr, gavg_ptr = pick(gmaxs, e, E), pick(gavgs, e, E)
    mean_ptr, rstd_ptr = pick(means, e, E), pick(rstds, e, E)
    planes, pix, pm, sm, ih, iw = _tile(P, H * W, W, BLOCK_P, BLOCK_HW)
    ch = planes % C
    mu, rs, mu5, rs5 = _norm(mean_ptr, rstd_ptr, ch, pm, C, NORM)
    ih = ih[None, :]
    iw = iw[None, :]
    x_base = x_ptr + planes[:, None].to(tl.int64) * (H * W)
    xm = pm[:, None] & sm[None, :]
    xv = tl.load(x_base + ih * W + iw, mask=xm, other=0.0).to(tl.float32)
    if NORM:
        xv = (xv - mu[:, None]) * rs[:, None]

    acc = tl.zeros((BLOCK_P, BLOCK_HW), tl.float32)
    if HAS3:
        acc = _gather_conv(acc, g3_ptr, w3_ptr, planes, ch, pm, ih, iw, HO, WO, 3, 1, 1, STRIDE)
    if HAS5 and X5:
        acc5 = _gather_conv(tl.zeros((BLOCK_P, BLOCK_HW), tl.float32), g5_ptr, w5_ptr, planes, ch, pm, ih, iw,
                            HO, WO, 5, 1, 2, STRIDE)
        x5v = tl.load(x5_ptr + planes[:, None].to(tl.int64) * (H * W) + ih * W + iw, mask=xm, other=0.0)
        x5v = x5v.to(tl.float32)
        if NORM:
            x5v = (x5v - mu5[:, None]) * rs5[:, None]
        dx5_ptr = pick(dx5s, e, E)
        tl.store(dx5_ptr + planes[:, None].to(tl.int64) * (H * W) + ih * W + iw,
                 tl.where(x5v > 0.0, acc5, 0.0).to(dx5_ptr.dtype.element_ty), mask=xm)
    if HAS5 and X5 == 0:
        acc = _gather_conv(acc, g5_ptr, w5_ptr, planes, ch, pm, ih, iw, HO, WO, 5, 1, 2, STRIDE)
    if HASD3:
        acc = _gather_conv(acc, gd3_ptr, wd3_ptr, planes, ch, pm, ih, iw, HO, WO, 3, 2, 2, STRIDE)
    if HASD5:
        acc = _gather_conv(acc, gd5_ptr, wd5_ptr, planes, ch, pm, ih, iw, HO, WO, 5, 2, 4, STRIDE)
    acc = tl.where(xv > 0.0, acc, 0.0)  # ReLU'(x), as threshold_backward: 0 at x == 0

    if HASMAX or HASAVG:
        o_base = planes[:, None].to(tl.int64) * (HO * WO)
        for t in tl.static_range(9):  # window tap t = (ty, tx) of output o that lands on this pixel
            ty = t // 3
            tx = t % 3
            th = ih + 1 - ty  # o_h · STRIDE = window top + 1
            tw = iw + 1 - tx
            ok = (th >= 0) & (tw >= 0)
            if STRIDE > 1:
                ok = ok & (th % STRIDE == 0) & (tw % STRIDE == 0)
            oh = th // STRIDE
            ow = tw // STRIDE
            m = xm & ok & (oh < HO) & (ow < WO)
            if HASMAX:
                # PyTorch routes the gradient to the FIRST maximum in row-major window order: this
                # pixel wins iff it equals the window max and no earlier in-bounds tap does.
                mx = tl.load(ymax_ptr + o_base + oh * WO + ow, mask=m, other=0.0).to(tl.float32)
                hit = m & (xv == mx)
                for u in tl.static_range(t):
                    uh = th - 1 + u // 3
                    uw = tw - 1 + u % 3
                    um = hit & (uh >= 0) & (uh < H) & (uw >= 0) & (uw < W)
                    xu = tl.load(x_base + uh * W + uw, mask=um, other=0.0).to(tl.float32)
                    hit = hit & ~(um & (xu == mx))
                g = tl.load(gmax_ptr + o_base + oh * WO + ow, mask=hit, other=0.0).to(tl.float32)
                acc += g
            if HASAVG:
                cnt = (tl.minimum(th + 2, H) - tl.maximum(th - 1, 0)) * (tl.minimum(tw + 2, W) - tl.maximum(tw - 1, 0))
                g = tl.load(gavg_ptr + o_base + oh * WO + ow, mask=m, other=0.0).to(tl.float32)
                acc += g / tl.maximum(cnt, 1).to(tl.float32)

    offs = planes[:, None].to(tl.int64) * (H * W) + ih * W + iw
    dx_ptr = pick(dxs, e, E)
    if HASACC:
        gacc_ptr = pick(gaccs, e, E)
        acc += tl.load(gacc_ptr + offs, mask=xm, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=xm)


@triton.jit
def stencil_bwd_weight_kernel(
    xs, x5s, g3s, g5s, gd3s, gd5s, part_ptr, means, rstds,
    P, C, H, W, HO, WO,
    HAS3: tl.constexpr, HAS5: tl.constexpr, HASD3: tl.constexpr, HASD5: tl.constexpr, X5: tl.constexpr,
    NORM: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, E: tl.constexpr,
):
    """part[e, tile, n, filter, c, tap] = Σ_{o in tile} g[plane, o] · relu(x[plane, o·s + tap offset]) in fp32
    (plane = n·C + c; x5 for the 5×5 filter with X5), for the selected branches' filters only (see the module
    docstring for the layout). Every pointer but part_ptr is a tuple of E: program (planes, pixels, e) computes
    edge e."""
    e = tl.program_id(2)
    x_ptr, x5_ptr, mean_ptr, rstd_ptr = pick(xs, e, E), pick(x5s, e, E), pick(means, e, E), pick(rstds, e, E)
    g3_ptr, g5_ptr, gd3_ptr, gd5_ptr = pick(g3s, e, E), pick(g5s, e, E), pick(gd3s, e, E), pick(gd5s, e, E)
    planes, pix, pm, sm, oh, ow = _tile(P, HO * WO, WO, BLOCK_P, BLOCK_HW)
    om = pm[:, None] & sm[None, :]
    out = planes[:, None].to(tl.int64) * (HO * WO) + pix[None, :]
    x_base = x_ptr + planes[:, None].to(tl.int64) * (H * W)
    x5_base = x5_ptr + planes[:, None].to(tl.int64) * (H * W)
    if HAS3:
        g3 = tl.load(g3_ptr + out, mask=om, other=0.0).to(tl.float32)
    if HAS5:
        g5 = tl.load(g5_ptr + out, mask=om, other=0.0).to(tl.float32)
    if HASD3:
        gd3 = tl.load(gd3_ptr + out, mask=om, other=0.0).to(tl.float32)
    if HASD5:
        gd5 = tl.load(gd5_ptr + out, mask=om, other=0.0).to(tl.float32)
    off5 = 9 * HAS3  # each selected branch's first tap per channel; its block starts at C times that
    offd3 = off5 + 25 * HAS5
    offd5 = offd3 + 9 * HASD3
    taps = offd5 + 25 * HASD5
    ch = planes % C
    mu, rs, mu5, rs5 = _norm(mean_ptr, rstd_ptr, ch, pm, C, NORM)
    tile = e * tl.num_programs(1) + tl.program_id(1)  # edge e's partials follow edge e - 1's
    row = part_ptr + (tile * P + planes - ch).to(tl.int64) * taps  # (tile, image): C·taps long
    p3 = row + ch * 9  # this channel's taps in each filter's [C, k²] block
    p5 = row + C * off5 + ch * 25
    pd3 = row + C * offd3 + ch * 9
    pd5 = row + C * offd5 + ch * 25
    ch_ = oh * STRIDE
    cw_ = ow * STRIDE
    for a in tl.static_range(9):
        for b in tl.static_range(9):
            dy = a - 4
            dx = b - 4
            in3 = (dy >= -1) and (dy <= 1) and (dx >= -1) and (dx <= 1)
            in5 = (dy >= -2) and (dy <= 2) and (dx >= -2) and (dx <= 2)
            even = (dy % 2 == 0) and (dx % 2 == 0)
            ind3 = in5 and even
            if (in3 and HAS3) or (in5 and HAS5) or (ind3 and HASD3) or (even and HASD5):
                ih = ch_ + dy
                iw = cw_ + dx
                m = om & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[None, :]
                v = tl.load(x_base + (ih * W + iw)[None, :], mask=m, other=0.0).to(tl.float32)
                if NORM:
                    v = tl.where(m, (v - mu[:, None]) * rs[:, None], 0.0)
                r = tl.maximum(v, 0.0)
                if in3 and HAS3:
                    tl.store(p3 + (dy + 1) * 3 + (dx + 1), tl.sum(r * g3, axis=1), mask=pm)
                if in5 and HAS5:
                    if X5:  # the 5×5 branch's own input
                        v5 = tl.load(x5_base + (ih * W + iw)[None, :], mask=m, other=0.0).to(tl.float32)
                        if NORM:
                            v5 = tl.where(m, (v5 - mu5[:, None]) * rs5[:, None], 0.0)
                        r5 = tl.maximum(v5, 0.0)
                        tl.store(p5 + (dy + 2) * 5 + (dx + 2), tl.sum(r5 * g5, axis=1), mask=pm)
                    else:
                        tl.store(p5 + (dy + 2) * 5 + (dx + 2), tl.sum(r * g5, axis=1), mask=pm)
                if ind3 and HASD3:
                    tl.store(pd3 + (dy // 2 + 1) * 3 + (dx // 2 + 1), tl.sum(r * gd3, axis=1), mask=pm)
                if even and HASD5:
                    tl.store(pd5 + (dy // 2 + 2) * 5 + (dx // 2 + 2), tl.sum(r * gd5, axis=1), mask=pm)
