"""The multi-stencil Triton op against its plain-PyTorch twin (forward, d/dx and the four filters).

Without a GPU the kernels run in Triton's interpreter, which must be switched on before triton or the
kernel module is imported (hence the environment line above the imports).
"""
import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

pytest.importorskip("triton")
from milenas_fast.ops import stencil as stencil_mod  # noqa: E402
from milenas_fast.ops import tiles  # noqa: E402
from milenas_fast.ops.tiles import launch_config, stencil_config  # noqa: E402
from milenas_fast.ops.stencil import (relu_depthwise, relu_depthwise_pair,  # noqa: E402
                                      relu_depthwise_pair_bn, relu_depthwise_pair_bn_reference,
                                      relu_depthwise_reference, stencil, stencil_reference, stencil_with_identity)

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the real-shape CUDA tests only
NAMES = ("dw3", "dw5", "dil3", "dil5", "max", "avg")
GRADS = ("x", "w3", "w5", "wd3", "wd5")


def make(N, C, H, dtype, gen, ties=False, device=DEV):
    if ties:  # few distinct values: max-pool windows with several maxima (tests PyTorch's tie rule)
        x = torch.randint(-2, 3, (N, C, H, H), generator=gen).to(dtype)
    else:
        x = torch.randn(N, C, H, H, generator=gen).to(dtype)
    ws = [(torch.randn(C, 1, k, k, generator=gen) / k).to(dtype) for k in (3, 5, 3, 5)]
    return x.to(device), [w.to(device) for w in ws]


def run(fn, x, ws, stride, grad_outs, need=(True,) * 5):
    """Outputs of fn and the gradients of Σ⟨grad_out, y⟩ (grad_out None: that output is unused)."""
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip([x, *ws], need)]
    ys = fn(*leaves, stride)
    used = [(y, g) for y, g in zip(ys, grad_outs) if g is not None and y.requires_grad]
    wrt = [t for t in leaves if t.requires_grad]
    gs = torch.autograd.grad([y for y, _ in used], wrt, [g for _, g in used], allow_unused=True)
    it = iter(g if g is not None else torch.zeros_like(t) for g, t in zip(gs, wrt))  # unused: zero
    return [y.detach() for y in ys], [next(it) if n else None for n in need]


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def grads_like(N, C, H, stride, gen, device, dtype=torch.float32):
    HO = (H - 1) // stride + 1
    return [torch.randn(N, C, HO, HO, generator=gen).to(dtype).to(device) for _ in NAMES]


def assert_matches(x, ws, stride, g, need=(True,) * 5, what="", max_tile=0):
    """fp32: the six outputs and every requested gradient equal the reference's (tight tolerances)."""
    ys, gs = run(functools.partial(stencil, max_tile=max_tile), x, ws, stride, g, need)
    yr, gr = run(stencil_reference, x, ws, stride, g, need)
    for name, a, b in zip(NAMES, ys, yr):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} {what}")
    for name, a, b in zip(GRADS, gs, gr):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=f"grad {name} {what}")


@pytest.mark.gpu_path
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("H", [7, 9, 16])
def test_fp32_matches_reference(H, stride, device):
    gen = torch.Generator().manual_seed(H * 10 + stride)
    x, ws = make(3, 5, H, torch.float32, gen, device=device)
    assert_matches(x, ws, stride, grads_like(3, 5, H, stride, gen, device))


# Tile limits that force many programs under the interpreter, as on the GPU (which pays nothing per
# program; the interpreter ~0.5 s, hence one image). A plane larger than the tile is split over pixel tiles
# (one plane per program): programs along BOTH grid dimensions, the last pixel tile partial. A smaller
# plane packs several planes per program: 5 planes leave the last block partial.
@pytest.mark.gpu_path
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("C,tile,split", [(2, 8, "pixels"), (5, 128, "planes")])
def test_many_programs(C, tile, split, stride, device):
    N, H = 1, 5
    gen = torch.Generator().manual_seed(tile + stride)
    x, ws = make(N, C, H, torch.float32, gen, device=device)
    for kernel in ("fwd", "bwd_input", "bwd_weight"):
        bp, bhw, grid, _ = launch_config(kernel, x.shape, stride, tile)
        if split == "pixels":
            assert bp == 1 and grid[0] == N * C and grid[1] > 1, (kernel, bp, bhw, grid)
        else:
            assert bp > 1 and grid[0] > 1 and (N * C) % bp, (kernel, bp, bhw, grid)
    assert stencil_config("fwd", x.shape, stride, 1, tile) == launch_config("fwd", x.shape, stride, tile)
    assert_matches(x, ws, stride, grads_like(N, C, H, stride, gen, device), what=f"tile {tile}", max_tile=tile)


def test_max_tile_is_checked():
    x, ws = make(1, 2, 4, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="power of two"):
        stencil(x, *ws, 1, max_tile=24)


@pytest.mark.gpu_path
@pytest.mark.parametrize("stride", [1, 2])
def test_maxpool_ties_and_absent_grads(stride, device):
    """Integer-valued input: many tied maxima, and ReLU inputs exactly 0. Only some outputs used."""
    gen = torch.Generator().manual_seed(7 + stride)
    x, ws = make(3, 5, 9, torch.float32, gen, ties=True, device=device)
    g = grads_like(3, 5, 9, stride, gen, device)
    for keep in ((4,), (0, 3, 5)):
        gk = [gi if i in keep else None for i, gi in enumerate(g)]
        _, gs = run(stencil, x, ws, stride, gk)
        _, gr = run(stencil_reference, x, ws, stride, gk)
        for name, a, b in zip(GRADS, gs, gr):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=f"grad {name}, outputs {keep}")


@pytest.mark.gpu_path
def test_partial_requires_grad(device):
    """α-only style (x only) and frozen input (filters only): each backward half alone is right."""
    gen = torch.Generator().manual_seed(3)
    x, ws = make(3, 5, 7, torch.float32, gen, device=device)
    g = grads_like(3, 5, 7, 2, gen, device)
    for need in ((True, False, False, False, False), (False, True, True, False, True)):
        assert_matches(x, ws, 2, g, need, what=f"need {need}")


def check_low_precision(N, C, H, stride, dtype, seed, device=DEV):
    """STYLE.md's rule: error vs an fp64 reference ≤ 2× plain PyTorch's in the same dtype + a small term."""
    gen = torch.Generator().manual_seed(seed)
    x, ws = make(N, C, H, dtype, gen, device=device)
    g = grads_like(N, C, H, stride, gen, device, dtype)
    ys, gs = run(stencil, x, ws, stride, g)
    yl, gl = run(stencil_reference, x, ws, stride, g)  # PyTorch in the low precision
    y64, g64 = run(stencil_reference, x.double(), [w.double() for w in ws], stride, [t.double() for t in g])
    eps = torch.finfo(dtype).eps
    for name, a, lo, ref in zip(NAMES + GRADS, ys + gs, yl + gl, y64 + g64):
        assert a.dtype == dtype, name
        bound = 2 * err(lo, ref) + eps * ref.abs().max().item()
        assert err(a, ref) <= bound, f"{name}: {err(a, ref):.3g} > {bound:.3g} (torch {err(lo, ref):.3g})"


@pytest.mark.gpu_path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stride", [1, 2])
def test_low_precision(dtype, stride, device):
    check_low_precision(3, 5, 9, stride, dtype, seed=stride, device=device)


# --- skipped branches and relu_depthwise (the same kernels with one branch) ------------------------

@pytest.fixture
def launches(monkeypatch):
    """(kernel name, its six or four HAS flags) of every Triton launch the stencil ops make."""
    seen = []
    real = stencil_mod._launch

    def spy(kernel, grid, *args, **meta):
        flags = [meta[k] for k in ("HAS3", "HAS5", "HASD3", "HASD5", "HASMAX", "HASAVG") if k in meta]
        seen.append((kernel.fn.__name__.removeprefix("stencil_").removesuffix("_kernel"), flags))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(stencil_mod, "_launch", spy)
    return seen


def grads_of(fn, inputs, grad_outs):
    """fn's outputs and d Σ⟨grad_out, y⟩ / d input for each input that requires grad (else None)."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ys = fn(*leaves)
    used = [(y, g) for y, g in zip(ys, grad_outs) if y is not None and g is not None]
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    gs = iter(torch.autograd.grad([y for y, _ in used], wrt, [g for _, g in used]) if wrt else ())
    return ([y if y is None else y.detach() for y in ys],
            [next(gs) if t is not None and t.requires_grad else None for t in leaves])


@pytest.mark.gpu_path
@pytest.mark.parametrize("pools", [True, False])
def test_none_filters_skip_their_branches(pools, device, launches):
    """Absent conv candidates (None) and pools=False: no output, no gradient, no HAS flag in any kernel;
    what is computed equals the reference, filter gradients included (compact tap layout, w3 | wd5)."""
    gen = torch.Generator().manual_seed(11 + pools)
    x, ws = make(3, 5, 9, torch.float32, gen, device=device)
    ws = [ws[0].requires_grad_(), None, None, ws[3].requires_grad_()]
    x.requires_grad_()
    g = grads_like(3, 5, 9, 2, gen, device)

    def fn(ref):
        op = stencil_reference if ref else stencil
        return lambda x, *ws: op(x, *ws, 2, pools=pools)

    ys, gs = grads_of(fn(False), [x, *ws], g)
    yr, gr = grads_of(fn(True), [x, *ws], g)
    present = [True, False, False, True, pools, pools]
    assert [y is not None for y in ys] == [y is not None for y in yr] == present
    for name, a, b in zip(NAMES, ys, yr):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for name, a, b in zip(GRADS, gs, gr):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=f"grad {name}")
    assert launches == [("fwd", present), ("bwd_input", present), ("bwd_weight", present[:4])]


def rd_inputs(N, C, H, W, k, dtype, gen, device):
    x = torch.randn(N, C, H, W, generator=gen).to(dtype)
    w = torch.randn(C, 1, k, k, generator=gen) / k  # an fp32 filter, as autocast leaves the parameter
    return x.to(device), w.to(device)


def check_relu_depthwise(x, w, stride, tol, max_tile=0):
    """relu_depthwise vs its twin: output, dx and dw, dtypes: x's for y and dx, the filter's for dw."""
    gen = torch.Generator().manual_seed(x.shape[2] * 10 + w.shape[-1])
    HO, WO = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
    g = torch.randn(x.shape[0], x.shape[1], HO, WO, generator=gen).to(x.device, x.dtype)
    inputs = [x.requires_grad_(), w.requires_grad_()]
    (y,), (dx, dw) = grads_of(lambda x, w: (relu_depthwise(x, w, stride, max_tile=max_tile),), inputs, [g])
    (yr,), (dxr, dwr) = grads_of(lambda x, w: (relu_depthwise_reference(x, w, stride),), inputs, [g])
    assert (y.dtype, dx.dtype, dw.dtype) == (x.dtype, x.dtype, w.dtype)
    assert y.shape == yr.shape and dw.shape == w.shape and dw.is_contiguous()
    for name, a, b in (("y", y, yr), ("dx", dx, dxr), ("dw", dw, dwr)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()), msg=name)


@pytest.mark.gpu_path
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("H,W,stride", [(7, 9, 1), (11, 6, 1), (11, 6, 2)])
def test_relu_depthwise_fp32(H, W, stride, k, device):
    gen = torch.Generator().manual_seed(H + W + k)
    check_relu_depthwise(*rd_inputs(3, 5, H, W, k, torch.float32, gen, device), stride, 1e-5)


@pytest.mark.gpu_path
@pytest.mark.parametrize("k", [3, 5])
def test_relu_depthwise_bf16(k, device):
    """bf16 x (and y, dx): STYLE.md's rule against an fp64 oracle, 2× plain PyTorch's bf16 error + eps."""
    gen = torch.Generator().manual_seed(k)
    x, w = rd_inputs(3, 5, 11, 6, k, torch.bfloat16, gen, device)
    g = torch.randn(3, 5, 11, 6, generator=gen).to(device, torch.bfloat16)
    inputs = [x.requires_grad_(), w.requires_grad_()]
    (y,), gs = grads_of(lambda x, w: (relu_depthwise(x, w),), inputs, [g])
    (yl,), gl = grads_of(lambda x, w: (relu_depthwise_reference(x, w),), inputs, [g])
    (y64,), g64 = grads_of(lambda x, w: (relu_depthwise_reference(x, w),), [x.double(), w.double()], [g.double()])
    eps = torch.finfo(torch.bfloat16).eps
    assert (y.dtype, gs[0].dtype, gs[1].dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    for name, a, lo, ref in zip(("y", "dx", "dw"), [y, *gs], [yl, *gl], [y64, *g64]):
        bound = 2 * err(lo, ref) + eps * ref.abs().max().item()
        assert err(a, ref) <= bound, f"{name}: {err(a, ref):.3g} > {bound:.3g} (torch {err(lo, ref):.3g})"


@pytest.mark.gpu_path
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("tile,split", [(16, "pixels"), (64, "planes")])
def test_relu_depthwise_many_programs(tile, split, k, device):
    """Programs along both grid dimensions (a 5×7 plane over 3 pixel tiles), or several planes per
    program with the last block partial (5 planes of 15 pixels, 2 per program)."""
    N, C, H, W = (1, 2, 5, 7) if split == "pixels" else (1, 5, 5, 3)
    for kernel in ("fwd", "bwd_input", "bwd_weight"):
        bp, _, grid, _ = launch_config(kernel, (N, C, H, W), 1, tile)
        assert (grid[0] > 1 and grid[1] > 1) if split == "pixels" else (bp > 1 and (N * C) % bp), (kernel, grid)
    gen = torch.Generator().manual_seed(tile + k)
    check_relu_depthwise(*rd_inputs(N, C, H, W, k, torch.float32, gen, device), 1, 1e-5, max_tile=tile)


@pytest.mark.gpu_path
@pytest.mark.parametrize("need_x,need_w,kernels", [(True, False, ["fwd", "bwd_input"]),
                                                   (False, True, ["fwd", "bwd_weight"])])
def test_relu_depthwise_launches_one_branch_and_only_the_needed_half(need_x, need_w, kernels, device, launches):
    """α-only passes (filter frozen) launch no weight-gradient kernel, frozen inputs no input-gradient one;
    every launch selects the one branch (5×5: HAS5 only)."""
    gen = torch.Generator().manual_seed(5)
    x, w = rd_inputs(3, 5, 7, 9, 5, torch.float32, gen, device)
    g = torch.randn(3, 5, 7, 9, generator=gen).to(device)
    inputs = [x.requires_grad_(need_x), w.requires_grad_(need_w)]
    _, gs = grads_of(lambda x, w: (relu_depthwise(x, w),), inputs, [g])
    _, gr = grads_of(lambda x, w: (relu_depthwise_reference(x, w),), inputs, [g])
    assert [name for name, _ in launches] == kernels
    for _, flags in launches:
        assert flags[:4] == [False, True, False, False] and not any(flags[4:]), flags
    for a, b in zip(gs, gr):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.gpu_path
@pytest.mark.parametrize("stride,pools,tile", [(1, True, None), (2, False, 16), (1, True, 64)])
def test_identity_gradient_joins_dx_in_the_input_gradient_kernel(stride, pools, tile, device, launches):
    """stencil_with_identity: x as a first output; its gradient (a mixed op's identity candidate's) is added to dx
    by the input-gradient kernel itself (no separate add): dx and every filter gradient equal the reference's
    (x itself plus the twin), with several programs per grid dimension (tiles 16, 64)."""
    gen = torch.Generator().manual_seed(stride * 10 + pools)
    x, ws = make(2, 3, 7, torch.float32, gen, device=device)
    g = [torch.randn(x.shape, generator=gen).to(device)] + grads_like(2, 3, 7, stride, gen, device)
    inputs = [x.requires_grad_(), *[w.requires_grad_() for w in ws]]

    def ours(x, *ws):
        return stencil_with_identity(x, *ws, stride, pools=pools, max_tile=tile or 0)

    def twin(x, *ws):
        return (x, *stencil_reference(x, *ws, stride, pools=pools))

    ys, gs = grads_of(ours, inputs, g)
    yr, gr = grads_of(twin, inputs, g)
    assert [name for name, _ in launches] == ["fwd", "bwd_input", "bwd_weight"]  # no add: not a launch of ours
    torch.testing.assert_close(ys[0], x.detach(), rtol=0, atol=0)
    for name, a, b in zip(("y",) + NAMES + GRADS, ys + gs, yr + gr):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 * max(1.0, b.abs().max().item()), msg=name)


@pytest.mark.gpu_path
def test_identity_gradient_alone_and_x_frozen(device, launches):
    """Only the identity output used: dx is its gradient (through the same kernel); x frozen: no input-gradient
    kernel, the filters' gradients as the reference's."""
    gen = torch.Generator().manual_seed(3)
    x, ws = make(2, 3, 6, torch.float32, gen, device=device)
    gid = torch.randn(x.shape, generator=gen).to(device)
    (dx,) = torch.autograd.grad(stencil_with_identity(x.requires_grad_(), *ws, 1)[0], x, gid)
    torch.testing.assert_close(dx, gid, rtol=0, atol=0)
    g = [None] + grads_like(2, 3, 6, 1, gen, device)[:4] + [None, None]  # x frozen: identity, pools unused
    inputs = [x.detach(), *[w.requires_grad_() for w in ws]]
    _, gs = grads_of(lambda x, *ws: stencil_with_identity(x, *ws, 1), inputs, g)
    _, gr = grads_of(lambda x, *ws: (x, *stencil_reference(x, *ws, 1)), inputs, g)
    assert "bwd_input" not in [name for name, _ in launches[2:]]
    assert gs[0] is None and gr[0] is None
    for a, b in zip(gs[1:], gr[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 * max(1.0, b.abs().max().item()))


def pair_reference(x3, w3, x5, w5):
    return relu_depthwise_reference(x3, w3), relu_depthwise_reference(x5, w5)


def pair_inputs(N, C, H, W, dtype, gen, device):
    x3, w3 = rd_inputs(N, C, H, W, 3, dtype, gen, device)
    x5, w5 = rd_inputs(N, C, H, W, 5, dtype, gen, device)
    g = [torch.randn(N, C, H, W, generator=gen).to(device, dtype) for _ in range(2)]
    return [x3, w3, x5, w5], g


@pytest.mark.gpu_path
@pytest.mark.parametrize("N,C,H,W,tile", [(3, 5, 7, 9, None), (1, 2, 5, 7, 16), (1, 5, 5, 3, 64)])
def test_relu_depthwise_pair_matches_two_calls(N, C, H, W, tile, device, launches):
    """Both sep convs' second stages (3×3 of x3, 5×5 of x5) in one launch each way: outputs and the gradients of
    x3, x5, w3 and w5 are the reference's; odd shapes, programs along both grid dimensions (tile 16) and several
    planes per program with a partial last block (tile 64)."""
    gen = torch.Generator().manual_seed(N * 100 + H + (tile or 0))
    inputs, g = pair_inputs(N, C, H, W, torch.float32, gen, device)
    for t in inputs:
        t.requires_grad_()
    ys, gs = grads_of(functools.partial(relu_depthwise_pair, max_tile=tile or 0), inputs, g)
    yr, gr = grads_of(pair_reference, inputs, g)
    assert [name for name, _ in launches] == ["fwd", "bwd_input", "bwd_weight"]
    for name, a, b in zip(("y3", "y5", "dx3", "dw3", "dx5", "dw5"), ys + gs, yr + gr):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 * max(1.0, b.abs().max().item()), msg=name)


@pytest.mark.gpu_path
@pytest.mark.parametrize("used,need", [((True, False), (True, True, True, True)),  # y5 unused: no dx5, no dw5
                                       ((True, True), (True, False, False, False)),  # only x3 wants a gradient
                                       ((True, True), (False, False, True, False)),  # only x5
                                       ((True, True), (True, False, True, False))])  # α-only pass: filters frozen
def test_relu_depthwise_pair_partial_gradients(used, need, device, launches):
    """Unused outputs and inputs that want no gradient: the other gradients are still the reference's, the absent
    ones None, and frozen filters launch no weight-gradient kernel."""
    gen = torch.Generator().manual_seed(sum(need) * 7 + sum(used))
    inputs, g = pair_inputs(2, 3, 6, 5, torch.float32, gen, device)
    g = [gi if u else None for gi, u in zip(g, used)]

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(n) for t, n in zip(inputs, need)]
        pairs = [(y, gi) for y, gi in zip(fn(*leaves), g) if gi is not None and y.requires_grad]
        wrt = [t for t in leaves if t.requires_grad]
        ys, gos = zip(*pairs)
        out = iter(torch.autograd.grad(ys, wrt, gos, allow_unused=True))
        return [next(out) if t.requires_grad else None for t in leaves]

    gs, gr = grads(relu_depthwise_pair), grads(pair_reference)
    for name, a, b in zip(("dx3", "dw3", "dx5", "dw5"), gs, gr):
        if b is None:  # no gradient wanted, or its output unused
            assert a is None or not a.abs().max(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 * max(1.0, b.abs().max().item()), msg=name)
    assert ("bwd_weight" in [n for n, _ in launches]) == ((need[1] and used[0]) or (need[3] and used[1]))


@pytest.mark.gpu_path
def test_relu_depthwise_pair_bf16(device):
    """bf16 inputs (fp32 filters, as under autocast): STYLE.md's rule against an fp64 oracle, 2× plain PyTorch's
    bf16 error + eps, for both outputs and all four gradients."""
    gen = torch.Generator().manual_seed(21)
    inputs, g = pair_inputs(3, 5, 11, 6, torch.bfloat16, gen, device)
    for t in inputs:
        t.requires_grad_()
    ys, gs = grads_of(relu_depthwise_pair, inputs, g)
    yl, gl = grads_of(pair_reference, inputs, g)
    y64, g64 = grads_of(pair_reference, [t.double() for t in inputs], [t.double() for t in g])
    eps = torch.finfo(torch.bfloat16).eps
    assert [t.dtype for t in ys + gs] == [torch.bfloat16] * 3 + [torch.float32, torch.bfloat16, torch.float32]
    for name, a, lo, ref in zip(("y3", "y5", "dx3", "dw3", "dx5", "dw5"), ys + gs, yl + gl, y64 + g64):
        bound = 2 * err(lo, ref) + eps * ref.abs().max().item()
        assert err(a, ref) <= bound, f"{name}: {err(a, ref):.3g} > {bound:.3g} (torch {err(lo, ref):.3g})"


def pair_bn(h3, w3, h5, w5, eps=1e-5, max_tile=0):
    """relu_depthwise_pair_bn with given statistics (bn_stats of both inputs; the fused MixedOp's form, with tile
    statistics, is tested below)."""
    from milenas_fast.ops.bn_fold import bn_stats

    mean, rstd, _ = bn_stats([h3.detach(), h5.detach()], 0b11, eps)
    return relu_depthwise_pair_bn(h3, w3, h5, w5, mean, rstd, eps, max_tile=max_tile)


def pair_bn_twin(h3, w3, h5, w5):
    return relu_depthwise_pair_bn_reference(h3, w3, h5, w5, None, None, 1e-5)


def bn_inputs(N, C, H, W, dtype, gen, device):
    """pair_inputs with per-channel offsets and scales, so that the normalisation matters."""
    (x3, w3, x5, w5), g = pair_inputs(N, C, H, W, torch.float32, gen, device)
    shift = lambda x: (x * (0.5 + 2 * torch.rand(1, C, 1, 1, generator=gen).to(device))  # noqa: E731
                       + torch.randn(1, C, 1, 1, generator=gen).to(device)).to(dtype)
    return [shift(x3), w3, shift(x5), w5], [t.to(dtype) for t in g]


@pytest.mark.gpu_path
@pytest.mark.parametrize("N,C,H,W,tile", [(3, 5, 7, 9, None), (2, 2, 5, 7, 16), (1, 5, 5, 3, 64)])
def test_relu_depthwise_pair_bn_matches_batch_norm_then_pair(N, C, H, W, tile, device, launches):
    """The inner BNs folded into the second stages: BN(h) normalised as loaded (0 in the padding), the gradients
    of h3, h5 (through the batch statistics, by aten's batch-norm backward) and of both filters are those of
    F.batch_norm followed by the pair; one Triton launch each way; multi-program grids."""
    gen = torch.Generator().manual_seed(N * 100 + H + (tile or 0) + 1)
    inputs, g = bn_inputs(N, C, H, W, torch.float32, gen, device)
    for t in inputs:
        t.requires_grad_()
    ys, gs = grads_of(functools.partial(pair_bn, max_tile=tile or 0), inputs, g)
    yr, gr = grads_of(pair_bn_twin, inputs, g)
    assert [name for name, _ in launches] == ["fwd", "bwd_input", "bwd_weight"]
    for name, a, b in zip(("y3", "y5", "dh3", "dw3", "dh5", "dw5"), ys + gs, yr + gr):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 * max(1.0, b.abs().max().item()), msg=name)
    # the same values through relu_depthwise_pair of the materialised BN outputs
    bn = [torch.nn.functional.batch_norm(x.detach(), None, None, training=True, eps=1e-5) for x in inputs[::2]]
    for a, b in zip(ys, relu_depthwise_pair(bn[0], inputs[1].detach(), bn[1], inputs[3].detach())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu_path
@pytest.mark.parametrize("need", [(True, False, True, False), (False, True, False, True), (True, True, True, False)])
def test_relu_depthwise_pair_bn_partial_gradients(need, device, launches):
    """α-only passes (filters frozen: no weight-gradient kernel), frozen inputs, one branch alone."""
    gen = torch.Generator().manual_seed(sum(need) * 5 + need[0])
    inputs, g = bn_inputs(2, 3, 6, 5, torch.float32, gen, device)
    inputs = [t.requires_grad_(n) for t, n in zip(inputs, need)]
    _, gs = grads_of(pair_bn, inputs, g)
    _, gr = grads_of(pair_bn_twin, inputs, g)
    for name, a, b in zip(("dh3", "dw3", "dh5", "dw5"), gs, gr):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 * max(1.0, b.abs().max().item()), msg=name)
    assert ("bwd_weight" in [n for n, _ in launches]) == (need[1] or need[3])


@pytest.mark.gpu_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pw_tile,tile", [(None, None), pytest.param(256, 16, marks=pytest.mark.slow)])
def test_relu_depthwise_pair_bn_from_tile_statistics(pw_tile, tile, dtype, device, launches, monkeypatch):
    """The fused path's form: h3, h5 from one `pointwise` with tile statistics, the pair's forward merging them
    (no statistics launch): outputs, gradients, and the returned mean / unbiased variance as bn_stats' of h3, h5;
    several pointwise tiles per image and multi-program stencil grids."""
    from milenas_fast.ops.bn_fold import bn_stats
    from milenas_fast.ops.pointwise import pointwise, stats_tile
    from milenas_fast.ops.stencil import relu_depthwise_pair_bn_tiles

    if pw_tile:
        monkeypatch.setattr(tiles, "POINTWISE_TILE", pw_tile)
    gen = torch.Generator().manual_seed(41 + bool(tile))
    N, C, H, W = 3, 16, 7, 9
    zs = [(torch.randn(N, C, H, W, generator=gen) * 2 + 1).to(device, dtype) for _ in range(3)]
    ws = [(torch.randn(C, C, 1, 1, generator=gen) / 4).to(device) for _ in range(3)]
    h3, hd, h5, st = pointwise(zs, ws, 0b101)
    w3, w5 = (torch.randn(C, 1, k, k, generator=gen).to(device) for k in (3, 5))
    g = [torch.randn(N, C, H, W, generator=gen).to(device, dtype) for _ in range(2)]
    launches.clear()

    def ours(a3, v3, a5, v5):
        return relu_depthwise_pair_bn_tiles([a3], [v3], [a5], [v5], [st], [(0, 2)], stats_tile(h3), 1e-5,
                                            max_tile=tile or 0)[0]

    inputs = [h3.requires_grad_(), w3.requires_grad_(), h5.requires_grad_(), w5.requires_grad_()]
    ys, gs = grads_of(ours, inputs, g + [None, None])
    assert [name for name, _ in launches][:1] == ["fwd"]
    mean, var = ys[2:]
    want = bn_stats([h3.detach(), h5.detach()], 0b11, 1e-5)
    torch.testing.assert_close(mean, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, want[2], rtol=1e-4, atol=1e-5)
    if dtype == torch.float32:
        yr, gr = grads_of(pair_bn_twin, inputs, g)
        for name, a, b in zip(("y3", "y5", "dh3", "dw3", "dh5", "dw5"), ys[:2] + gs, yr + gr):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 * max(1.0, b.abs().max().item()), msg=name)
    else:  # bf16: 2× plain PyTorch's error + eps against float64
        yl, gl = grads_of(pair_bn_twin, inputs, g)
        y64, g64 = grads_of(pair_bn_twin, [t.double() for t in inputs], [t.double() for t in g])
        eps = torch.finfo(dtype).eps
        for name, a, lo, ref in zip(("y3", "y5", "dh3", "dw3", "dh5", "dw5"), ys[:2] + gs, yl + gl, y64 + g64):
            bound = 2 * err(lo, ref) + eps * ref.abs().max().item()
            assert err(a, ref) <= bound, f"{name}: {err(a, ref):.3g} > {bound:.3g} (torch {err(lo, ref):.3g})"


@pytest.mark.gpu_path
def test_relu_depthwise_pair_bn_bf16(device):
    """bf16 inner-BN inputs (fp32 filters and statistics): 2× plain PyTorch's bf16 error + eps against fp64."""
    gen = torch.Generator().manual_seed(23)
    inputs, g = bn_inputs(3, 5, 11, 6, torch.bfloat16, gen, device)
    for t in inputs:
        t.requires_grad_()
    ys, gs = grads_of(pair_bn, inputs, g)
    yl, gl = grads_of(pair_bn_twin, inputs, g)
    y64, g64 = grads_of(pair_bn_twin, [t.double() for t in inputs], [t.double() for t in g])
    eps = torch.finfo(torch.bfloat16).eps
    for name, a, lo, ref in zip(("y3", "y5", "dh3", "dw3", "dh5", "dw5"), ys + gs, yl + gl, y64 + g64):
        bound = 2 * err(lo, ref) + eps * ref.abs().max().item()
        assert err(a, ref) <= bound, f"{name}: {err(a, ref):.3g} > {bound:.3g} (torch {err(lo, ref):.3g})"


@pytest.mark.gpu_path
def test_compiled_skipped_branches_and_unused_outputs(device):
    """torch.compile(fullgraph) over relu_depthwise and a stencil with absent filters and unused outputs
    (their gradients None, not zero fills): the gradients equal the eager twins' (aot_eager: the same
    graphs and AOT autograd as inductor, no code generation; ~5 s)."""
    import torch._dynamo

    def loss(rd, st, x, w, w3, wd5):
        ys = st(x, w3, None, None, wd5, 1, pools=True)  # wd5's and avg's outputs unused
        return (rd(x, w) * 2).sum() + ys[0].sum() + (ys[4] ** 2).sum()

    gen = torch.Generator().manual_seed(2)
    ts = [torch.randn(*shape, generator=gen).to(device) for shape in ((2, 3, 7, 5), (3, 1, 5, 5), (3, 1, 3, 3),
                                                                    (3, 1, 5, 5))]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: loss(relu_depthwise, stencil, *a), backend="aot_eager", fullgraph=True)
    got = [t.clone().requires_grad_() for t in ts]
    want = [t.clone().requires_grad_() for t in ts]
    gs = torch.autograd.grad(compiled(*got), got, allow_unused=True)
    gr = torch.autograd.grad(loss(relu_depthwise_reference, stencil_reference, *want), want, allow_unused=True)
    torch._dynamo.reset()
    assert gs[3] is None and gr[3] is None
    for a, b in zip(gs[:3], gr[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_relu_depthwise_refuses_other_filter_sizes():
    with pytest.raises(ValueError, match="filter size 7"):
        relu_depthwise(torch.zeros(1, 2, 4, 4), torch.zeros(2, 1, 7, 7))


# --- on a real GPU: the search's shapes ------------------------------------------------------------

REAL = [(16, 32), (32, 16), (64, 8)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("C,H", REAL)
def test_cuda_real_shapes_fp32(C, H, stride):
    gen = torch.Generator().manual_seed(C + stride)
    x, ws = make(64, C, H, torch.float32, gen)
    HO = (H - 1) // stride + 1
    g = [torch.randn(64, C, HO, HO, generator=gen).to(DEV) for _ in NAMES]
    ys, gs = run(stencil, x, ws, stride, g)
    y64, g64 = run(stencil_reference, x.double(), [w.double() for w in ws], stride, [t.double() for t in g])
    for name, a, b in zip(NAMES + GRADS, ys + gs, y64 + g64):  # fp64 oracle: cuDNN may use TF32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("C,H", REAL)
def test_cuda_real_shapes_bf16(C, H, stride):
    check_low_precision(64, C, H, stride, torch.bfloat16, seed=C + stride)


# --- filter gradients: contiguous views of one ordered sum, no copy ---------------------------------

class _Ops(TorchDispatchMode):
    """Names of the ATen/custom ops run below it (a custom op's body counts as the op)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


COPY_OPS = {"copy_", "_to_copy", "clone", "cat", "stack"}  # kernels that move a gradient


@pytest.mark.gpu_path
@pytest.mark.parametrize("N,C,tile,split", [(2, 3, 8, "pixels"), (3, 5, 128, "planes")])
def test_filter_grads_land_contiguous_without_copies(N, C, tile, split, device):
    """loss.backward() with all four filters requiring grad: each .grad is contiguous and is the weight
    kernel's summed partials itself (one storage, autograd kept the views: no copy, cast or clone op runs),
    and equals the twin's. Programs along both grid dimensions (4 pixel tiles, 2 images), or packed planes
    whose programs straddle images (5 channels, 2 planes per program): the (tile, image) rows and the
    per-filter [C, k²] blocks of the partials are all exercised."""
    H = 5
    gen = torch.Generator().manual_seed(N * C + tile)
    x, ws = make(N, C, H, torch.float32, gen, device=device)  # x frozen: only the weight half runs
    g = grads_like(N, C, H, 1, gen, device)[:4]
    bp, _, grid, _ = launch_config("bwd_weight", x.shape, 1, tile)
    assert (bp == 1 and grid[1] > 1) if split == "pixels" else (bp > 1 and C % bp), (bp, grid)
    got, want = [[w.detach().clone().requires_grad_() for w in ws] for _ in range(2)]
    for op, leaves in ((functools.partial(stencil, max_tile=tile), got), (stencil_reference, want)):
        ys = op(x, *leaves, 1, pools=False)
        loss = sum((y * gi).sum() for y, gi in zip(ys, g))
        with _Ops() as seen:
            loss.backward()
        if op is not stencil_reference:
            assert seen.names.count("stencil_bwd_weight") == 1 and not COPY_OPS & set(seen.names), seen.names
    assert all(w.grad.is_contiguous() for w in got)
    assert len({w.grad.untyped_storage().data_ptr() for w in got}) == 1
    for name, a, b in zip(GRADS[1:], got, want):
        assert a.grad.dtype == b.grad.dtype
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=2e-5, msg=f"grad {name}")


def test_launch_records_name_the_kernels_arguments():
    """Each launch-argument record's fields are its kernel's run-time parameters, in order (constexprs by keyword):
    the stencil's, edge_reduce's Triton kernels' and bn_fold_grad's."""
    import inspect

    import triton.language as tl

    from milenas_fast.kernels import bn_fold as KB
    from milenas_fast.kernels import edge_reduce as KE
    from milenas_fast.kernels import stencil as K
    from milenas_fast.ops import bn_fold, edge_reduce_triton

    for kernel, record in ((K.stencil_fwd_kernel, stencil_mod.FwdArgs), (K.stencil_bwd_input_kernel,
                                                                       stencil_mod.BwdInputArgs),
                           (K.stencil_bwd_weight_kernel, stencil_mod.BwdWeightArgs),
                           (KE.edge_reduce_fwd_kernel, edge_reduce_triton.FwdArgs),
                           (KE.edge_reduce_bwd_kernel, edge_reduce_triton.BwdArgs),
                           (KB.bn_fold_grad_kernel, bn_fold.FoldGradArgs)):
        params = inspect.signature(kernel.fn).parameters.values()
        assert [p.name for p in params if p.annotation is not tl.constexpr and p.annotation != "tl.constexpr"] == \
            list(record._fields), kernel.fn.__name__
