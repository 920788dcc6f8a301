"""Run management users rely on, pinned on tiny synthetic runs: the learning rate of every epoch follows the
cosine schedule (search and train, also across a resume), model-size buckets and weights_best.pt keep the
best epoch (ties: the earliest), a checkpoint write that fails part-way leaves the previous checkpoint intact
and the run resumable, a resumed run continues the same log.txt, and an early-stopped run stays stopped."""
import csv
import json
import math
import re
import resource
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from milenas_fast import runs
from milenas_fast.cli import main
from milenas_fast.search import loop as search_loop
from milenas_fast.space import genotype as gt
from milenas_fast.space.primitives import PRIMITIVES
from milenas_fast.space.supernet import Network
from milenas_fast.train import loop as train_loop

# one training and one validation batch per search epoch
SEARCH = ["search", "--dataset", "synthetic", "--synthetic_images", "20", "--layers", "3", "--init_channels", "4",
          "--batch_size", "10", "--workers", "0", "--device", "cpu", "--deterministic", "--quiet"]
TRAIN = ["train", "--dataset", "synthetic", "--synthetic_images", "20", "--layers", "3", "--init_channels", "4",
         "--batch_size", "10", "--workers", "0", "--device", "cpu", "--deterministic", "--quiet"]


def cosine(lr, lr_min, epochs):
    return [lr_min + (lr - lr_min) * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]


def logged_lrs(run_dir: Path) -> list[float]:
    return [float(x) for x in re.findall(r" epoch \d+ lr (\S+)$", (run_dir / "log.txt").read_text(), re.M)]


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(search_loop, "_plot", lambda run_dir: None)  # plots have their own tests


# --- the search: schedule across an interrupt and resume, log continued, run folder name --------------

@pytest.fixture(scope="module")
def resumed_search(tmp_path_factory):
    """`--save lr` interrupted after epoch 0 and resumed to 3 epochs; the SGD lr of every step recorded."""
    tmp = tmp_path_factory.mktemp("search")
    used, real_step = {}, search_loop.search_step

    def spy(model, train_batch, valid_batch, w_optimizer, *rest):
        used.setdefault(len(used_epochs), set()).add(w_optimizer.param_groups[0]["lr"])
        return real_step(model, train_batch, valid_batch, w_optimizer, *rest)

    used_epochs = []  # one entry per finished epoch (write_run_files runs once per epoch)
    real_write = search_loop.write_run_files

    def interrupt_once(run_dir, search):
        real_write(run_dir, search)
        used_epochs.append(search.epoch)
        if len(used_epochs) == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setattr(search_loop, "_plot", lambda run_dir: None)
        mp.setattr(search_loop, "search_step", spy)
        mp.setattr(search_loop, "write_run_files", interrupt_once)
        flags = ["--epochs", "3", "--learning_rate", "0.1", "--learning_rate_min", "0.01"]
        assert main(SEARCH + flags + ["--save", "lr"]) == 130
        (run_dir,) = tmp.glob("search-lr-*")
        assert main(["search", "--resume", str(run_dir), "--quiet", "--workers", "0"]) == 0
    return SimpleNamespace(run_dir=run_dir, used=[sorted(used[e]) for e in sorted(used)])


@pytest.mark.slow  # a several-epoch search
def test_search_lr_of_every_epoch_is_the_cosine_schedule(resumed_search):
    expected = cosine(0.1, 0.01, 3)
    history = [json.loads(line) for line in (resumed_search.run_dir / "genotypes.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert [h["lr"] for h in history] == pytest.approx(expected, rel=1e-6)  # genotypes.jsonl
    assert logged_lrs(resumed_search.run_dir) == pytest.approx(expected, rel=1e-6)  # log.txt (%e: 7 digits)
    assert resumed_search.used == [[pytest.approx(lr, rel=1e-6)] for lr in expected]  # what SGD used


def test_model_sizes_json_keeps_each_buckets_first_best_epoch(resumed_search):
    history = [json.loads(line) for line in (resumed_search.run_dir / "genotypes.jsonl").read_text().splitlines()]
    sizes = json.loads((resumed_search.run_dir / "model_sizes.json").read_text())
    assert set(sizes) == {h["model_size"] for h in history}
    for key, kept in sizes.items():
        same = [h for h in history if h["model_size"] == key]
        first_best = max(same, key=lambda h: (h["valid_acc"], -h["epoch"]))
        assert (kept["epoch"], kept["valid_acc"], kept["genotype"]) == \
            (first_best["epoch"], first_best["valid_acc"], first_best["genotype"])


def test_search_run_folder_name_and_log_continued_on_resume(resumed_search):
    assert re.fullmatch(r"search-lr-\d{8}-\d{6}", resumed_search.run_dir.name)
    log = (resumed_search.run_dir / "log.txt").read_text()
    order = ["args = ", "param size = ", "epoch 0 lr", "genotype = ", "resuming ", "epoch 1 lr", "epoch 2 lr",
             "final genotype = ", "run folder: "]
    positions = [log.find(s) for s in order]
    assert -1 not in positions and positions == sorted(positions), dict(zip(order, positions))
    assert log.count("args = ") == 1 and log.count("epoch 0 lr") == 1  # appended, not restarted
    assert f"resuming {resumed_search.run_dir} at epoch 1" in log
    assert not [p for p in resumed_search.run_dir.iterdir() if p.name.endswith(".tmp")]


def test_an_early_stopped_search_stays_stopped_on_resume(resumed_search, tmp_path):
    first = json.loads((resumed_search.run_dir / "genotypes.jsonl").read_text().splitlines()[0])
    run_dir = tmp_path / "early"
    flags = ["--epochs", "3", "--learning_rate", "0.1", "--learning_rate_min", "0.01", "--early_stopping",
             "--early_stop_normal", str(first["n"]), "--early_stop_reduce", str(first["r"])]
    assert main(SEARCH + flags + ["--save_dir", str(run_dir)]) == 0
    state = torch.load(run_dir / runs.CHECKPOINT, weights_only=True)
    assert state["epoch"] == 1 and state["finished"]
    assert main(["search", "--resume", str(run_dir), "--quiet"]) == 0
    assert len((run_dir / "genotypes.jsonl").read_text().splitlines()) == 1
    assert torch.load(run_dir / runs.CHECKPOINT, weights_only=True)["epoch"] == 1


# --- model-size buckets ------------------------------------------------------------------------------

def network_choosing(op_normal: str, op_reduce: str) -> Network:
    """A supernet whose genotype picks `op_*` on every kept edge (inputs 0 and 1: ties go to the lower index)."""
    model = Network(C=4, num_classes=10, layers=3)
    with torch.no_grad():
        for alpha, op in zip(model.arch_parameters(), (op_normal, op_reduce)):
            alpha.zero_()
            alpha[:, PRIMITIVES.index(op)] = 5.0
    return model


def test_a_bucket_keeps_its_best_epoch_earliest_on_ties_with_that_epochs_genotype():
    # (normal op, valid_acc) per epoch; sep and dil convs count alike, so epochs 0-3 share bucket n8r0
    epochs = [("sep_conv_3x3", 50.0), ("dil_conv_3x3", 70.0), ("sep_conv_5x5", 70.0), ("dil_conv_5x5", 60.0),
              ("skip_connect", 10.0)]
    search = SimpleNamespace(history=[], model_sizes={}, epoch=0, sampler=None)
    genotypes = []
    for epoch, (op, acc) in enumerate(epochs):
        search.epoch, search.model = epoch, network_choosing(op, "max_pool_3x3")
        genotypes.append(search.model.genotype())
        entry = search_loop.Search.record(search, (80.0 - epoch, 1.0, 90.0), (acc, 2.0, 95.0), 0.01)
        assert entry["epoch"] == epoch and entry["genotype"] == gt.to_text(genotypes[-1])
    assert set(search.model_sizes) == {"n8r0", "n0r0"}
    kept = search.model_sizes["n8r0"]
    assert (kept["epoch"], kept["valid_acc"], kept["train_acc"]) == (1, 70.0, 79.0)
    assert kept["genotype"] == gt.to_text(genotypes[1])
    assert gt.from_dict(kept["genotype_json"]) == genotypes[1]
    assert search.model_sizes["n0r0"]["epoch"] == 4


# --- train: schedule, weights_best.pt ------------------------------------------------------------------

ACCURACIES = [50.0, 70.0, 70.0, 60.0]  # scripted test accuracy per epoch: best epoch 1 (tied with 2)


@pytest.fixture(scope="module")
def scripted_train(tmp_path_factory):
    """A 4-epoch training run whose test accuracies are scripted; weights and SGD lr recorded per epoch."""
    tmp = tmp_path_factory.mktemp("train")
    snapshots, used = [], []
    real_save, real_epoch = train_loop.save_weights, train_loop.Trainer.train_epoch

    def save_and_snapshot(path, model):
        if path.name == "weights_last.pt":
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        real_save(path, model)

    def record_lr(self, progress):
        used.append(self.optimizer.param_groups[0]["lr"])
        return real_epoch(self, progress)

    def scripted_infer(self):
        return ACCURACIES[self.epoch], 1.0, 100.0  # top-1, loss, top-5

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_loop, "save_weights", save_and_snapshot)
        mp.setattr(train_loop.Trainer, "train_epoch", record_lr)
        mp.setattr(train_loop.Trainer, "infer", scripted_infer)
        run_dir = tmp / "run"
        assert main(TRAIN + ["--epochs", "4", "--learning_rate", "0.05", "--save_dir", str(run_dir)]) == 0
    return SimpleNamespace(run_dir=run_dir, snapshots=snapshots, used=used)


def test_train_lr_of_every_epoch_is_the_cosine_schedule(scripted_train):
    expected = cosine(0.05, 0.0, 4)
    rows = list(csv.DictReader((scripted_train.run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-6)
    assert logged_lrs(scripted_train.run_dir) == pytest.approx(expected, rel=1e-6)
    assert scripted_train.used == pytest.approx(expected, rel=1e-6)


def test_weights_best_is_the_best_epoch_earliest_on_ties(scripted_train):
    snaps = scripted_train.snapshots
    assert len(snaps) == 4 and any(not torch.equal(snaps[1][k], snaps[2][k]) for k in snaps[1])
    best = torch.load(scripted_train.run_dir / "weights_best.pt", weights_only=True)
    last = torch.load(scripted_train.run_dir / "weights_last.pt", weights_only=True)
    assert all(torch.equal(best[k], snaps[1][k]) for k in snaps[1])
    assert all(torch.equal(last[k], snaps[3][k]) for k in snaps[3])
    assert torch.load(scripted_train.run_dir / runs.CHECKPOINT, weights_only=True)["best_acc"] == 70.0
    log = (scripted_train.run_dir / "log.txt").read_text()
    assert log.count("best test_acc 70.000000") == 3  # epochs 1, 2 and 3 report the kept best


# --- a checkpoint write that fails part-way ------------------------------------------------------------

@contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` in any file fail with EFBIG (Python ignores SIGXFSZ): a disk filling up
    part-way through whatever writes the checkpoint, however it writes it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def patch_second_save(monkeypatch, second) -> list:
    """runs.save_checkpoint as usual for the first epoch; `second(real_save, path, state)` for the next.
    Returns the epochs it was asked to save."""
    real_save, saved = runs.save_checkpoint, []

    def save(path, state):
        saved.append(state["epoch"])
        return real_save(path, state) if len(saved) < 2 else second(real_save, path, state)

    monkeypatch.setattr(runs, "save_checkpoint", save)
    return saved


@pytest.mark.parametrize("argv, per_epoch, lines", [(SEARCH, "genotypes.jsonl", 2), (TRAIN, "metrics.csv", 3)],
                         ids=["search", "train"])
def test_a_checkpoint_write_failing_part_way_keeps_the_previous_one(argv, per_epoch, lines, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"

    def fail_part_way(real_save, path, state):
        before = path.read_bytes()
        with file_size_limit(len(before) // 2), pytest.raises((OSError, RuntimeError)):
            real_save(path, state)
        intact = path.read_bytes() == before
        assert intact, "a failed checkpoint write changed the previous checkpoint"
        raise KeyboardInterrupt  # stop the run here, as the failure would

    saved = patch_second_save(monkeypatch, fail_part_way)
    assert main(argv + ["--epochs", "2", "--save_dir", str(run_dir)]) == 130
    monkeypatch.undo()
    monkeypatch.setattr(search_loop, "_plot", lambda run_dir: None)
    assert saved == [1, 2]
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    state = runs.load_checkpoint(run_dir, argv[0])[1]
    assert state["epoch"] == 1
    if argv is SEARCH:  # the per-epoch files are rewritten only after the checkpoint, so they still agree
        assert len((run_dir / per_epoch).read_text().splitlines()) == len(state["history"]) == 1
    assert main([argv[0], "--resume", str(run_dir), "--quiet", "--workers", "0"]) == 0
    assert runs.load_checkpoint(run_dir, argv[0])[1]["epoch"] == 2
    assert len((run_dir / per_epoch).read_text().splitlines()) == lines  # metrics.csv has a header


@pytest.mark.slow  # two searches
def test_a_disk_full_checkpoint_write_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """The write fails for real (file-size limit): exit 1, one line naming the problem, the previous
    checkpoint intact and resumable."""
    run_dir = tmp_path / "run"

    def full_disk(real_save, path, state):
        with file_size_limit(path.stat().st_size // 2):
            return real_save(path, state)

    patch_second_save(monkeypatch, full_disk)
    capsys.readouterr()
    assert main(SEARCH + ["--epochs", "2", "--save_dir", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("milenas-fast search: error: ") and "checkpoint is intact" in err[0]
    assert "Traceback" not in err[0]
    assert runs.load_checkpoint(run_dir, "search")[1]["epoch"] == 1
