"""Second-order DARTS (`--optimization darts_2nd`, search/unrolled.py): the finite-difference unrolled α
gradient against the exact hypergradient d/dα L_val(w − ξ(μ·m + ∇w L_tr(w, α) + wd·w), α) taken by double
backward, its convergence to it as ε → 0, what it leaves in the model, and the search paths that run it."""
import copy
import json

import pytest
import torch
from torch.func import functional_call

from milenas_fast.cli import main
from milenas_fast.precision import Precision
from milenas_fast.search.graphed import EagerGraphs, GraphedStep
from milenas_fast.search.step import StepRule, search_step
from milenas_fast.search.unrolled import unrolled_alpha_gradient
from milenas_fast.space.mixed_op import ReferenceMixedOp
from milenas_fast.space.supernet import Network
from tiny_supernet import Tiny

CPU = Precision(torch.device("cpu"), amp=False)


def tiny_case(seed=0):
    torch.manual_seed(seed)
    model = Tiny().double()
    model._alphas = [a.detach().double().requires_grad_() for a in model._alphas]
    batch = lambda: (torch.randn(7, 5, dtype=torch.double), torch.randint(0, 3, (7,)))  # noqa: E731
    return model, {"train": batch(), "valid": batch()}, 0.5


def network_case(seed=0):
    torch.manual_seed(seed)
    model = Network(2, 10, 3, mixed_op=ReferenceMixedOp).double()  # α and its softmax stay fp32 by design
    model.load_alphas([torch.randn(14, 8), torch.randn(14, 8)])
    batch = lambda: (torch.randn(3, 3, 6, 6, dtype=torch.double), torch.randint(0, 10, (3,)))  # noqa: E731
    return model, {"train": batch(), "valid": batch()}, 0.5


def sgd(model, lr, momentum, seed=1):
    """SGD as the search builds it; with momentum, a momentum buffer as after some real steps."""
    opt = torch.optim.SGD(model.parameters(), lr, momentum=momentum, weight_decay=3e-4)
    if momentum:
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            opt.state[p]["momentum_buffer"] = 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return opt


def exact_hypergradient(model, batches, opt, first_order=False):
    """d/dα L_val(w'(α), α) with w'(α) = w − ξ(μ·m + ∇w L_tr(w, α) + wd·w), by double backward through
    ∇w L_tr (torch.func on copies of the weights; the model's own weights are not touched).
    `first_order`: only ∇α L_val(w', α), w' held fixed (what the Hessian term corrects)."""
    group = opt.param_groups[0]
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone().requires_grad_() for _, p in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(weights, batch):  # model._loss with these weights (Network takes its loss in fp32)
        x, y = batch
        logits = functional_call(model, {**dict(zip(names, weights)), **buffers}, (x,))
        return model._criterion(logits.float() if isinstance(model, Network) else logits, y)

    g = torch.autograd.grad(loss(w, batches["train"]), w, create_graph=not first_order)
    bufs = [opt.state[p].get("momentum_buffer") if group["momentum"] else None for p in model.parameters()]
    w_prime = [wi - group["lr"] * ((group["momentum"] * m if m is not None else 0) + gi + group["weight_decay"] * wi)
               for wi, gi, m in zip(w, g, bufs)]
    if first_order:
        w_prime = [wp.detach() for wp in w_prime]
    return torch.autograd.grad(loss(w_prime, batches["valid"]), model.arch_parameters())


def rel(a, b):
    num = sum(float((x.double() - y.double()).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.double().norm() ** 2) for y in b) ** 0.5


# Measured relative errors (momentum 0 / 0.9): tiny at DARTS's r = 0.01: 1.5e-5 / 1.5e-5; the supernet at
# r = 1e-5: 3.8e-3 / 2.4e-3 (its α softmax and loss are fp32 by design). The supernet is not compared at r = 0.01:
# ε·v then crosses ReLU kinks, where ∇α L_tr jumps, and the quotient is off by 4x here (batch 4, 8x8) — a
# property of DARTS's finite difference on ReLU networks, not of this implementation.
@pytest.mark.parametrize("case, r, tol, momentum", [(tiny_case, 0.01, 5e-5, 0.0), (tiny_case, 0.01, 5e-5, 0.9),
                                                   (network_case, 1e-5, 1e-2, 0.9)],
                         ids=["tiny-momentum0", "tiny-momentum0.9", "network-momentum0.9"])
def test_unrolled_gradient_equals_the_exact_hypergradient(case, r, tol, momentum):
    model, batches, xi = case()
    exact = exact_hypergradient(model, batches, sgd(model, xi, momentum))
    first = exact_hypergradient(model, batches, sgd(model, xi, momentum), first_order=True)
    got = unrolled_alpha_gradient(model, batches, sgd(model, xi, momentum), r=r)
    assert rel(got, exact) < tol
    # the second-order term is far above the tolerance: dropping it, or its sign, would fail
    assert rel(first, exact) > 30 * tol
    assert all(g.abs().max() > 0 for g in got)


def test_unrolled_gradient_converges_to_the_exact_one_as_epsilon_shrinks():
    """Central differences: the error falls as ε² (×100 per decade) until float64 rounding."""
    model, batches, xi = tiny_case()
    exact = exact_hypergradient(model, batches, sgd(model, xi, 0.9))
    errors = [rel(unrolled_alpha_gradient(model, batches, sgd(model, xi, 0.9), r=r), exact) for r in (0.3, 0.03, 0.003)]
    assert errors[0] > 1e-3, errors  # measured 1.3e-2, 1.3e-4, 1.3e-6: a visible error at r = 0.3 ...
    assert errors[1] < errors[0] / 50 and errors[2] < errors[1] / 50, errors  # ... that shrinks as r²


def test_weights_are_restored_and_the_validation_pass_leaves_no_trace():
    model, batches, xi = tiny_case()
    w0 = [p.detach().clone() for p in model.parameters()]
    other = copy.deepcopy(model)
    unrolled_alpha_gradient(model, batches, sgd(model, xi, 0.9))
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))  # bit-exact, not w + εv − εv
    assert all(p.grad is None for p in model.parameters())
    # BatchNorm keeps the training passes' statistics only (∇w L_tr at w, then w⁺ and w⁻): a validation batch
    # shifted far away moves w± a little (through ε·v), but leaves no mean of its own
    unrolled_alpha_gradient(other, {**batches, "valid": (batches["valid"][0] + 5, batches["valid"][1])},
                            sgd(other, xi, 0.9))
    assert int(model.bn.num_batches_tracked) == int(other.bn.num_batches_tracked) == 3
    torch.testing.assert_close(model.bn.running_mean, other.bn.running_mean, rtol=1e-3, atol=1e-4)
    assert model.bn.running_mean.abs().max() > 1e-2
    # a pass that fails (here the validation pass, at w') leaves the weights as they were too
    with pytest.raises(RuntimeError):
        unrolled_alpha_gradient(model, {**batches, "valid": (batches["valid"][0][:, :4], batches["valid"][1])},
                                sgd(model, xi, 0.9))
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def tiny_float32_batches():
    return [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(2)]


@pytest.mark.parametrize("amp, shared", [(False, False), (True, False), (False, True)],
                         ids=["fp32", "amp-fp32-alpha-passes", "shared_train_pass"])
def test_search_step_applies_the_unrolled_gradient(amp, shared):
    """search_step's α step uses the unrolled gradient at the iteration's weights; under --amp its passes stay
    fp32 (the same gradient exactly); --shared_train_pass does not change it."""
    torch.manual_seed(0)
    model = Tiny()
    tr, va = tiny_float32_batches()
    twin = copy.deepcopy(model)
    expected = unrolled_alpha_gradient(twin, {"train": tr, "valid": va}, sgd(twin, 0.5, 0.9))
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=0.01)
    search_step(model, tr, va, sgd(model, 0.5, 0.9), a_opt, StepRule("darts_2nd"),
                Precision(torch.device("cpu"), amp), shared)
    for a, e in zip(model.arch_parameters(), expected):
        assert torch.equal(a.grad, e)
    first_order = torch.autograd.grad(twin._loss(*va), twin.arch_parameters())  # twin is back at the start
    assert any((a.grad - f).abs().max() > 1e-3 for a, f in zip(model.arch_parameters(), first_order))


@pytest.mark.gpu_path
def test_graphed_darts_2nd_equals_the_eager_step():
    """The CUDA-graph body (fused SGD with a device-tensor lr, static buffers, momentum buffers) run eagerly on
    CPU gives the eager loop's iterations. (A smooth model: on a ReLU supernet the finite difference magnifies
    the fused and foreach SGD's last-bit differences wherever ε·v crosses a kink.)"""
    torch.manual_seed(0)
    model = Tiny()
    ref = copy.deepcopy(model)
    start = [a.detach().clone() for a in model.arch_parameters()]

    def optimisers(m):
        return (torch.optim.SGD(m.parameters(), 0.1, momentum=0.9, weight_decay=3e-4),
                torch.optim.Adam(m.arch_parameters(), lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3))

    rule = StepRule("darts_2nd")
    graphed = GraphedStep(model, *optimisers(model), rule, CPU, 4, warmup=1, graphs=EagerGraphs())
    w, a = optimisers(ref)
    for _ in range(4):  # warm-up, capture, two replays
        tr, va = tiny_float32_batches()
        graphed(tr, lambda: va)
        search_step(ref, tr, va, w, a, rule, CPU)
    assert graphed.phase == "replay"
    for x, y in zip(model.arch_parameters() + list(model.parameters()), ref.arch_parameters() + list(ref.parameters())):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert max(float((x.detach() - y).abs().max()) for x, y in zip(model.arch_parameters(), start)) > 0.1  # α moved


TINY = ["search", "--dataset", "synthetic", "--synthetic_images", "32", "--layers", "3", "--init_channels", "2",
        "--batch_size", "16", "--device", "cpu", "--deterministic", "--quiet", "--report_freq", "1",
        "--optimization", "darts_2nd", "--epochs", "2"]  # one iteration per epoch


@pytest.mark.slow  # four darts_2nd iterations over three runs: 45-75 s on the shared, loaded 2-core machine
def test_darts_2nd_search_writes_a_run_folder_and_resumes_bit_exactly(tmp_path, monkeypatch):
    from milenas_fast.search import loop

    monkeypatch.setattr(loop, "_plot", lambda run_dir: None)  # plots are tested elsewhere; they cost 20 s here
    straight = tmp_path / "straight"
    assert main(TINY + ["--save_dir", str(straight)]) == 0
    names = {p.name for p in straight.iterdir()}
    assert {"log.txt", "args.json", "genotypes.jsonl", "model_sizes.json", "genotype.json", "genotype.txt",
            "checkpoint.pt"} <= names
    assert json.loads((straight / "args.json").read_text())["optimization"] == "darts_2nd"
    assert len((straight / "genotypes.jsonl").read_text().splitlines()) == 2

    interrupted = tmp_path / "interrupted"
    real = loop.write_run_files
    calls = []

    def interrupt_after_first_epoch(*args):
        real(*args)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "write_run_files", interrupt_after_first_epoch)
    assert main(TINY + ["--save_dir", str(interrupted)]) == 130
    monkeypatch.setattr(loop, "write_run_files", real)
    assert main(["search", "--resume", str(interrupted), "--quiet"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(x, y) for x, y in zip(a["alphas"], b["alphas"]))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
