"""--sampler gumbel: the τ schedule, the hard straight-through samples against a plain-PyTorch twin, the share
modes, one candidate and one host synchronisation per edge and forward, a step under AMP, and tiny CPU
searches: a complete run folder, bit-exact rerun and resume, bad flags."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from milenas_fast import HardSampledMixedOp
from milenas_fast.cli import main
from milenas_fast.precision import Precision
from milenas_fast.search.sampler import GumbelSampler, gumbel_noise, hard_gumbel, tau_at
from milenas_fast.search.step import StepRule, search_step
from milenas_fast.space.mixed_op import ReferenceMixedOp
from milenas_fast.space.supernet import Network

TINY = ["search", "--dataset", "synthetic", "--synthetic_images", "64", "--layers", "3", "--init_channels", "4",
        "--batch_size", "16", "--device", "cpu", "--deterministic", "--quiet", "--report_freq", "1",
        "--sampler", "gumbel"]


def test_tau_falls_linearly_per_epoch_from_tau_max_to_tau_min():
    taus = [tau_at(e, 50, 10.0, 1.0) for e in range(50)]
    assert taus[0] == 10.0 and taus[-1] == pytest.approx(1.0)
    assert all(b - a == pytest.approx(-9 / 49) for a, b in zip(taus, taus[1:]))
    authors = [tau_at(e, 50, 10.0, 1.0, authors=True) for e in range(50)]  # --authors_code: their formula
    assert authors[0] == 10.0 and authors[-1] == pytest.approx(1.18)
    assert all(b - a == pytest.approx(-0.18) for a, b in zip(authors, authors[1:]))
    assert tau_at(0, 1, 10.0, 0.1) == 10.0 and tau_at(2, 4, 1.0, 1.0) == 1.0


@pytest.mark.gpu_path
def test_hard_gumbel_equals_its_twin_and_follows_softmax(device):
    p = torch.tensor([0.05, 0.3, 0.1, 0.2, 0.15, 0.05, 0.1, 0.05], device=device)
    logits = p.log().expand(8000, 8).clone().requires_grad_()
    tau = 3.0
    g = torch.Generator(device).manual_seed(5)
    state = g.get_state()
    row, index = hard_gumbel(logits, tau, g)
    # twin: torch's own formulation, from the same noise
    g.set_state(state)
    soft = F.softmax((logits + gumbel_noise(logits, g)) / tau, dim=-1)
    twin = F.one_hot(soft.argmax(-1), 8).float() - soft.detach() + soft
    assert torch.equal(index, soft.argmax(-1))
    assert torch.equal(row.detach(), F.one_hot(index, 8).float())  # exact zeros and ones
    c = torch.randn(8000, 8, device=device)
    (grad,) = torch.autograd.grad((row * c).sum(), logits)
    (twin_grad,) = torch.autograd.grad((twin * c).sum(), logits)
    torch.testing.assert_close(grad, twin_grad, rtol=1e-5, atol=1e-8)
    assert grad.ne(0).all()  # the straight-through gradient reaches every logit
    # Gumbel-max: the argmax of α + G is distributed as softmax(α), whatever τ
    freq = torch.bincount(index, minlength=8).float() / 8000
    torch.testing.assert_close(freq, p, rtol=0, atol=0.02)


def _net(layers=5, cls=HardSampledMixedOp, share="cell", tau=1.0, seed=0):
    torch.manual_seed(seed)
    net = Network(4, 10, layers, mixed_op=cls)
    net.sampler = GumbelSampler(share, seed, torch.device("cpu"), tau)
    return net


@pytest.mark.gpu_path
def test_share_modes():
    net = _net()  # cells: normal, reduce, normal, reduce, normal
    reduce = [c.reduction for c in net.cells]
    assert reduce == [False, True, False, True, False]
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_reduce.zero_()
    weights, indices = net.sampler(net)
    assert len(weights) == len(indices) == 5 and all(len(i) == 14 for i in indices)
    assert len({tuple(indices[i]) for i in (0, 2, 4)}) == 3  # one sample per cell (uniform α)

    net.sampler.share = "type"
    weights, indices = net.sampler(net)
    assert weights[0] is weights[2] is weights[4] and weights[1] is weights[3]
    assert indices[0] == indices[2] == indices[4] and indices[1] == indices[3]

    with torch.no_grad():  # each type samples from its own α
        net.alphas_normal[:, 4] = 30.0
        net.alphas_reduce[:, 6] = 30.0
    for share in ("cell", "type"):
        net.sampler.share = share
        weights, indices = net.sampler(net)
        assert [set(i) for i in indices] == [{6} if r else {4} for r in reduce]
        assert all(torch.equal(w.detach(), F.one_hot(torch.tensor(i), 8).float()) for w, i in zip(weights, indices))


@pytest.mark.slow  # a fused supernet through the interpreter
@pytest.mark.gpu_path
def test_gumbel_forward_runs_one_candidate_per_edge_with_one_host_sync(monkeypatch):
    net = _net(layers=3, tau=2.0)
    calls = []
    for name, m in net.named_modules():
        if isinstance(m, HardSampledMixedOp):
            for k, op in enumerate(m._ops):
                op.register_forward_hook(lambda mod, a, o, key=(name, k): calls.append(key))
    syncs = []
    for method in ("tolist", "item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda t, *a, _r=real, _m=method: (syncs.append(_m), _r(t, *a))[1])
    state = net.sampler.generator.get_state()
    x = torch.randn(2, 3, 9, 9)
    out = net(x)
    monkeypatch.undo()
    assert syncs == ["tolist"]
    assert len(calls) == 3 * 14 and len({n for n, _ in calls}) == 3 * 14  # one candidate on every edge

    # the twin: MixedOp (every candidate) mixing with the same one-hot rows
    ref = _net(layers=3, cls=ReferenceMixedOp, tau=2.0)
    ref.load_state_dict(net.state_dict())
    ref.load_alphas(net.arch_parameters())
    ref.sampler.generator.set_state(state)
    sample = ref.sampler
    ref.sampler = lambda n: (sample(n)[0], [None] * len(n.cells))
    xr, xh = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = ref(xr)
    net.sampler.generator.set_state(state)  # the same draw again
    out = net(xh)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, xh, g)
    (gx_ref,) = torch.autograd.grad(out_ref, xr, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-6)


def test_sampler_state_continues_the_sequence():
    net = _net(layers=3)
    a = net.sampler
    a(net)  # advance the stream
    saved = a.state_dict()
    b = GumbelSampler("cell", 99, torch.device("cpu"), 9.0)
    assert b.load_state_dict(saved) and b.tau == 1.0
    assert a(net)[1] == b(net)[1] and a(net)[1] == b(net)[1]
    # a state saved on another device type (a 16-byte CUDA Philox state) cannot continue here: a new stream,
    # the same for every process that loads it
    cuda_state = {**saved, "generator": torch.arange(16, dtype=torch.uint8)}
    c, d = (GumbelSampler("cell", s, torch.device("cpu"), 1.0) for s in (1, 2))
    assert not c.load_state_dict(cuda_state) and not d.load_state_dict(cuda_state)
    assert c(net)[1] == d(net)[1]


@pytest.mark.gpu_path
@pytest.mark.parametrize("amp, shared", [(False, False), (True, False), (False, True)])
def test_search_step_with_gumbel(amp, shared):
    net = _net(layers=3, tau=5.0)
    w_opt = torch.optim.SGD(net.parameters(), 0.05, momentum=0.9)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=0.1, betas=(0.5, 0.999))
    batch = (torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]))
    valid = (torch.randn(4, 3, 8, 8), torch.tensor([5, 6, 7, 8]))
    alphas = [a.detach().clone() for a in net.arch_parameters()]
    stem = net.stem[0].weight.detach().clone()
    loss, _ = search_step(net, batch, valid, w_opt, a_opt, StepRule(), Precision(torch.device("cpu"), amp), shared)
    assert torch.isfinite(loss)
    for before, after in zip(alphas, net.arch_parameters()):
        moved = (after.detach() - before).abs().sum(-1)
        assert moved.gt(0).sum() >= 10, moved  # α rows of the edges whose sample was not `none` moved
    assert not torch.equal(stem, net.stem[0].weight)


def _search(tmp: Path, name: str, *extra: str) -> Path:
    run_dir = tmp / name
    assert main(TINY + ["--save_dir", str(run_dir), *extra]) == 0
    return run_dir


@pytest.fixture(scope="module")
def gumbel_run(tmp_path_factory):
    return _search(tmp_path_factory.mktemp("gumbel"), "straight", "--epochs", "2")


def test_tiny_gumbel_search_writes_a_complete_run_folder(gumbel_run):
    names = {p.name for p in gumbel_run.iterdir()}
    assert {"log.txt", "args.json", "genotypes.jsonl", "model_sizes.json", "genotype.json", "genotype.txt",
            "checkpoint.pt", "plots"} <= names
    log = (gumbel_run / "log.txt").read_text()
    for line in ("MixedOp = HardSampledMixedOp", "epoch 0 lr", "tau 10.000000", "tau 1.000000", "train_acc",
                 "valid_acc", "genotype = Genotype(normal=[("):
        assert line in log
    assert json.loads((gumbel_run / "args.json").read_text())["sampler"] == "gumbel"
    history = [json.loads(line) for line in (gumbel_run / "genotypes.jsonl").read_text().splitlines()]
    assert [h["tau"] for h in history] == [10.0, 1.0]
    ckpt = torch.load(gumbel_run / "checkpoint.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["sampler"]["tau"] == 1.0 and ckpt["sampler"]["share"] == "cell"
    assert isinstance(ckpt["sampler"]["generator"], torch.Tensor)


@pytest.mark.slow  # three searches
def test_gumbel_rerun_and_resume_are_bit_exact(gumbel_run, tmp_path, monkeypatch):
    from milenas_fast.search import loop

    run_dir = tmp_path / "interrupted"
    real = loop.write_run_files

    def interrupt_after_first_epoch(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_plot", lambda run_dir: None)  # plots are tested elsewhere; they take seconds
    monkeypatch.setattr(loop, "write_run_files", interrupt_after_first_epoch)
    assert main(TINY + ["--save_dir", str(run_dir), "--epochs", "2"]) == 130
    monkeypatch.setattr(loop, "write_run_files", real)
    straight = torch.load(gumbel_run / "checkpoint.pt", weights_only=True)
    partial = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert partial["epoch"] == 1 and partial["history"][0] == straight["history"][0]  # the rerun's epoch 0

    assert main(["search", "--resume", str(run_dir), "--quiet"]) == 0
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for a, b in zip(straight["alphas"], resumed["alphas"]):
        assert torch.equal(a, b)
    for k in straight["model"]:
        assert torch.equal(straight["model"][k], resumed["model"][k]), k
    assert torch.equal(straight["sampler"]["generator"], resumed["sampler"]["generator"])
    assert (gumbel_run / "genotypes.jsonl").read_text() == (run_dir / "genotypes.jsonl").read_text()


def _fails(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("flags, fragment", [
    (["--compile"], "--compile does not apply to --sampler gumbel"),
    (["--impl", "fused"], "--impl fused does not apply to --sampler gumbel"),
    (["--optimization", "darts_2nd"], "--optimization darts_2nd does not combine with --sampler gumbel"),
    (["--tau_min", "0"], "need 0 < tau_min <= tau_max"),
    (["--tau_max", "0.5"], "need 0 < tau_min <= tau_max"),
    (["--gumbel_share", "edge"], "--gumbel_share must be one of cell, type"),
    (["--sampler", "gdas"], "--sampler must be one of softmax, gumbel"),
])
def test_bad_sampler_flags_exit_2(capsys, tmp_path, flags, fragment):
    _fails(capsys, TINY + ["--save_dir", str(tmp_path / "never")] + flags, fragment)
    assert not (tmp_path / "never").exists()


def test_resume_refuses_another_sampler(capsys, gumbel_run):
    _fails(capsys, ["search", "--resume", str(gumbel_run), "--sampler", "softmax"],
           "--sampler softmax does not match the checkpoint's gumbel")
    _fails(capsys, ["search", "--resume", str(gumbel_run), "--tau_min", "0.1"],
           "--tau_min 0.1 does not match the checkpoint's 1.0")
