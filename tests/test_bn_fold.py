"""bn_fold: the batch-statistics BatchNorm folded into edge_reduce with a written-out backward, against
autograd through torch.var_mean and the plain-PyTorch edge_reduce (float64 oracle where it matters)."""
import pytest
import torch

from milenas_fast.ops import bn_fold, select
from milenas_fast.ops.bn_fold import bn_fold_grad, bn_fold_grad_reference, bn_stats, bn_stats_reference, folded_reduce
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


def _reference(ys, w, B, eps=1e-5):
    """nn.BatchNorm2d semantics by autograd: batch statistics for the first B candidates, 0/1 for the rest."""
    K, C = ys.shape[0], ys.shape[2]
    var, mean = torch.var_mean(ys[:B], dim=(1, 3, 4), unbiased=False) if B else (ys.new_zeros(0, C),) * 2
    const_m, const_r = torch.zeros(K - B, C, dtype=ys.dtype, device=ys.device), torch.ones(K - B, C, dtype=ys.dtype,
                                                                                               device=ys.device)
    return edge_reduce_reference(ys, w, torch.cat([mean, const_m]), torch.cat([torch.rsqrt(var + eps), const_r]))


@pytest.mark.gpu_path
@pytest.mark.parametrize("K,B,shape", [(3, 2, (3, 5, 7, 9)), (4, 4, (2, 3, 5, 5)), (2, 0, (3, 4, 3, 3))])
def test_folded_reduce_gradients_match_batchnorm_autograd(K, B, shape, dev):
    ys, w, grad = _inputs(K, *shape, dev, seed=K + B)
    got_in = [ys.clone().requires_grad_(), w.clone().requires_grad_()]
    mean, rstd, _ = bn_stats(ys, B, 1e-5)
    out = folded_reduce(got_in[0], got_in[1], mean, rstd, B)
    gy, gw = torch.autograd.grad(out, got_in, grad)
    ref_in = [ys.double().requires_grad_(), w.double().requires_grad_()]
    ref = _reference(*ref_in, B)
    ry, rw = torch.autograd.grad(ref, ref_in, grad.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gy.double(), ry, rtol=1e-5, atol=1e-5 * ry.abs().max().item())
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-5 * rw.abs().max().item())


@pytest.mark.gpu_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_fold_grad_matches_twin(dtype, dev):
    K, B = 3, 2
    ys, w, grad = _inputs(K, 2, 3, 5, 7, dev, seed=9, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    mean, rstd, gm, gr = (torch.randn(K, 3, generator=g).to(dev) for _ in range(4))
    got = bn_fold_grad(grad, ys, w, mean, rstd, gm, gr, B)
    want = bn_fold_grad_reference(grad, ys, w, mean, rstd, gm, gr, B)
    assert got.dtype == ys.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())


@pytest.mark.gpu_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,shape,tile", [(3, (3, 5, 7, 9), None), (2, (2, 3, 5, 5), None), (2, (2, 3, 5, 7), 16)])
def test_bn_stats_matches_twin(B, shape, tile, dtype, dev, monkeypatch):
    """Statistics in fp32 from 16-bit data too (no rounding of the statistics), identity rows 0 / 1; an
    offset mean (0.7 vs std 1.5) checks the centred second pass; tile 16 makes the pixel loop run 3 times."""
    if tile:
        monkeypatch.setattr(bn_fold, "MAX_TILE", tile)
    ys, _, _ = _inputs(B + 1, *shape, dev, seed=5, dtype=dtype)
    got = bn_stats(ys, B, 1e-5)
    want = bn_stats_reference(ys.double(), B, 1e-5)
    assert [t.dtype for t in got] == [torch.float32] * 3 and got[2].shape == (B, shape[1])
    for g, w, name in zip(got, want, ("mean", "rstd", "unbiased var")):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(got[0][B:], torch.zeros(1, shape[1], device=dev))
    assert torch.equal(got[1][B:], torch.ones(1, shape[1], device=dev))


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
res = {}
for dt in ("fp32", "bf16"):
    for name, consts in json.loads(sys.argv[2]):
        fn = getattr(mod, name)
        sig = {p.name: "constexpr" if p.is_constexpr or p.name in consts else
               ("*" + dt if p.name in ("g_ptr", "y_ptr", "gy_ptr") else "*fp32") if p.name.endswith("_ptr") else
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


@pytest.mark.gpu_path
def test_bn_fold_kernels_build_for_sm90():
    """Both kernels lower for Hopper at the launchers' tiles (whole 32×32 planes; packed 8×8 planes), in fp32
    and bf16, without spills; N = 1 or HW = 1 arrive as constexprs on the GPU (Triton specialises 1s)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    src = Path(__file__).resolve().parents[1] / "kernels" / "bn_fold.py"
    todo = [("bn_stats_kernel", {"BLOCK_C": 1, "BLOCK_HW": 1024}), ("bn_stats_kernel", {"BLOCK_C": 4, "BLOCK_HW": 64}),
            ("bn_stats_kernel", {"BLOCK_C": 1, "BLOCK_HW": 1024, "N": 1, "HW": 1}),
            ("bn_fold_grad_kernel", {"BLOCK_P": 1, "BLOCK_HW": 1024}), ("bn_fold_grad_kernel", {"BLOCK_P": 16, "BLOCK_HW": 64})]
    p = subprocess.run([sys.executable, "-c", _SM90, str(src), json.dumps(todo)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(res) == 2 * len(todo)
    bad = {k: v for k, v in res.items() if v}
    assert not bad, bad
