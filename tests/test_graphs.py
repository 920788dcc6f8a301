"""Whole-iteration CUDA graph (milenas_fast/search/graphed.py). On CPU the flag is ignored (eager loop) —
checked here; replay-vs-eager equivalence needs a CUDA GPU (marked `cuda`, skipped elsewhere)."""
import copy

import pytest
import torch

from milenas_fast.config import SearchConfig
from milenas_fast.precision import Precision
from milenas_fast.search.graphed import GraphedStep, decide
from milenas_fast.search.loop import Search
from milenas_fast.search.step import StepRule, fused_search_step, search_step
from milenas_fast.space.supernet import Network


class NoProgress:
    def update(self, *a):
        pass


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
    assert s.graphed is None and not s.graphs_on and "ignored" in s.graphs_why
    assert len(s.train_loader) == 3  # 24 images at batch 10: the partial batch of 4 is kept
    acc, loss = s.train_epoch(NoProgress())
    assert loss == loss and 0 <= acc <= 100


def test_fused_train_step_flag_runs_in_the_loop_on_cpu():
    s = Search(tiny_cfg(fused_train_step=True, cuda_graphs=False), torch.device("cpu"))
    before = [a.detach().clone() for a in s.model.arch_parameters()]
    s.train_epoch(NoProgress())
    assert any(not torch.equal(b, a) for b, a in zip(before, s.model.arch_parameters()))


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
    graphed = GraphedStep(model, w, a, rule, prec, batch_size=8, fused_train_step=fused, warmup=2)
    step = fused_search_step if fused else search_step
    for i, (tr, va) in enumerate(data):
        if i == 6:  # the cosine schedule's per-epoch change: in place in the graph
            for opt in (w, rw):
                opt.param_groups[0]["lr"] = 0.01
            graphed.begin_epoch(0.01)
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
    # checkpoints stay portable: Adam is not left capturable
    assert a.state_dict()["param_groups"][0]["capturable"] is False


@pytest.mark.cuda
def test_graphed_search_epoch_and_resume(tmp_path):
    cfg = tiny_cfg(device="cuda", batch_size=8, synthetic_images=160)
    s = Search(cfg, torch.device("cuda"))
    assert s.graphs_on and s.graphed is not None
    assert len(s.train_loader) == 10  # 80 images at batch 8; drop_last
    s.train_epoch(NoProgress())
    assert s.graphed.captured
    s.scheduler.step()
    s.epoch += 1
    state = s.state_dict()
    torch.save(state, tmp_path / "ck.pt")
    s2 = Search(cfg, torch.device("cuda"))
    s2.load_state_dict(torch.load(tmp_path / "ck.pt", map_location="cpu", weights_only=False))
    s.train_epoch(NoProgress())
    s2.train_epoch(NoProgress())  # re-warm and re-capture after resume
    for x, y in zip(s.model.arch_parameters(), s2.model.arch_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)
    # a GPU checkpoint taken on the graph path loads on a CPU search
    s3 = Search(tiny_cfg(batch_size=8, synthetic_images=160), torch.device("cpu"))
    s3.load_state_dict(torch.load(tmp_path / "ck.pt", map_location="cpu", weights_only=False))
    s3.train_epoch(NoProgress())
