"""bn_fold: the batch-statistics BatchNorm folded into edge_reduce with a written-out backward, against
autograd through torch.var_mean and the plain-PyTorch edge_reduce (float64 oracle where it matters)."""
import pytest
import torch

from milenas_fast.ops import select
from milenas_fast.ops.bn_fold import batch_stats, bn_fold_grad, bn_fold_grad_reference, folded_reduce
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
    var, mean = batch_stats(got_in[0][:K].detach())
    c = ys.shape[2]
    mean = torch.cat([mean[:B], torch.zeros(K - B, c, device=dev)])
    rstd = torch.cat([torch.rsqrt(var[:B] + 1e-5), torch.ones(K - B, c, device=dev)])
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


def test_batch_stats_16bit_from_fp32_accumulation():
    """bf16 data: Σy and ‖y‖² accumulated in fp32, no bf16 rounding of the statistics themselves."""
    ys, _, _ = _inputs(3, 4, 5, 6, 7, "cpu", seed=5, dtype=torch.bfloat16)
    var, mean = batch_stats(ys)
    rv, rm = torch.var_mean(ys.double(), dim=(1, 3, 4), unbiased=False)
    assert var.dtype == mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), rm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), rv, rtol=1e-5, atol=1e-5)
