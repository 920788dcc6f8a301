"""bn_fold: the batch-statistics BatchNorm folded into edge_reduce with a written-out backward, against
autograd through torch.var_mean and the plain-PyTorch edge_reduce (float64 oracle where it matters).
The ops take the candidates as a list (`_inputs` builds them as one tensor's rows: `list(ys)`)."""
import pytest
import torch

from milenas_fast.ops import edge_reduce_triton, select, tiles
from milenas_fast.ops.bn_fold import (bn_backward, bn_backward_reference, bn_fold_grad, bn_fold_grad_reference, bn_stats,
                                      bn_stats_reference, folded_reduce, running_rstd, running_rstd_reference,
                                      stats_mask)
from milenas_fast.ops.edge_reduce import edge_reduce_reference


@pytest.fixture
def dev(monkeypatch, device):
    monkeypatch.delenv(select.ENV, raising=False)
    assert not select.blockers(device), select.blockers(device)
    return device


def _inputs(K, N, C, H, W, dev, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ys = (torch.randn(K, N, C, H, W, generator=g) * 1.5 + 0.7).to(dev, dtype)
    w = torch.softmax(torch.randn(K, generator=g), 0).to(dev)
    grad = torch.randn(N, C, H, W, generator=g).to(dev, dtype)
    return ys, w, grad


def _reference(ys, w, rows, eps=1e-5):
    """nn.BatchNorm2d semantics by autograd: batch statistics for the candidates in `rows`, 0/1 for the rest."""
    C = ys.shape[2]
    mean, rstd = [], []
    for k, y in enumerate(ys):
        if k in rows:
            var, m = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
            mean.append(m)
            rstd.append(torch.rsqrt(var + eps))
        else:
            mean.append(ys.new_zeros(C))
            rstd.append(ys.new_ones(C))
    return edge_reduce_reference(list(ys), w, torch.stack(mean), torch.stack(rstd))


@pytest.mark.gpu_path
@pytest.mark.parametrize("K,rows,shape", [(3, (0, 2), (3, 5, 7, 9)), (4, (0, 1, 2, 3), (2, 3, 5, 5)),
                                          (2, (), (3, 4, 3, 3)), (5, (0, 1, 3, 4), (2, 3, 4, 5)),
                                          (7, (0, 1, 3, 4, 5, 6), (2, 3, 3, 5)), (1, (0,), (3, 2, 3, 5))])
def test_folded_reduce_gradients_match_batchnorm_autograd(K, rows, shape, dev):
    """The identity (constant 0/1 statistics) in a middle row too, as in PRIMITIVES order at stride 1; the
    candidates in separate storages (as the fused MixedOp's), each getting its own gradient."""
    ys, w, grad = _inputs(K, *shape, dev, seed=K + len(rows))
    cands = [y.clone().requires_grad_() for y in ys]
    got_in = [*cands, w.clone().requires_grad_()]
    mean, rstd, _ = bn_stats(cands, stats_mask(rows), 1e-5)
    out = folded_reduce(cands, got_in[-1], mean, rstd, stats_mask(rows))
    *gys, gw = torch.autograd.grad(out, got_in, grad)
    gy = torch.stack(gys)
    ref_in = [ys.double().requires_grad_(), w.double().requires_grad_()]
    ref = _reference(*ref_in, rows)
    ry, rw = torch.autograd.grad(ref, ref_in, grad.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gy.double(), ry, rtol=1e-5, atol=1e-5 * ry.abs().max().item())
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-5 * rw.abs().max().item())


@pytest.mark.gpu_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,tile", [((0, 2, 3), None), ((0, 2, 3), 16), ((), 16)])
def test_bn_fold_grad_matches_twin(rows, tile, dtype, dev, monkeypatch):
    """Row 1 (the identity) in the middle takes no statistics' share; tile 16 spreads the 2·3 planes of
    5×7 pixels over a 2×3 grid of programs."""
    if tile:
        monkeypatch.setattr(tiles, "PLANE_TILE", tile)
    K = 4
    ys, w, grad = _inputs(K, 2, 3, 5, 7, dev, seed=9, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    mean, rstd, gm, gr = (torch.randn(K, 3, generator=g).to(dev) for _ in range(4))
    got = bn_fold_grad(grad, list(ys), w, mean, rstd, gm, gr, stats_mask(rows))
    want = bn_fold_grad_reference(grad, list(ys), w, mean, rstd, gm, gr, stats_mask(rows))
    assert got.shape == ys.shape
    assert got.dtype == ys.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())
    # the twin itself: constant rows get exactly w·rstd·g, batch-statistics rows more
    a = (w[:, None] * rstd).view(K, 1, 3, 1, 1) * grad.float()
    for k in range(K):
        same = torch.equal(want[k], a[k].to(dtype))
        assert same == (k not in rows), k


@pytest.mark.gpu_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,K,shape,tile", [((0, 1, 2), 4, (3, 5, 7, 9), None), ((0, 2), 3, (2, 3, 5, 5), None),
                                               ((0, 1, 3, 4), 5, (2, 3, 5, 7), 16), ((0,), 1, (2, 3, 3, 5), None),
                                               ((0, 1, 3, 4, 5, 6), 7, (2, 3, 5, 3), 16),
                                               (tuple(k for k in range(40) if k % 7 != 2), 40, (2, 3, 3, 5), None)])
def test_bn_stats_matches_twin(rows, K, shape, tile, dtype, dev, monkeypatch):
    """Statistics in fp32 from 16-bit data too (no rounding of the statistics), the identity's row (last or in
    the middle) exactly 0 / 1 / 0; an offset mean (0.7 vs std 1.5) checks the centred second pass; tile 16
    makes the pixel loop run 3 times; 40 candidates (a fused cell's group of edges: rows past bit 31)."""
    if tile:
        monkeypatch.setattr(tiles, "PLANE_TILE", tile)
    ys, _, _ = _inputs(K, *shape, dev, seed=5, dtype=dtype)
    got = bn_stats(list(ys), stats_mask(rows), 1e-5)
    want = bn_stats_reference(list(ys.double()), stats_mask(rows), 1e-5)
    assert [t.dtype for t in got] == [torch.float32] * 3 and [t.shape for t in got] == [(K, shape[1])] * 3
    for g, w, name in zip(got, want, ("mean", "rstd", "unbiased var")):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-6, msg=name)
    const = [k for k in range(K) if k not in rows]
    for t, v in zip(got, (0.0, 1.0, 0.0)):
        assert torch.equal(t[const], torch.full((len(const), shape[1]), v, device=dev))
    if const:
        assert (got[1][list(rows)] != 1).all()  # not mistaken for an identity row


@pytest.mark.gpu_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,K,shape,tile", [((0, 1, 3, 4), 5, (3, 5, 7, 9), None), ((), 3, (2, 3, 5, 5), 16),
                                               ((0, 1, 2, 3, 4, 5, 6), 7, (2, 3, 5, 7), 16)])
def test_bn_fold_grad_partials_match_the_two_step_path(rows, K, shape, tile, dtype, dev, monkeypatch):
    """bn_fold_grad_partials (edge_reduce's partial sums finished as loaded, gw by program (0, 0)) against
    edge_reduce_backward + bn_fold_grad, from the C++ op's partials (S = 1) and the twin's (S > 1, tile 16: a
    multi-program grid)."""
    from milenas_fast.ops.bn_fold import bn_fold_grad_partials, bn_fold_grad_partials_reference
    from milenas_fast.ops.edge_reduce import edge_reduce_backward

    if tile:
        monkeypatch.setattr(tiles, "PLANE_TILE", tile)
    ys, w, grad = _inputs(K, *shape, dev, seed=9, dtype=dtype)
    ys = list(ys)
    stats = stats_mask(rows)
    mean, rstd, _ = bn_stats(ys, stats, 1e-5)
    _, gw0, gm0, gr0 = edge_reduce_backward(grad, ys, w, mean, rstd, [False, True, True, True])
    gy0 = bn_fold_grad(grad, ys, w, mean, rstd, gm0, gr0, stats)
    parts = [edge_reduce_triton.partials(grad, ys, w, mean, rstd)]
    if dev == "cpu":
        parts.append(torch.ops.milenas_fast.edge_reduce_partials(grad, ys, w, mean, rstd))
    for p in parts:
        gy, gw = bn_fold_grad_partials(grad, ys, w, mean, rstd, *p, stats)
        gyr, gwr = bn_fold_grad_partials_reference(grad, ys, w, mean, rstd, *p, stats)
        assert gy.dtype == dtype and gw.dtype == torch.float32 and gw.shape == (K,)
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        for a, b in ((gy, gy0), (gy, gyr)):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())
        for b in (gw0, gwr):
            torch.testing.assert_close(gw, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.gpu_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,tile", [((3, 5, 7, 9), None), ((2, 3, 5, 7), 16), ((2, 2, 1, 1), None)])
def test_bn_backward_matches_batchnorm(shape, tile, dtype, dev, monkeypatch):
    """Two training-mode BNs' input gradients in one kernel (bn_stats' statistics), as autograd through
    F.batch_norm computes them in float64: fp32 within 1e-5, bf16 within 2× aten's own bf16 error + eps; tile 16
    runs the pixel loop several times; a 1×1 plane over 2 images (the smallest BN with a defined variance)."""
    if tile:
        monkeypatch.setattr(tiles, "PLANE_TILE", tile)
    gen = torch.Generator().manual_seed(sum(shape))
    hs = [(torch.randn(*shape, generator=gen) * (1 + k) + 0.5 - k).to(dev, dtype) for k in range(2)]
    gs = [torch.randn(*shape, generator=gen).to(dev, dtype) for _ in range(2)]
    mean, rstd, _ = bn_stats(hs, 0b11, 1e-5)
    got = bn_backward(*gs, *hs, mean, rstd)
    low = bn_backward_reference(*gs, *hs, mean, rstd)
    for k in range(2):
        h64 = hs[k].double().cpu().requires_grad_()
        y = torch.nn.functional.batch_norm(h64, None, None, training=True, eps=1e-5)
        (want,) = torch.autograd.grad(y, h64, gs[k].double().cpu())
        a, lo = got[k].double().cpu(), low[k].double().cpu()
        assert got[k].dtype == dtype and got[k].shape == hs[k].shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))
        else:
            bound = 2 * (lo - want).abs().max() + torch.finfo(dtype).eps * want.abs().max()
            assert (a - want).abs().max() <= bound, k


def test_bn_backward_rejects_mismatched_inputs():
    h = torch.randn(2, 3, 4, 4)
    mean, rstd = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="must match h0"):
        bn_backward(h, h[:1], h, h, mean, rstd)
    with pytest.raises(ValueError, match=r"float32 \[2, 3\]"):
        bn_backward(h, h, h, h, mean[:1], rstd)


@pytest.mark.gpu_path
@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")  # the interpreter on the -1 rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,tile", [((0, 1, 3), None), ((0, 1, 3), 2), ((), 2)])
def test_running_rstd_matches_twin(rows, tile, dtype, dev, monkeypatch):
    """Eval mode's rstd from running variances (fp32 whatever their dtype); the identity's row (2, in the
    middle) exactly 1 whatever it holds (here -1: NaN if it were used); tile 2 splits 5 channels over 3
    programs per row."""
    if tile:
        monkeypatch.setattr(tiles, "PLANE_TILE", tile)
    g = torch.Generator().manual_seed(8)
    var = (torch.rand(4, 5, generator=g) * 2 + 0.01).to(dev, dtype)
    var[[k for k in range(4) if k not in rows]] = -1
    got = running_rstd(var, stats_mask(rows), 1e-3)
    want = running_rstd_reference(var.double(), stats_mask(rows), 1e-3)
    assert got.dtype == torch.float32 and got.shape == (4, 5)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    const = [k for k in range(4) if k not in rows]
    assert torch.equal(got[const], torch.ones(len(const), 5, device=dev))
    assert not (got[list(rows)] == 1).any()


@pytest.mark.gpu_path
def test_bad_candidate_lists_raise():
    """bn_stats and bn_fold_grad hold the candidates to edge_reduce's contract, with its messages."""
    ys, w, grad = _inputs(3, 2, 3, 3, 5, "cpu", seed=1)
    vec = torch.zeros(3, 3)
    for cands, match in (([ys[0], ys[1][:, :2], ys[2]], r"ys\[1\] must match ys\[0\]"),
                         ([ys[0], ys[1], ys[2].bfloat16()], r"ys\[2\] must match ys\[0\]"),
                         ([ys[0]] * 9, "need 1 to 8 candidates, got 9"), ([], "got 0")):
        if len(cands) != 9:  # bn_stats takes up to 64 (a fused cell's group of edges)
            with pytest.raises(RuntimeError, match=match):
                bn_stats(cands, 1, 1e-5)
        with pytest.raises(RuntimeError, match=match):
            bn_fold_grad(grad, cands, w, vec, vec, vec, vec, 1)
    with pytest.raises(RuntimeError, match="need 1 to 64 candidates, got 65"):
        bn_stats([ys[0]] * 65, 1, 1e-5)


def test_stats_rows_beyond_the_candidates_raise():
    ys = torch.zeros(3, 2, 2, 2, 2)
    for fn in (lambda m: bn_stats(list(ys), m, 1e-5), lambda m: bn_stats_reference(list(ys), m, 1e-5),
               lambda m: running_rstd(ys[:, 0, :, 0, 0], m, 1e-5)):
        with pytest.raises(ValueError, match="beyond the 3 candidates"):
            fn(0b1001)


_SM90 = r"""
import contextlib, importlib.util, io, json, os, re, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"  # the interpreter's patched triton.language cannot compile
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("_bn", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
DATA_PTRS = ("g_ptr", "gy_ptr", "var_ptr", *(f"y{k}_ptr" for k in range(8)),
             "g0_ptr", "g1_ptr", "h0_ptr", "h1_ptr", "dh0_ptr", "dh1_ptr")  # in the data's dtype; the rest fp32
res = {}
for dt in ("fp32", "bf16"):
    for name, consts in json.loads(sys.argv[2]):
        fn = getattr(mod, name)
        sig = {p.name: "constexpr" if p.is_constexpr or p.name in consts else
               ("*" + dt if p.name in DATA_PTRS else "*fp32") if p.name.endswith("_ptr") else
               tuple(["*" + dt] * consts["K"]) if p.name in ("ys", "gs", "hs", "dhs") else  # K candidates / BNs
               tuple(["*fp32"] * consts["K"]) if p.name in ("means", "rstds") else
               ("fp32" if p.name in ("eps", "inv_n") else "i32") for p in fn.params}
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": 4})
            spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
            res[f"{dt} {name} {consts}"] = "" if k.asm.get("cubin") and spills and not any(
                int(a) + int(b) for a, b in spills) else "no cubin, no ptxas report or spills: " + log.getvalue()[-800:]
        except Exception as e:
            res[f"{dt} {name} {consts}"] = repr(e)[-1500:]
print(json.dumps(res))
"""


@pytest.mark.stack  # compiled against this stack's torch/Triton
@pytest.mark.slow  # ptxas for sm_90
@pytest.mark.gpu_path
def test_bn_fold_kernels_build_for_sm90():
    """The kernels lower for Hopper at the launchers' tiles (whole 32×32 planes; packed 8×8 planes), in fp32
    and bf16, without spills; N = 1 or HW = 1 arrive as constexprs on the GPU (Triton specialises 1s)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    src = Path(__file__).resolve().parents[1] / "kernels" / "bn_fold.py"
    s1, s2 = 0b1111011, 0b1111111  # the DARTS candidates at stride 1 (identity in row 2) and 2
    s56 = sum(s1 << 7 * e for e in range(8))  # 8 such edges
    todo = [("bn_stats_kernel", {"K": 7, "STATS": s1, "BLOCK_C": 1, "BLOCK_HW": 1024}),
            ("bn_stats_kernel", {"K": 7, "STATS": s2, "BLOCK_C": 4, "BLOCK_HW": 64}),
            ("bn_stats_kernel", {"K": 7, "STATS": s1, "BLOCK_C": 1, "BLOCK_HW": 1024, "N": 1, "HW": 1}),
            ("bn_stats_kernel", {"K": 56, "STATS": s56, "BLOCK_C": 1, "BLOCK_HW": 1024}),  # a fused cell's group
            ("bn_stats_kernel", {"K": 56, "STATS": s56, "BLOCK_C": 4, "BLOCK_HW": 64}),
            ("bn_fold_grad_kernel", {"K": 7, "STATS": s1, "PARTS": False, "BLOCK_P": 1, "BLOCK_HW": 1024}),
            ("bn_fold_grad_kernel", {"K": 7, "STATS": s2, "PARTS": False, "BLOCK_P": 16, "BLOCK_HW": 64}),
            ("bn_fold_grad_kernel", {"K": 7, "STATS": 0, "PARTS": False, "BLOCK_P": 16, "BLOCK_HW": 64}),
            ("bn_fold_grad_kernel", {"K": 8, "STATS": 0xFF, "PARTS": False, "BLOCK_P": 1, "BLOCK_HW": 1024}),
            ("bn_fold_grad_kernel", {"K": 7, "STATS": s1, "PARTS": True, "BLOCK_P": 1, "BLOCK_HW": 1024}),
            ("bn_fold_grad_kernel", {"K": 7, "STATS": s2, "PARTS": True, "BLOCK_P": 16, "BLOCK_HW": 64}),
            ("running_rstd_kernel", {"STATS": s1, "BLOCK_C": 64}),
            ("bn_backward_kernel", {"K": 2, "BLOCK_C": 1, "BLOCK_HW": 1024}),
            ("bn_backward_kernel", {"K": 2, "BLOCK_C": 4, "BLOCK_HW": 64}),
            ("bn_backward_kernel", {"K": 2, "BLOCK_C": 1, "BLOCK_HW": 1024, "N": 1, "HW": 1}),
            ("bn_backward_kernel", {"K": 16, "BLOCK_C": 1, "BLOCK_HW": 1024}),  # a fused cell group's 8 pairs
            ("bn_backward_kernel", {"K": 16, "BLOCK_C": 4, "BLOCK_HW": 64})]
    p = subprocess.run([sys.executable, "-c", _SM90, str(src), json.dumps(todo)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(res) == 2 * len(todo)
    bad = {k: v for k, v in res.items() if v}
    assert not bad, bad
