"""Loading a checkpoint never runs code: every .pt is read with torch.load(weights_only=True), the schema is
checked after loading (one line naming the key), and format-1 checkpoints (numpy RNG keys pickled as an
array) still load."""
import random

import numpy as np
import pytest
import torch

from milenas_fast import runs
from milenas_fast.cli import main
from milenas_fast.runtime import load_rng_state, rng_state


class WritesAMarker:
    """Unpickled with weights_only=False, this object opens (creates) `path`: code chosen by the file runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def valid_state(kind: str, fmt: int = runs.CHECKPOINT_FORMAT) -> dict:
    """The smallest dict the schema accepts for `kind`."""
    types = {str: "", dict: {}, int: 0, list: [], bool: False, (int, float): 0.0}
    state = {key: types[t] for key, t in {**runs.SCHEMA["any"], **runs.SCHEMA[kind]}.items() if t in types}
    return {**state, "format": fmt, "kind": kind, "rng": rng_state()}


def save(path, state) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


@pytest.mark.parametrize("kind", ["search", "train"])
def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_runs_nothing(kind, tmp_path, capsys):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "run" / runs.CHECKPOINT
    save(ckpt, {**valid_state(kind), "payload": WritesAMarker(marker)})
    assert main([kind, "--resume", str(ckpt.parent)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused, as loading it could run code" in err[0], err
    assert not marker.exists()
    with pytest.raises(runs.CheckpointError, match="other than tensors"):
        runs.load_checkpoint(ckpt, kind)
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("scheduler"), "lacks 'scheduler'"),
    (lambda s: s.update(epoch="x"), "'epoch' is a str, not int"),
    (lambda s: s.update(epoch=True), "'epoch' is a bool, not int"),
    (lambda s: s["rng"].pop("numpy"), "lacks 'rng.numpy'"),
    (lambda s: s.update(sampler=[1]), "'sampler' is a list, not dict or NoneType"),
])
def test_a_checkpoint_with_a_missing_or_mistyped_key_is_one_line(change, message, tmp_path, capsys):
    state = valid_state("search")
    change(state)
    save(tmp_path / runs.CHECKPOINT, state)
    with pytest.raises(runs.CheckpointError, match=message.replace("(", r"\(")):
        runs.load_checkpoint(tmp_path, "search")
    assert main(["search", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_the_rng_state_is_plain_data_and_format_1_still_loads(tmp_path):
    """Format 2 loads without any allowlist; format 1 (numpy's keys as an array) loads through the numpy
    array allowlist alone, and both restore the same generators."""
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    want = rng_state()
    save(tmp_path / "new" / runs.CHECKPOINT, valid_state("train"))
    assert torch.load(tmp_path / "new" / runs.CHECKPOINT, weights_only=True)["format"] == 2

    old = {**valid_state("train", fmt=1), "rng": {**want, "numpy": np.random.get_state()}}
    save(tmp_path / "old" / runs.CHECKPOINT, old)
    np.random.seed(0)
    _, state = runs.load_checkpoint(tmp_path / "old", "train")
    load_rng_state(state["rng"])
    assert rng_state()["numpy"] == want["numpy"] and random.getstate() == want["python"]


def test_an_unknown_format_is_refused(tmp_path):
    save(tmp_path / runs.CHECKPOINT, valid_state("search", fmt=3))
    with pytest.raises(runs.CheckpointError, match="incompatible version"):
        runs.load_checkpoint(tmp_path, "search")


@pytest.mark.parametrize("stored, message", [
    ({"epochs": "x"}, "--epochs must be int, got 'x'"),
    ({"epochs": 2.5}, "--epochs must be int"),
    ({"amp": 1}, "--amp must be bool"),
    ({"learning_rate": float("nan")}, "--learning_rate must be a finite number"),
])
def test_a_stored_configuration_is_type_checked(stored, message):
    """A checkpoint's (or args.json's, sweep.json's) settings bypass argparse: their types are checked too."""
    from milenas_fast.config import SearchConfig
    from milenas_fast.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        SearchConfig.from_dict(stored).validate()
    assert SearchConfig.from_dict({"learning_rate": 1}).validate().learning_rate == 1  # JSON's 1.0


def test_a_checkpoint_of_the_right_schema_that_does_not_fit_is_one_line(tmp_path, capsys):
    """Keys and types right, contents wrong (a malformed RNG state): one line, exit 2, not a traceback from
    deep inside the restore."""
    run_dir = tmp_path / "run"
    tiny = ["--dataset", "synthetic", "--synthetic_images", "32", "--layers", "3", "--init_channels", "4",
            "--batch_size", "8", "--workers", "0", "--device", "cpu", "--quiet", "--epochs", "2"]
    assert main(["train", *tiny, "--save_dir", str(run_dir)]) == 0
    state = torch.load(run_dir / runs.CHECKPOINT, weights_only=True)
    state["epoch"] = 1
    state["rng"]["numpy"] = ("MT19937", [1, 2, 3], 0, 0, 0.0)
    torch.save(state, run_dir / runs.CHECKPOINT)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint does not fit this run (IndexError" in err[0], err
