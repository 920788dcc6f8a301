"""Whole-iteration CUDA graph (milenas_fast/search/graphed.py). On CPU the flag is ignored (eager loop); the
graph path itself runs on CPU with `EagerGraphs` (the body called eagerly over the same static buffers, in
the same optimiser graph mode) and must equal the eager step (marked `gpu_path`). Real capture and replay
need a CUDA GPU (marked `cuda`, skipped elsewhere)."""
import copy

import pytest
import torch

from milenas_fast.config import SearchConfig

from milenas_fast.errors import ConfigError
from milenas_fast.meters import Progress
from milenas_fast.precision import Precision
from milenas_fast.search.graphed import EagerGraphs, GraphedStep, decide, self_test
from milenas_fast.search.loop import Search, check_split_sizes
from milenas_fast.search.step import StepRule, fused_search_step, search_step
from milenas_fast.space.supernet import Network


def tiny_cfg(**kw):
    base = dict(dataset="synthetic", synthetic_images=48, batch_size=10, init_channels=4, layers=3, epochs=2,
                device="cpu", loader="gpu", report_freq=1, quiet=True)
    return SearchConfig(**{**base, **kw}).validate()


def test_cuda_graphs_flag_is_ignored_on_cpu():
    """--cuda_graphs defaults to on and means "on when the device is CUDA": on a CPU device the search runs
    the eager loop, keeps every batch (no drop_last) and says why in the log line."""
    assert SearchConfig().cuda_graphs is True
    on, why = decide(True, False, False, torch.device("cpu"))
    assert not on and "ignored on cpu" in why
    assert decide(False, False, False, torch.device("cpu"))[0] is False
    s = Search(tiny_cfg(), torch.device("cpu"))
    assert s.graphed is None and not s.plan.graphs and "ignored" in s.plan.graphs_why
    assert len(s.train_loader) == 3  # 24 images at batch 10: the partial batch of 4 is kept
    acc, loss, _ = s.train_epoch(Progress(False))
    assert loss == loss and 0 <= acc <= 100


def test_shared_train_pass_flag_runs_in_the_loop_on_cpu():
    s = Search(tiny_cfg(shared_train_pass=True, cuda_graphs=False), torch.device("cpu"))
    before = [a.detach().clone() for a in s.model.arch_parameters()]
    s.train_epoch(Progress(False))
    assert any(not torch.equal(b, a) for b, a in zip(before, s.model.arch_parameters()))


# --- the graph path on CPU (EagerGraphs) -------------------------------------------------------------------

def _cpu_setup(seed=0, batch=4, size=8, n=6):
    torch.manual_seed(seed)
    model = Network(C=2, num_classes=10, layers=3)
    g = torch.Generator().manual_seed(seed + 1)
    mk = lambda: (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))  # noqa: E731
    return model, [(mk(), mk()) for _ in range(n)]


def _state(model, w, a):
    """Everything an iteration mutates, as named tensors."""
    out = {f"w.{n}": p for n, p in model.named_parameters()}
    out.update({f"buf.{n}": b for n, b in model.named_buffers()})  # BN running statistics
    out.update({f"alpha{i}": x for i, x in enumerate(model.arch_parameters())})
    for name, opt in (("sgd", w), ("adam", a)):
        for i, p in enumerate(opt.param_groups[0]["params"]):
            for k, v in opt.state.get(p, {}).items():
                out[f"{name}.{i}.{k}"] = v
    return out


def _assert_same(got, want, **tol):
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k].float(), want[k].float(), msg=k, **tol)


@pytest.mark.gpu_path
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "shared_train_pass"])
@pytest.mark.parametrize("opt", ["milenas", "darts", "single_level"])
def test_graph_body_on_cpu_equals_the_eager_step(opt, fused):
    """warm-up (1), the capture iteration (body run eagerly) and 2 "replays" (body over the static buffers,
    batches copied in) against `search_step` from the same start: weights, α, both optimisers' state and BN
    running statistics after every iteration; the lr changes mid-run as the scheduler would change it."""
    model, data = _cpu_setup()
    ref = copy.deepcopy(model)
    rule = StepRule(opt, lambda_train=0.7, lambda_valid=1.3, grad_clip=0.5)
    prec = Precision(torch.device("cpu"), False)
    w, a = _opts(model, lr=0.1)
    rw, ra = _opts(ref, lr=0.1)
    graphed = GraphedStep(model, w, a, rule, prec, batch_size=4, shared_train_pass=fused, warmup=1,
                          graphs=EagerGraphs())
    start = {k: v.clone() for k, v in _state(model, w, a).items()}
    phases = []
    for i, (tr, va) in enumerate(data[:4]):
        if i == 3:
            for o in (w, rw):
                o.param_groups[0]["lr"] = 0.05
        phases.append(graphed.phase)
        loss_g, _ = graphed(tr, lambda va=va: va)
        loss_e, _ = search_step(ref, tr, va, rw, ra, rule, prec, fused)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-5, atol=1e-6)
        _assert_same(_state(model, w, a), _state(ref, rw, ra), rtol=1e-5, atol=1e-6)
        group = w.param_groups[0]  # graph mode is left after every call: checkpoints stay portable
        assert isinstance(group["lr"], float) and not group["fused"] and not a.param_groups[0]["capturable"]
    assert phases == ["warmup", "capture", "replay", "replay"]
    assert float(graphed.lr) == pytest.approx(0.05)
    moved = _state(model, w, a)
    assert all(not torch.equal(moved[k], start[k]) for k in start if k.startswith(("w.", "alpha")))


@pytest.mark.gpu_path
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "shared_train_pass"])
def test_graph_body_freezes_the_weights_in_the_alpha_passes(fused):
    model, data = _cpu_setup()
    w, a = _opts(model)
    graphed = GraphedStep(model, w, a, StepRule("milenas"), Precision(torch.device("cpu"), False), 4,
                          shared_train_pass=fused, warmup=1, graphs=EagerGraphs())
    seen = []
    model.stem.register_forward_pre_hook(lambda m, inp: seen.append(m[0].weight.requires_grad))
    for tr, va in data[:3]:
        seen.clear()
        graphed(tr, lambda va=va: va)
        # plain: α train pass, α valid pass (weights frozen), w pass; fused: shared train pass, α valid pass
        assert seen == ([True, False] if fused else [False, False, True])


@pytest.mark.gpu_path
def test_capture_self_test_on_cpu():
    assert self_test(torch.device("cpu"), EagerGraphs()) == ""

    class Raising(EagerGraphs):
        def capture(self, body):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    assert self_test(torch.device("cpu"), Raising()) == "RuntimeError: operation not permitted when stream is capturing"

    class Stale(EagerGraphs):  # a "graph" that replays without reading the copied-in batches
        def capture(self, body):
            out = body()
            return lambda: out

    assert "differs from the eager one" in self_test(torch.device("cpu"), Stale())


@pytest.mark.gpu_path
@pytest.mark.parametrize("why", ["", "RuntimeError: CUDA error: operation not permitted when stream is capturing"])
def test_search_runs_the_self_test_where_graphs_would_be_used(monkeypatch, why):
    """Graphs on (as on a CUDA device): a failing self-test means one warning (logged when the run starts),
    the eager loop and every training batch kept; a passing one builds the real graph step."""
    from milenas_fast.search import graphed as graphed_mod

    monkeypatch.setattr(graphed_mod, "decide", lambda *a: (True, "on"))
    monkeypatch.setattr(graphed_mod, "self_test", lambda device: why)
    s = Search(tiny_cfg(), torch.device("cpu"))
    if why:
        assert s.graphed is None and len(s.train_loader) == 3 and "self-test failed" in s.plan.graphs_why
        assert s.warnings == [f"CUDA graph capture self-test failed ({why}); using the eager loop"]
        assert [c.name for c in s.guard.components] == []
    else:
        assert isinstance(s.graphed.graphs, graphed_mod.CudaGraphs) and len(s.train_loader) == 2  # drop_last
        assert s.warnings == [] and [c.name for c in s.guard.components] == ["CUDA graph"]
        assert s.guard.left == s.graphed.warmup + 3  # warm-up, capture and two replays are guarded


# --- split sizes (a validation split smaller than one batch used to loop forever on the graph path) -----------

@pytest.mark.gpu_path
def test_graphed_step_refuses_a_validation_split_smaller_than_a_batch():
    model, data = _cpu_setup()
    graphed = GraphedStep(model, *_opts(model), StepRule(), Precision(torch.device("cpu"), False), 4,
                          graphs=EagerGraphs())
    tr, va = data[0]
    small = (va[0][:3], va[1][:3])
    with pytest.raises(ConfigError, match=r"validation split \(3 images\) is smaller than one batch \(4\)"):
        graphed(tr, lambda: small)
    stream = iter([small, va])  # the partial end of a pass is skipped
    graphed(tr, lambda: next(stream))
    assert next(stream, None) is None
    with pytest.raises(ValueError, match="full batches of 4"):
        graphed((tr[0][:3], tr[1][:3]), lambda: va)


def test_split_sizes_are_checked():
    check_split_sizes(16, 16, 16, drop_last=True)
    check_split_sizes(5, 16, 16, drop_last=False)  # eager: the one partial training batch is used
    with pytest.raises(ConfigError, match="validation split has 15 images, fewer than one batch"):
        check_split_sizes(100, 15, 16, drop_last=False)
    with pytest.raises(ConfigError, match="training split has 5 images.*--no-cuda_graphs"):
        check_split_sizes(5, 16, 16, drop_last=True)


@pytest.mark.gpu_path
def test_search_refuses_a_train_split_smaller_than_a_batch_on_the_graph_path():
    cfg = tiny_cfg(synthetic_images=64, train_portion=0.25, batch_size=20)  # 16 train, 48 valid
    assert Search(cfg, torch.device("cpu")).graphed is None  # eager: accepted
    with pytest.raises(ConfigError, match="training split has 16 images"):
        Search(cfg, torch.device("cpu"), graphs=EagerGraphs())


def test_cli_refuses_a_validation_split_smaller_than_a_batch(capsys, tmp_path):
    from milenas_fast.cli import main

    run_dir = tmp_path / "never"
    argv = ["search", "--dataset", "synthetic", "--synthetic_images", "40", "--batch_size", "32", "--layers", "3",
            "--init_channels", "4", "--device", "cpu", "--quiet", "--save_dir", str(run_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "validation split has 20 images, fewer than one batch (--batch_size 32)" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not run_dir.exists()


@pytest.mark.gpu_path
def test_graphed_search_epoch_on_cpu():
    """The loop's graph path end to end on CPU: drop_last, warm-up, capture, replays, lr from the group."""
    s = Search(tiny_cfg(synthetic_images=64, batch_size=8, epochs=2), torch.device("cpu"), graphs=EagerGraphs())
    assert len(s.train_loader) == 4 and s.graphed is not None
    s.train_epoch(Progress(False))
    assert s.graphed.captured and s.graphed.phase == "replay"
    assert isinstance(s.w_optimizer.state_dict()["param_groups"][0]["lr"], float)


# --- CUDA --------------------------------------------------------------------------------------------------

def _setup(fused, seed=0, batch=8, size=16):
    torch.manual_seed(seed)
    dev = torch.device("cuda")
    model = Network(C=8, num_classes=10, layers=3).to(dev)
    g = torch.Generator().manual_seed(seed + 1)
    data = [((torch.randn(batch, 3, size, size, generator=g).to(dev), torch.randint(0, 10, (batch,), generator=g).to(dev)),
             (torch.randn(batch, 3, size, size, generator=g).to(dev), torch.randint(0, 10, (batch,), generator=g).to(dev)))
            for _ in range(12)]
    return model, data


def _opts(model, lr=0.025):
    return (torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=3e-4),
            torch.optim.Adam(model.arch_parameters(), lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3))


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("amp", [False, True])
def test_graph_replay_matches_eager(fused, amp):
    torch.backends.cudnn.benchmark = False
    model, data = _setup(fused)
    ref = copy.deepcopy(model)
    rule = StepRule(grad_clip=5.0)
    prec = Precision(torch.device("cuda"), amp)
    w, a = _opts(model)
    rw, ra = _opts(ref)
    graphed = GraphedStep(model, w, a, rule, prec, batch_size=8, shared_train_pass=fused, warmup=2)
    step = fused_search_step if fused else search_step
    for i, (tr, va) in enumerate(data):
        if i == 6:  # the cosine schedule's per-epoch change: refilled into the graph's lr tensor
            for opt in (w, rw):
                opt.param_groups[0]["lr"] = 0.01
        it = iter([va])
        loss_g, _ = graphed(tr, lambda: next(it))
        loss_e, _ = step(ref, tr, va, rw, ra, rule, prec)
        tol = 2e-3 if amp else 1e-4
        torch.testing.assert_close(loss_g, loss_e, rtol=tol, atol=tol)
    assert graphed.captured
    tol = dict(rtol=1e-2, atol=2e-4) if amp else dict(rtol=1e-3, atol=2e-5)
    for x, y in zip(model.arch_parameters(), ref.arch_parameters()):
        torch.testing.assert_close(x, y, **tol)
    for (n, x), y in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(x, y, rtol=5e-2 if amp else 1e-3, atol=1e-3 if amp else 1e-4, msg=n)
    for (n, x), y in zip(model.named_buffers(), ref.buffers()):  # BN running statistics
        torch.testing.assert_close(x.float(), y.float(), rtol=5e-2 if amp else 1e-3, atol=1e-3 if amp else 1e-4, msg=n)
    # checkpoints stay portable: Adam is not left capturable, SGD's lr is a float again
    assert a.state_dict()["param_groups"][0]["capturable"] is False
    assert isinstance(w.param_groups[0]["lr"], float) and not w.param_groups[0]["fused"]


@pytest.mark.cuda
def test_capture_self_test_passes_on_this_gpu():
    assert self_test(torch.device("cuda")) == ""


@pytest.mark.cuda
def test_graphed_search_epoch_and_resume(tmp_path):
    cfg = tiny_cfg(device="cuda", batch_size=8, synthetic_images=160)
    s = Search(cfg, torch.device("cuda"))
    assert s.plan.graphs and s.graphed is not None
    assert len(s.train_loader) == 10  # 80 images at batch 8; drop_last
    s.train_epoch(Progress(False))
    assert s.graphed.captured
    s.scheduler.step()
    s.epoch += 1
    state = s.state_dict()
    torch.save(state, tmp_path / "ck.pt")
    s2 = Search(cfg, torch.device("cuda"))
    s2.load_state_dict(torch.load(tmp_path / "ck.pt", map_location="cpu", weights_only=True))
    s.train_epoch(Progress(False))
    s2.train_epoch(Progress(False))  # re-warm and re-capture after resume
    for x, y in zip(s.model.arch_parameters(), s2.model.arch_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)
    # a GPU checkpoint taken on the graph path loads on a CPU search
    s3 = Search(tiny_cfg(batch_size=8, synthetic_images=160), torch.device("cpu"))
    s3.load_state_dict(torch.load(tmp_path / "ck.pt", map_location="cpu", weights_only=True))
    s3.train_epoch(Progress(False))
