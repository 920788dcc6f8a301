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
