"""--tensorboard and --wandb: what tiny search and train runs report, read back with TensorBoard's own reader and
from W&B's offline run file, against genotypes.jsonl and metrics.csv."""
import csv
import importlib.util
import json
import math
import os
import struct
import time
from pathlib import Path

import pytest

from milenas_fast import sweep
from milenas_fast.cli import main
from milenas_fast.tracking import entropy

if importlib.util.find_spec("tensorboard") is None and "CI" not in os.environ:  # CI installs the extra
    pytest.skip("tensorboard not installed", allow_module_level=True)

SEARCH = ["search", "--dataset", "synthetic", "--synthetic_images", "64", "--layers", "3", "--init_channels", "4",
          "--batch_size", "16", "--device", "cpu", "--deterministic", "--quiet", "--report_freq", "1"]
TRAIN = ["train", "--dataset", "synthetic", "--synthetic_images", "48", "--init_channels", "4", "--layers", "3",
         "--batch_size", "16", "--workers", "0", "--device", "cpu", "--quiet", "--report_freq", "1"]
STEPS = 2  # training steps per epoch of SEARCH (32 training images, batch 16) and of TRAIN (48 images: 3)


def events(log_dir: Path):
    """TensorBoard's own reader over the run's event files (it applies purge_step as TensorBoard does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> dict[int, float]:
    steps = [e.step for e in acc.Scalars(tag)]
    assert len(steps) == len(set(steps)), f"{tag}: steps {steps} repeat"
    return {e.step: e.value for e in acc.Scalars(tag)}


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "genotypes.jsonl").read_text().splitlines()]


def check_search_events(acc, rows: list[dict]) -> None:
    epochs = [r["epoch"] for r in rows]
    assert all(r[f"{s}_acc"] <= r[f"{s}_top5"] <= 100 for r in rows for s in ("train", "valid"))  # top-5 ⊇ top-1
    for key in ("train_acc", "train_top5", "train_loss", "valid_acc", "valid_top5", "valid_loss", "lr", "n", "r"):
        got = scalars(acc, f"epoch/{key}")
        assert list(got) == epochs
        assert got == {r["epoch"]: pytest.approx(r[key], rel=1e-6) for r in rows}, key
    for cell in ("normal", "reduce"):
        got = scalars(acc, f"epoch/entropy_{cell}")
        assert got == {r["epoch"]: pytest.approx(entropy(r[f"alphas_{cell}"]), rel=1e-6) for r in rows}
        assert all(0 < v <= math.log(8) + 1e-6 for v in got.values())
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("genotype/text_summary")}
    assert texts == {r["epoch"]: r["genotype"] for r in rows}
    images = acc.Images("alphas")
    assert [i.step for i in images] == epochs and images[0].width > 400
    for key in ("seconds", "images_per_s", "arch_lr"):
        assert list(scalars(acc, f"epoch/{key}")) == epochs
    windows = scalars(acc, "step/train_top1")
    assert list(windows) == list(range(1, STEPS * len(rows) + 1))  # every step: --report_freq 1
    # the last window of an epoch is the epoch's training accuracy (one process)
    assert [windows[STEPS * (e + 1)] for e in epochs] == [pytest.approx(r["train_acc"]) for r in rows]
    assert scalars(acc, "step/lr")[1] == pytest.approx(rows[0]["lr"])
    for tag in ("step/train_loss", "step/train_top5", "step/images_per_s", "step/arch_lr"):
        assert list(scalars(acc, tag)) == list(windows)


@pytest.fixture(scope="module")
def tracked_search(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "search"
    assert main(SEARCH + ["--epochs", "1", "--save_dir", str(run_dir), "--tensorboard"]) == 0
    return run_dir


def test_a_search_reports_what_genotypes_jsonl_holds(tracked_search):
    acc = events(tracked_search / "tb")  # typed without a folder: tb/ in the run folder
    check_search_events(acc, history(tracked_search))
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hparams and b"arch_learning_rate" in hparams["_hparams_/session_start_info"]


def test_a_train_run_reports_what_metrics_csv_holds(tmp_path):
    run_dir, tb = tmp_path / "train", tmp_path / "elsewhere"
    assert main(TRAIN + ["--epochs", "2", "--arch", "DARTS_V2", "--save_dir", str(run_dir), "--tensorboard",
                         str(tb)]) == 0
    assert not (run_dir / "tb").exists()
    acc = events(tb)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "seconds"):
        got = scalars(acc, f"epoch/{key}")
        assert got == {int(r["epoch"]): pytest.approx(float(r[key]), rel=1e-6, abs=1e-3) for r in rows}, key
    windows = scalars(acc, "step/train_top5")
    assert list(windows) == list(range(1, 3 * len(rows) + 1))  # 48 images, batch 16: 3 steps an epoch
    assert [scalars(acc, "step/train_loss")[3 * (e + 1)] for e in (0, 1)] == \
        [pytest.approx(float(r["train_loss"]), rel=1e-6) for r in rows]
    assert scalars(acc, "step/lr")[4] == pytest.approx(float(rows[1]["lr"]))


def test_without_the_package_the_flag_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(SEARCH + ["--save_dir", str(tmp_path / "run"), "--wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--wandb needs the wandb package" in err and "milenas-fast[wandb]" in err
    assert not (tmp_path / "run").exists()


def test_a_sweep_tracks_each_seed_as_its_own_run(tmp_path):
    flags = {"epochs": 1, "tensorboard": "tbs", "wandb": True}
    argv = sweep.child_argv(3, flags, tmp_path / "sweep-x" / "seed-3")
    assert argv[argv.index("--tensorboard") + 1] == str(Path("tbs") / "seed-3")
    assert argv[argv.index("--wandb_name") + 1] == "sweep-x-seed-3"
    own = sweep.child_argv(3, {"tensorboard": "RUN_DIR/tb"}, tmp_path / "seed-3")
    assert own[own.index("--tensorboard") + 1] == "RUN_DIR/tb"  # tb/ in the seed's own run folder


@pytest.mark.slow  # two searches' worth of epochs
def test_a_resumed_search_continues_the_same_run_without_repeated_steps(tmp_path, monkeypatch):
    from milenas_fast.search.loop import Search

    run_dir = tmp_path / "run"
    real, calls = Search.iteration, []

    def ctrl_c_mid_second_epoch(self, batch):
        calls.append(self.epoch)
        if calls.count(1) == 2:  # after epoch 1's first window was reported
            raise KeyboardInterrupt
        return real(self, batch)

    with monkeypatch.context() as m:
        m.setattr(Search, "iteration", ctrl_c_mid_second_epoch)
        assert main(SEARCH + ["--epochs", "2", "--save_dir", str(run_dir), "--tensorboard"]) == 130
    assert list(scalars(events(run_dir / "tb"), "step/train_top1")) == [1, 2, 3]  # the orphan: step 3
    assert main(["search", "--resume", str(run_dir), "--quiet"]) == 0
    acc = events(run_dir / "tb")
    check_search_events(acc, history(run_dir))
    assert len(list((run_dir / "tb").iterdir())) == 2  # one event file per process, in one run folder


# --- W&B ---------------------------------------------------------------------------------------------
def wandb_records(path: Path):
    """The records of W&B's offline run file (LevelDB log framing of wandb_internal_pb2.Record; wandb ships no
    Python reader of its own any more)."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        pos += header
        if kind == 0 and length == 0:
            break
        parts += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def finished_wandb_records(path: Path, timeout: float = 60.0) -> list:
    """The run file's records once W&B's service has written its last (exit) record: `run.finish()` can return
    before the service process has flushed the file (seen once in CI, the machine busy with another worker)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(wandb_records(path))
        except Exception:  # noqa: BLE001 - a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@pytest.mark.slow  # W&B's service process takes seconds to start
def test_wandb_offline_reports_what_genotypes_jsonl_holds(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        if "CI" in os.environ:
            pytest.fail("CI installs the wandb extra")
        pytest.skip("wandb not installed")  # the other tests here need tensorboard only
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    run_dir = tmp_path / "run"
    assert main(SEARCH + ["--epochs", "1", "--save_dir", str(run_dir), "--wandb", "--wandb_project", "p",
                          "--wandb_name", "tiny"]) == 0
    (path,) = (tmp_path / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb")
    logged, run = [], None
    for record in finished_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            logged.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.history.item})
        elif kind == "run":
            run = record.run
    assert run.project == "p" and run.display_name == "tiny"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["init_channels"] == 4
    (row,) = history(run_dir)
    epoch = {k: v for entry in logged if "epoch" in entry for k, v in entry.items()}
    for key in ("train_acc", "train_loss", "valid_acc", "valid_loss", "lr", "n", "r"):
        assert epoch[f"epoch/{key}"] == pytest.approx(row[key], rel=1e-6), key
    assert epoch["epoch/entropy_normal"] == pytest.approx(entropy(row["alphas_normal"]), rel=1e-6)
    assert epoch["genotype"] == row["genotype"] and epoch["alphas/_type"] == "image-file"
    windows = [entry for entry in logged if "iteration" in entry]
    assert [w["iteration"] for w in windows] == list(range(1, STEPS + 1))
    assert windows[-1]["step/train_top1"] == pytest.approx(row["train_acc"])
