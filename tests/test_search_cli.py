"""`milenas-fast search` end to end on tiny synthetic runs: artifacts, resume, early stop, bad input."""
import json
from pathlib import Path

import pytest
import torch

from milenas_fast.cli import main
from milenas_fast.space import genotype as gt

TINY = ["search", "--dataset", "synthetic", "--synthetic_images", "64", "--layers", "3", "--init_channels", "4",
        "--batch_size", "16", "--device", "cpu", "--deterministic", "--quiet", "--report_freq", "1"]


def _search(tmp: Path, name: str, *extra: str) -> Path:
    run_dir = tmp / name
    assert main(TINY + ["--save_dir", str(run_dir), *extra]) == 0
    return run_dir


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A finished 2-epoch run."""
    return _search(tmp_path_factory.mktemp("runs"), "straight", "--epochs", "2")


def test_run_folder_has_every_artifact(straight):
    names = {p.name for p in straight.iterdir()}
    assert {"log.txt", "args.json", "genotypes.jsonl", "model_sizes.json", "genotype.json", "genotype.txt",
            "checkpoint.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    log = (straight / "log.txt").read_text()
    for line in ("param size = ", "epoch 0 lr 2.500000e-02", "train 000 ", "train_acc ", "valid_acc ",
                 "genotype = Genotype(normal=[("):
        assert line in log
    args = json.loads((straight / "args.json").read_text())
    assert args["optimization"] == "milenas" and args["epochs"] == 2

    history = [json.loads(line) for line in (straight / "genotypes.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    for h in history:
        g = gt.from_text(h["genotype"])
        assert (h["n"], h["r"]) == gt.conv_counts(g)
        assert len(h["alphas_normal"]) == 14 and len(h["alphas_normal"][0]) == 8
        assert abs(sum(h["alphas_reduce"][3]) - 1) < 1e-5  # softmaxed rows
    final = gt.load(straight)
    assert gt.from_text((straight / "genotype.txt").read_text()) == final
    assert gt.to_text(final) == history[-1]["genotype"]

    sizes = json.loads((straight / "model_sizes.json").read_text())
    for key, best in sizes.items():
        same = [h for h in history if h["model_size"] == key]
        assert best["valid_acc"] == max(h["valid_acc"] for h in same)
        assert gt.from_dict(best["genotype_json"]) == gt.from_text(best["genotype"])
    assert set(sizes) == {h["model_size"] for h in history}


@pytest.mark.slow  # two searches and a resume
def test_resume_after_interrupt_is_bit_exact(straight, tmp_path, monkeypatch):
    from milenas_fast.search import loop

    run_dir = tmp_path / "interrupted"
    real_plot = loop.write_run_files
    calls = []

    def interrupt_after_first_epoch(*args):
        real_plot(*args)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "write_run_files", interrupt_after_first_epoch)
    assert main(TINY + ["--save_dir", str(run_dir), "--epochs", "2"]) == 130
    monkeypatch.undo()
    partial = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert partial["epoch"] == 1 and not partial["finished"]  # the last complete checkpoint is intact

    assert main(["search", "--resume", str(run_dir), "--quiet"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for x, y in zip(a["alphas"], b["alphas"]):
        assert torch.equal(x, y)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (straight / "genotypes.jsonl").read_text() == (run_dir / "genotypes.jsonl").read_text()


@pytest.mark.slow  # a several-epoch search
def test_early_stopping_fires_at_the_target_counts(straight, tmp_path):
    first = json.loads((straight / "genotypes.jsonl").read_text().splitlines()[0])
    run_dir = _search(tmp_path, "early", "--epochs", "4", "--early_stopping",
                      "--early_stop_normal", str(first["n"]), "--early_stop_reduce", str(first["r"]))
    lines = (run_dir / "genotypes.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert "early stopping" in (run_dir / "log.txt").read_text()


@pytest.mark.slow  # a search and a resume
def test_resume_of_a_finished_run_changes_nothing(straight, tmp_path):
    before = (straight / "genotypes.jsonl").read_text()
    assert main(["search", "--resume", str(straight), "--quiet"]) == 0
    assert (straight / "genotypes.jsonl").read_text() == before


def _fails(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("flags, fragment", [
    (["--train_portion", "1.5"], "--train_portion must lie strictly between 0 and 1"),
    (["--train_portion", "0"], "--train_portion"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--init_channels", "5"], "--init_channels must be even"),
    (["--optimization", "bilevel"], "--optimization must be one of milenas, darts, single_level"),
    (["--learning_rate", "-0.1"], "--learning_rate must be positive"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--learning_rate", "inf", "--learning_rate_min", "0"], "--learning_rate must be a finite number"),
    (["--arch_learning_rate", "0"], "--arch_learning_rate must be positive"),
    (["--weight_decay", "nan"], "--weight_decay must be a finite number"),
    (["--grad_clip=-inf"], "--grad_clip must be a finite number"),
    (["--momentum", "5"], "--momentum must lie in [0, 1), got 5.0"),
    (["--momentum", "1"], "--momentum must lie in [0, 1)"),
    (["--train_portion", "nan"], "--train_portion must be a finite number"),
    (["--tau_max", "inf"], "--tau_max must be a finite number"),
])
def test_bad_values_exit_2_and_write_nothing(capsys, tmp_path, flags, fragment):
    run_dir = tmp_path / "never"
    _fails(capsys, TINY + ["--save_dir", str(run_dir)] + flags, fragment)
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(capsys, tmp_path):
    _fails(capsys, TINY + ["--save_dir", str(tmp_path / "x"), "--device", "cuda"], "no CUDA GPU is visible")
    assert not (tmp_path / "x").exists()


def test_bad_checkpoints(capsys, straight, tmp_path):
    _fails(capsys, ["search", "--resume", str(tmp_path / "missing")], "no checkpoint at")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    _fails(capsys, ["search", "--resume", str(tmp_path / "corrupt")], "unreadable or corrupt")
    _fails(capsys, ["search", "--resume", str(straight), "--layers", "5"],
           "--layers 5 does not match the checkpoint's 3")
    _fails(capsys, TINY + ["--save_dir", str(straight)], "exists and is not empty")


def test_missing_cifar_offline_says_where_files_go(capsys, tmp_path, monkeypatch):
    import torchvision

    def offline(*args, download=False, **kwargs):
        if download:
            raise OSError("network is unreachable")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    argv = TINY + ["--dataset", "cifar10", "--data", str(tmp_path / "data"), "--save_dir", str(tmp_path / "run")]
    _fails(capsys, argv, "cifar-10-python.tar.gz")
    assert not (tmp_path / "run").exists()


def test_hyphenated_aliases_are_accepted(tmp_path):
    from milenas_fast.cli import build_parser

    a = build_parser().parse_args(["search", "--batch-size", "7", "--arch-learning-rate", "0.1"])
    assert a.batch_size == 7 and a.arch_learning_rate == 0.1
