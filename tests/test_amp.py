"""Mixed precision on CPU: bf16 autocast keeps α close to the fp32 run; the fp16 path's loss scaling
(α gradients unscaled by hand, steps skipped on inf/NaN) checked with a real GradScaler on CPU tensors
(fp32 compute, so scaling by a power of two is exact)."""
import copy

import pytest
import torch

from milenas_fast.data.datasets import make_synthetic
from milenas_fast.data.loaders import normalize
from milenas_fast.precision import Precision
from milenas_fast.search.step import StepRule, fused_search_step, search_step
from milenas_fast.space import genotype as gt
from milenas_fast.space.primitives import PRIMITIVES
from milenas_fast.space.supernet import Network

CPU = torch.device("cpu")
STEPS = 2  # 2 nodes per cell (5 edges) keeps 30 CPU iterations quick; the code path is the same


def tiny(seed=0):
    torch.manual_seed(seed)
    return Network(C=4, num_classes=10, layers=3, steps=STEPS, multiplier=STEPS)


def optimizers(model, arch_lr=3e-4):
    w = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=3e-4)
    a = torch.optim.Adam(model.arch_parameters(), lr=arch_lr, betas=(0.5, 0.999), weight_decay=1e-3)
    return w, a


def data(n_iter, batch=8):
    d = make_synthetic(2 * n_iter * batch, seed=0)
    x = normalize(d.images[:, :, ::4, ::4].contiguous())  # 8×8: the learnable gratings, subsampled
    return [((x[i * batch:(i + 1) * batch], d.labels[i * batch:(i + 1) * batch]),
             (x[(n_iter + i) * batch:(n_iter + i + 1) * batch], d.labels[(n_iter + i) * batch:(n_iter + i + 1) * batch]))
            for i in range(n_iter)]


def run(amp: bool, n_iter=30):
    model = tiny()
    alpha0 = [a.detach().clone() for a in model.arch_parameters()]
    w, a = optimizers(model)
    precision = Precision(CPU, amp)
    assert (precision.dtype is torch.bfloat16) == amp
    for tr, va in data(n_iter):
        search_step(model, tr, va, w, a, StepRule(), precision)
    return model, alpha0


def near_tie_differences(g32, g16, alphas32, tie):
    """Entries where the two genotypes differ, each checked to be a near-tie in the fp32 run (the choice
    between the two candidates is within `tie` in softmax weight); returns how many differ."""
    n = 0
    for cell, a in (("normal", alphas32[0]), ("reduce", alphas32[1])):
        w = torch.softmax(a, -1)
        w[:, PRIMITIVES.index("none")] = -1
        for k, (e32, e16) in enumerate(zip(getattr(g32, cell), getattr(g16, cell))):
            if e32 == e16:
                continue
            n += 1
            node = k // 2
            offset = sum(2 + i for i in range(node))
            (op32, in32), (op16, in16) = e32, e16
            if in32 == in16:  # same edge, different op
                row = w[offset + in32]
                margin = abs(float(row[PRIMITIVES.index(op32)] - row[PRIMITIVES.index(op16)]))
            else:  # different edge kept: compare the edges' strengths
                margin = abs(float(w[offset + in32].max() - w[offset + in16].max()))
            assert margin < tie, f"{cell} entry {k}: fp32 {e32} vs bf16 {e16} with fp32 margin {margin:.2e} ≥ {tie:.2e}"
    return n


@pytest.mark.slow
def test_bf16_alpha_tracks_fp32_over_30_iterations():
    m32, alpha0 = run(False)
    m16, _ = run(True)
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(m32.arch_parameters(), alpha0))
    delta = max(float((a - b).detach().abs().max()) for a, b in zip(m32.arch_parameters(), m16.arch_parameters()))
    assert moved > 5e-3  # α really moved (30 Adam steps at 3e-4)
    # Stated tolerance: the bf16 run's α differs from the fp32 run's by at most 15% of how far α moved
    # (measured: ~8%; α gradients under bf16 autocast carry ~1e-3 relative error and Adam normalises them).
    assert delta <= 0.15 * moved, (delta, moved)
    for a32, a16, a0 in zip(m32.arch_parameters(), m16.arch_parameters(), alpha0):
        assert float((a16 - a32).detach().norm() / (a32 - a0).detach().norm()) < 0.15
        assert a16.dtype == torch.float32  # α stays fp32 under autocast
    g32, g16 = m32.genotype(), m16.genotype()
    # Same genotype — except where fp32 itself is at a near-tie (two candidates' weights closer than what
    # the α tolerance can move them), which rounding may break either way; at most one such entry.
    tie = 2 * delta
    n_diff = near_tie_differences(g32, g16, [a.detach() for a in m32.arch_parameters()], tie)
    assert n_diff <= 1, (gt.to_text(g32), gt.to_text(g16))


# --- fp16 loss scaling, with a real GradScaler on CPU (fp32 compute) --------------------------------------

def scaled_precision(init_scale):
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler missing")
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    except Exception as e:  # pragma: no cover - older torch without CPU scaler
        pytest.skip(f"no CPU GradScaler: {e}")
    p = Precision(CPU, False)  # fp32 compute: scaling by 2^k and back is exact
    p.scaler = scaler
    return p


def test_alpha_grads_are_unscaled_by_hand():
    model = tiny(1)
    (tr, _), = data(1)
    p = scaled_precision(2.0 ** 12)
    grads, finite = p.alpha_grads(model._loss(*tr), model.arch_parameters())
    ref = torch.autograd.grad(model._loss(*tr), model.arch_parameters())
    assert finite
    for g, r in zip(grads, ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("step_fn", [search_step, fused_search_step])
def test_scaled_step_equals_unscaled_step(step_fn):
    base = tiny(2)
    (tr, va), = data(1)
    results = []
    for precision in (Precision(CPU, False), scaled_precision(2.0 ** 10)):
        m = copy.deepcopy(base)
        w, a = optimizers(m, arch_lr=1e-2)
        step_fn(m, tr, va, w, a, StepRule(grad_clip=1.0), precision)
        results.append(m)
    for p, q in zip(list(results[0].parameters()) + results[0].arch_parameters(),
                    list(results[1].parameters()) + results[1].arch_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("step_fn", [search_step, fused_search_step])
def test_non_finite_gradients_skip_both_steps(step_fn):
    model = tiny(3)
    (tr, va), = data(1)
    before = [t.detach().clone() for t in list(model.parameters()) + model.arch_parameters()]
    p = scaled_precision(float("inf"))  # every scaled gradient is inf or NaN
    w, a = optimizers(model)
    grads, finite = p.alpha_grads(model._loss(*tr), model.arch_parameters())
    assert not finite
    step_fn(model, tr, va, w, a, StepRule(), p)
    after = list(model.parameters()) + model.arch_parameters()
    for b, t in zip(before, after):
        assert torch.equal(b, t)
    assert not a.state  # Adam never stepped on α
