"""The grouped pointwise Triton op against its plain-PyTorch twin (forward, input and weight gradients).

Without a GPU the kernels run in Triton's interpreter (switched on before triton is imported).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from milenas_fast.ops import pointwise as pw, tiles as tile_policy  # noqa: E402
from milenas_fast.ops.pointwise import pointwise, pointwise_reference  # noqa: E402


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, grid) of every Triton launch the op makes."""
    seen = []
    real = pw.launch

    def spy(kernel, grid, *args, **meta):
        seen.append((kernel.fn.__name__.removesuffix("_kernel"), grid))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(pw, "launch", spy)
    return seen


def make(k, N, C, CO, H, W, dtype, seed, device, weight_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(N, C, H, W, generator=gen).to(device, dtype) for _ in range(k)]
    ws = [(torch.randn(CO, C, 1, 1, generator=gen) / C ** 0.5).to(device, weight_dtype or dtype) for _ in range(k)]
    gs = [torch.randn(N, CO, H, W, generator=gen).to(device, dtype) for _ in range(k)]
    return xs, ws, gs


def grads(fn, xs, ws, gs, need_x=True, need_w=True):
    """Outputs and the gradients of Σ⟨g, y⟩ wrt the inputs and weights that want one (g None: output unused)."""
    xs = [x.detach().clone().requires_grad_(need_x) for x in xs]
    ws = [w.detach().clone().requires_grad_(need_w) for w in ws]
    ys = fn(xs, ws)
    pairs = [(y, g) for y, g in zip(ys, gs) if g is not None]
    wrt = [t for t in xs + ws if t.requires_grad]
    outs, gos = zip(*pairs)
    out = iter(torch.autograd.grad(outs, wrt, gos, allow_unused=True) if wrt else ())
    return [y.detach() for y in ys], [next(out) if t.requires_grad else None for t in xs + ws]


def assert_close(a, b, name, tol=1e-5):
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()), msg=name)


@pytest.mark.gpu_path
@pytest.mark.parametrize("k,N,C,CO,H,W,tile", [(1, 2, 3, 5, 4, 7, None), (3, 2, 5, 5, 7, 9, None),
                                               (4, 3, 16, 16, 5, 6, None), (2, 2, 20, 6, 9, 7, 256),
                                               (4, 1, 4, 4, 11, 5, 256), (32, 2, 3, 3, 3, 5, None)])
def test_fp32_matches_reference(k, N, C, CO, H, W, tile, device, launches, monkeypatch):
    """Odd shapes, channels below and above tl.dot's 16, and (tile 256) several pixel tiles per image: outputs and
    every input and weight gradient are the reference's; one launch each way (weights: partials + a sum)."""
    if tile:
        monkeypatch.setattr(tile_policy, "POINTWISE_TILE", tile)
    xs, ws, gs = make(k, N, C, CO, H, W, torch.float32, seed=k * 10 + C, device=device)
    ys, gr = grads(pointwise, xs, ws, gs)
    yr, grr = grads(pointwise_reference, xs, ws, gs)
    assert [name for name, _ in launches] == ["pointwise", "pointwise", "pointwise_wgrad"]
    if tile:
        assert all(grid[2] > 1 for _, grid in launches), launches
    for i, (a, b) in enumerate(zip(ys + gr, yr + grr)):
        assert_close(a, b, f"#{i}")


@pytest.mark.gpu_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,stats,tile", [(4, 0b0101, 256), (4, 0b0010, None), (20, 1 | 1 << 17 | 1 << 19, None)])
def test_tile_statistics_merge_to_the_outputs_statistics(k, stats, tile, dtype, device, launches, monkeypatch):
    """pointwise(..., stats): the outputs unchanged, plus per-tile means and squared deviations of the named
    outputs as stored; merged over tiles (Chan et al.'s rule, as the pair kernel merges them) they are the
    outputs' batch mean and variance (float64 oracle); several tiles per image (tile 256), a partial last tile;
    one launch; the statistics take no gradient."""
    if tile:
        monkeypatch.setattr(tile_policy, "POINTWISE_TILE", tile)
    xs, ws, gs = make(k, 3, 16, 16, 7, 9, dtype, seed=31, device=device)
    xs = [x * (1 + i % 5) + i for i, x in enumerate(xs)]  # offsets and scales: the merge must centre
    outs = pointwise(xs, ws, stats)
    *ys, st = outs
    assert [name for name, _ in launches] == ["pointwise"] and not st.requires_grad
    for a, b in zip(ys, pointwise(xs, ws)):
        assert torch.equal(a, b)
    n, hw = 3, 7 * 9
    tb = pw.stats_tile(ys[0])
    tiles = -(-hw // tb)
    assert st.shape == (k, n * tiles, 2, 16) and st.dtype == torch.float32
    if tile:
        assert tiles > 1 and hw % tb
    cnt = torch.tensor([min(tb, hw - t * tb) for t in range(tiles)] * n, dtype=torch.float64)
    for r in range(k):
        if not stats >> r & 1:
            continue
        m, q = st[r, :, 0].double().cpu(), st[r, :, 1].double().cpu()
        mean = (cnt[:, None] * m).sum(0) / (n * hw)
        m2 = (q + cnt[:, None] * (m - mean) ** 2).sum(0)
        var, want = torch.var_mean(ys[r].double().cpu(), dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m2 / (n * hw), var, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu_path
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_bf16_within_twice_torch_error(weight_dtype, device):
    """bf16 inputs (weights cast to bf16 as under autocast, or left fp32): against an fp64 oracle, within 2× plain
    PyTorch's bf16 error + eps, outputs and all gradients; dtypes: the inputs' and the weights' own."""
    xs, ws, gs = make(3, 2, 12, 12, 6, 5, torch.bfloat16, seed=3, device=device, weight_dtype=weight_dtype)
    ys, gr = grads(pointwise, xs, ws, gs)
    yl, gl = grads(pointwise_reference, xs, ws, gs)
    y64, g64 = grads(pointwise_reference, [x.double() for x in xs], [w.double() for w in ws], [g.double() for g in gs])
    assert [t.dtype for t in ys + gr] == [torch.bfloat16] * 6 + [weight_dtype] * 3
    eps = torch.finfo(torch.bfloat16).eps
    for i, (a, lo, ref) in enumerate(zip(ys + gr, yl + gl, y64 + g64)):
        e, el = (a.double() - ref).abs().max().item(), (lo.double() - ref).abs().max().item()
        assert e <= 2 * el + eps * ref.abs().max().item(), f"#{i}: {e:.3g} (torch {el:.3g})"


@pytest.mark.gpu_path
@pytest.mark.parametrize("need_x,need_w,used,kernels", [
    (True, False, (True, True), ["pointwise", "pointwise"]),  # α-only pass: weights frozen, no weight kernel
    (False, True, (True, True), ["pointwise", "pointwise_wgrad"]),
    (True, True, (False, True), ["pointwise", "pointwise", "pointwise_wgrad"]),  # an output unused
])
def test_partial_gradients(need_x, need_w, used, kernels, device, launches):
    """Only what autograd asks for is launched; an unused output's input and weight get no gradient."""
    xs, ws, gs = make(2, 2, 5, 5, 4, 6, torch.float32, seed=7, device=device)
    gs = [g if u else None for g, u in zip(gs, used)]
    _, gr = grads(pointwise, xs, ws, gs, need_x, need_w)
    _, grr = grads(pointwise_reference, xs, ws, gs, need_x, need_w)
    assert [name for name, _ in launches] == kernels
    for i, (a, b) in enumerate(zip(gr, grr)):
        if b is None:
            assert a is None, i
        else:
            assert_close(a, b, f"grad #{i}")


def test_bad_arguments_are_refused():
    x, w = torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 1, 1)
    with pytest.raises(ValueError, match="1 to 32 inputs"):
        pointwise([x] * 33, [w] * 33)
    with pytest.raises(ValueError, match="one shape and dtype"):
        pointwise([x, x[:1]], [w, w])
    with pytest.raises(ValueError, match=r"weights must be \[CO, 3, 1, 1\]"):
        pointwise([x], [torch.zeros(3, 3, 3, 3)])
