"""`milenas-fast train` end to end on a tiny network and synthetic data (CPU)."""
import csv
import json
import os

import pytest
import torch

from milenas_fast.cli import main
from milenas_fast.runs import CHECKPOINT
from milenas_fast.space.evalnet import NetworkCIFAR, param_count
from milenas_fast.space.genotype import from_text, to_text
from milenas_fast.space.known_genotypes import DARTS_V2, MILENAS
from milenas_fast.train import loop

TINY = ["--dataset", "synthetic", "--synthetic_images", "48", "--init_channels", "4", "--layers", "3",
        "--batch_size", "16", "--workers", "0", "--device", "cpu", "--quiet", "--report_freq", "1"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def train(*args):
    return main(["train", *TINY, *args])


def test_one_epoch_writes_every_artifact(tmp_path):
    (tmp_path / "cell.txt").write_text("genotype = " + to_text(MILENAS) + "\n")
    assert train("--epochs", "1", "--genotype", "cell.txt", "--auxiliary", "--cutout", "--save", "t") == 0
    (run,) = tmp_path.glob("eval-t-*")
    names = {p.name for p in run.iterdir()}
    assert {"log.txt", "args.json", "genotype.txt", "genotype.json", "weights_best.pt", "weights_last.pt",
            "metrics.csv", CHECKPOINT} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert from_text((run / "genotype.txt").read_text()) == MILENAS
    args = json.loads((run / "args.json").read_text())
    assert args["init_channels"] == 4 and args["auxiliary"] and args["genotype"] == "cell.txt"

    model = NetworkCIFAR(4, 10, 3, True, MILENAS)
    log = (run / "log.txt").read_text()
    assert f"param size = {param_count(model) / 1e6:f}MB" in log
    for line in ("epoch 0 lr 2.500000e-02", "train_acc ", "valid_acc ", "train 000 ", "valid 000 "):
        assert line in log
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5",
                             "seconds"]
    assert len(rows) == 1 and rows[0]["epoch"] == "0" and 0 <= float(rows[0]["test_acc"]) <= 100
    for name in ("weights_best.pt", "weights_last.pt"):
        model.load_state_dict(torch.load(run / name, weights_only=True))
    state = torch.load(run / CHECKPOINT, weights_only=True)
    assert state["kind"] == "train" and state["epoch"] == 1


def test_resume_is_bit_exact(tmp_path, ctrl_c_in_second_epoch):
    common = ("--epochs", "2", "--arch", "DARTS_V2", "--auxiliary", "--cutout", "--drop_path_prob", "0.3",
              "--deterministic")
    assert train(*common, "--save_dir", "straight") == 0

    with ctrl_c_in_second_epoch(loop.Trainer):
        assert train(*common, "--save_dir", "split") == 130
    assert torch.load("split/checkpoint.pt", weights_only=True)["epoch"] == 1
    assert main(["train", "--resume", "split", "--quiet", "--workers", "0"]) == 0

    a = torch.load("straight/weights_last.pt", weights_only=True)
    b = torch.load("split/weights_last.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    drop_seconds = lambda p: [r[:-1] for r in csv.reader(open(p))]  # noqa: E731
    assert drop_seconds("straight/metrics.csv") == drop_seconds("split/metrics.csv")
    log = (tmp_path / "split" / "log.txt").read_text()
    assert "resuming split at epoch 1" in log
    assert "drop_path_prob 0.000000" in log and "drop_path_prob 0.150000" in log  # 0.3 × epoch / 2
    assert from_text((tmp_path / "split" / "genotype.txt").read_text()) == DARTS_V2


def expect_user_error(capsys, *args, match: str):
    before = set(os.listdir("."))
    assert main(["train", *TINY, "--epochs", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("milenas-fast train: error: ") and "\n" not in err and match in err, err
    assert set(os.listdir(".")) == before  # no run folder (or anything else) left behind
    return err


def test_bad_input_exits_2_without_a_run_folder(tmp_path, capsys):
    expect_user_error(capsys, "--arch", "ENAS", match="known: DARTS_V1, DARTS_V2, DARTS, MILENAS")
    err = expect_user_error(capsys, "--genotype", "Genotype(normal=[('sep_conv_3x3', 1)", match="syntax error")
    assert "line 1 col" in err
    (tmp_path / "bad.txt").write_text(to_text(MILENAS).replace("'sep_conv_5x5', 1", "'sep_conv_7x7', 1"))
    expect_user_error(capsys, "--genotype", "bad.txt", match="normal[7] names unknown op 'sep_conv_7x7'")
    os.remove("bad.txt")
    expect_user_error(capsys, "--genotype", "nowhere/", match="neither a file")
    expect_user_error(capsys, "--arch", "MILENAS", "--genotype", to_text(MILENAS), match="not both")
    expect_user_error(capsys, "--init_channels", "5", match="--init_channels must be even")
    expect_user_error(capsys, "--resume", "missing-run", match="no checkpoint")
    expect_user_error(capsys, "--genotype", to_text(MILENAS._replace(reduce_concat=range(2, 9))),
                      match="reduce_concat")
    # states 0/1 of a reduction cell keep the input resolution: this used to fail in epoch 0's first forward
    expect_user_error(capsys, "--genotype", to_text(MILENAS._replace(reduce_concat=[0, 2])),
                      match="reduce_concat [0, 2] names states outside 2..5")
    expect_user_error(capsys, "--learning_rate", "nan", match="--learning_rate must be a finite number, got nan")
    expect_user_error(capsys, "--momentum", "5", match="--momentum must lie in [0, 1), got 5.0")
    expect_user_error(capsys, "--label_smooth", "nan", match="--label_smooth must be a finite number")
    expect_user_error(capsys, "--weight_decay", "inf", match="--weight_decay must be a finite number")


def test_resume_refuses_changed_flags(capsys):
    assert train("--epochs", "1", "--save_dir", "r") == 0
    assert main(["train", "--resume", "r", "--epochs", "3"]) == 2
    assert "--epochs 3 does not match the checkpoint's 1" in capsys.readouterr().err


def test_genotype_sources(tmp_path):
    """--genotype takes text, a file, or a run folder (its genotype.json); no flag means DARTS_V2."""
    from milenas_fast.space.genotype import to_dict
    from milenas_fast.train.config import TrainConfig

    run = tmp_path / "search-x"
    run.mkdir()
    (run / "genotype.json").write_text(json.dumps(to_dict(MILENAS)))
    assert loop.resolve_genotype(TrainConfig(genotype=str(run)))[0] == MILENAS
    assert loop.resolve_genotype(TrainConfig(genotype=to_text(MILENAS)))[0] == MILENAS
    assert loop.resolve_genotype(TrainConfig())[0] == DARTS_V2
