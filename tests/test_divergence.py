"""A run whose loss, α or weights become NaN/inf stops with one line and exit 1; nothing non-finite is
written (no genotype, weights file or model_sizes entry) and the last good checkpoint stays intact. The flag
is folded on the device inside the shared step, so the CUDA-graph body folds it too."""
import math

import pytest
import torch

from milenas_fast import runs
from milenas_fast.cli import main
from milenas_fast.divergence import Diverged, FiniteWatch
from milenas_fast.precision import Precision
from milenas_fast.search import loop as search_loop
from milenas_fast.search.graphed import EagerGraphs, GraphedStep
from milenas_fast.search.step import StepRule
from milenas_fast.space.supernet import Network
from milenas_fast.train import loop as train_loop

TINY = ["--dataset", "synthetic", "--synthetic_images", "32", "--layers", "3", "--init_channels", "4",
        "--batch_size", "8", "--workers", "0", "--device", "cpu", "--quiet", "--epochs", "2"]


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(search_loop, "_plot", lambda run_dir: None)


def poison_in_second_epoch(monkeypatch, cls, tensor_of):
    """cls.train_epoch fills `tensor_of(self)` with NaN when the second epoch starts (as a blown-up update
    would)."""
    real = cls.train_epoch

    def poisoned(self, progress):
        if self.epoch == 1:
            with torch.no_grad():
                tensor_of(self).fill_(math.nan)
        return real(self, progress)

    monkeypatch.setattr(cls, "train_epoch", poisoned)


def stop_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.slow  # two tiny search epochs: ~4 s on the loaded 2-core machine
def test_a_search_that_diverges_stops_with_one_line_and_writes_nothing_non_finite(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    poison_in_second_epoch(monkeypatch, search_loop.Search, lambda s: s.model.arch_parameters()[0])
    assert main(["search", *TINY, "--save_dir", str(run_dir)]) == 1
    line = stop_line(capsys)
    assert "diverged" in line and "epoch 0's validation and epoch 1 step 0" in line
    assert f"checkpoint is intact ({run_dir / runs.CHECKPOINT})" in line and "--learning_rate" in line
    state = runs.load_checkpoint(run_dir, "search")[1]
    assert state["epoch"] == 1 and all(torch.isfinite(a).all() for a in state["alphas"])
    assert len((run_dir / "genotypes.jsonl").read_text().splitlines()) == 1
    assert "NaN" not in (run_dir / "genotypes.jsonl").read_text() + (run_dir / "model_sizes.json").read_text()
    assert not (run_dir / "genotype.json").exists()


def test_a_training_that_diverges_keeps_the_best_weights_finite(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    poison_in_second_epoch(monkeypatch, train_loop.Trainer, lambda t: next(t.model.parameters()))
    assert main(["train", *TINY, "--save_dir", str(run_dir)]) == 1
    line = stop_line(capsys)
    assert "diverged" in line and "epoch 1 step 0" in line and "is intact" in line
    for name in ("weights_best.pt", "weights_last.pt"):
        weights = torch.load(run_dir / name, weights_only=True)
        assert all(torch.isfinite(w).all() for w in weights.values()), name
    assert runs.load_checkpoint(run_dir, "train")[1]["epoch"] == 1
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 2  # the header and epoch 0


def test_a_search_diverging_in_its_first_epoch_names_no_checkpoint(tmp_path, capsys):
    """The issue's case: --learning_rate 1e6 used to exit 0 with a NaN validation loss."""
    run_dir = tmp_path / "run"
    assert main(["search", *TINY, "--learning_rate", "1e6", "--save_dir", str(run_dir)]) == 1
    line = stop_line(capsys)
    assert "diverged" in line and "epoch 0" in line and "checkpoint" not in line
    assert not (run_dir / "genotype.json").exists() and not (run_dir / "genotypes.jsonl").exists()


def test_the_watch_flags_non_finite_values_and_leaves_fp16_overflow_to_the_scaler():
    watch = FiniteWatch(torch.device("cpu"), watch_losses=True, hint="h")
    watch.fold(torch.tensor(1.0), [torch.ones(3)])
    watch.check("step 0")
    watch.fold(torch.tensor(math.inf))
    with pytest.raises(Diverged, match="between step 0 and step 1") as e:
        watch.check("step 1")
    assert e.value.hint == "h"
    scaled = FiniteWatch(torch.device("cpu"), watch_losses=False, hint="h")  # fp16 loss scaling
    scaled.fold(torch.tensor(math.nan))  # the scaler skips this step: not divergence
    scaled.check("step 0")
    scaled.fold(tensors=[torch.tensor([0.0, math.nan])])
    with pytest.raises(Diverged):
        scaled.check("step 1")


@pytest.mark.gpu_path
def test_the_graph_body_folds_the_flag(device):
    """The flag is written inside the captured body (EagerGraphs on a CPU, a real CUDA graph on a GPU): a
    weight poisoned between replays shows on the next read, with no host sync in the step."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = Network(C=2, num_classes=10, layers=3).to(dev)
    w = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
    a = torch.optim.Adam(model.arch_parameters(), lr=3e-4, betas=(0.5, 0.999))
    watch = FiniteWatch(dev, watch_losses=True, hint="")
    graphs = EagerGraphs() if device == "cpu" else None
    step = GraphedStep(model, w, a, StepRule(), Precision(dev, False), batch_size=4, warmup=1, graphs=graphs,
                       watch=watch)
    batch = lambda: (torch.randn(4, 3, 8, 8, device=dev), torch.randint(0, 10, (4,), device=dev))  # noqa: E731
    for _ in range(3):  # warm-up, capture, replay
        step(batch(), batch)
    assert step.captured
    watch.check("replay 1")
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    step(batch(), batch)
    with pytest.raises(Diverged):
        watch.check("replay 2")


def test_the_stop_line_joins_the_checkpoint_note(tmp_path):
    (tmp_path / runs.CHECKPOINT).write_bytes(b"x")
    with pytest.raises(runs.RunStopped) as e, runs.one_line_stops(tmp_path, None):
        raise Diverged("training diverged: somewhere", "lower it")
    assert str(e.value) == f"training diverged: somewhere; the last complete checkpoint is intact " \
                           f"({tmp_path / runs.CHECKPOINT}); lower it"
