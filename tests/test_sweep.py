"""`milenas-fast sweep`: seed parsing and bad input, the selection rule on hand-made run folders, the parallel
GPU scheduling with stand-in children, and real two-seed sweeps on a tiny synthetic CPU search (end to end,
resume, a failing seed)."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from milenas_fast import runs, sweep
from milenas_fast.cli import main
from milenas_fast.space import genotype as gt
from milenas_fast.space.known_genotypes import by_name

TINY = ["--dataset", "synthetic", "--synthetic_images", "32", "--layers", "3", "--init_channels", "4",
        "--batch_size", "16", "--epochs", "1", "--workers", "0", "--device", "cpu", "--quiet"]


def _table(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / sweep.TABLE) as f:
        return list(csv.DictReader(f))


# --- input ---------------------------------------------------------------------------------------------
def test_parse_seeds():
    assert sweep.parse_seeds("1,2, 3,40") == [1, 2, 3, 40]
    for bad in ("1,x", "", "1,,2", "-1", "1.5"):
        with pytest.raises(sweep.ConfigError, match="--seeds must be"):
            sweep.parse_seeds(bad)
    with pytest.raises(sweep.ConfigError, match="seed 2 twice"):
        sweep.parse_seeds("2,1,2")


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1,x"], "--seeds must be comma-separated"),
    (["--seeds", "3,3"], "seed 3 twice"),
    (["--seeds", "1", "--seed", "2"], "instead of --seed"),
    (["--seeds", "1,2", "--learning_rate", "0.01", "--learning_rate_min", "0.1"], "--learning_rate_min"),
    (["--seeds", "1,2", "--momentum", "-1"], "--momentum must lie in [0, 1)"),
    (["--seeds", "1,2", "--learning_rate", "nan"], "--learning_rate must be a finite number"),
    ([], "--seeds S1,S2,... is required"),
    (["--resume", "nowhere"], "not a sweep folder"),
])
def test_bad_input_exits_2_before_writing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: pytest.fail("a child was started"))
    assert main(["sweep", *argv, "--save_dir", "out", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


# --- selection on hand-made run folders ----------------------------------------------------------------
def _fake_run(run_dir: Path, arch: str, accs: list[float]) -> gt.Genotype:
    """A finished run folder whose epochs had validation accuracies `accs` and whose final genotype is `arch`."""
    g = by_name(arch)
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "genotype": gt.to_text(g), "valid_acc": a}) for e, a in enumerate(accs)]
    (run_dir / "genotypes.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "genotype.json").write_text(json.dumps(gt.to_dict(g)))
    return g


def test_select_keeps_the_best_final_validation_accuracy(tmp_path):
    # seed 7 has the best epoch (95) but ends lower; seed 3 ends best; seed 5 has no genotype (failed)
    _fake_run(tmp_path / "seed-7", "DARTS_V2", [95.0, 80.0])
    g3 = _fake_run(tmp_path / "seed-3", "MILENAS", [60.0, 85.5])
    (tmp_path / "seed-5").mkdir()
    rows = [sweep.read_seed(tmp_path / f"seed-{s}", s) for s in (7, 3, 5)]
    assert [r.status for r in rows] == ["finished", "finished", "failed"]
    assert "no genotype.json" in rows[2].error
    assert [r.valid_acc for r in rows[:2]] == [80.0, 85.5]
    assert [r.epochs for r in rows[:2]] == [2, 2]
    best = sweep.select(rows)
    assert best.seed == 3 and gt.from_text(best.genotype) == g3
    assert (best.n, best.r) == gt.conv_counts(g3)
    # the size of the network `train` builds by default: the README's DARTS' param size figures
    assert rows[0].params_mb == pytest.approx(3.349342, abs=1e-6)
    assert best.params_mb == pytest.approx(3.874222, abs=1e-6)
    # a tie goes to the seed listed first; nothing finished selects nothing
    tie = [sweep.SeedRow(4, "finished", 1, 50.0), sweep.SeedRow(2, "finished", 1, 50.0)]
    assert sweep.select(tie).seed == 4
    assert sweep.select([rows[2]]) is None
    table = sweep.table_csv(rows, best)
    assert [line.split(",")[:2] for line in table.splitlines()[1:]] == [["7", "finished"], ["3", "finished"],
                                                                       ["5", "failed"]]


# --- the GPU path: one child per visible GPU, in parallel ---------------------------------------------
@pytest.mark.gpu_path
def test_gpu_slots_follow_the_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert sweep.gpu_slots("auto") == ["3", "5"]
    assert sweep.gpu_slots("cpu") == [None]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sweep.gpu_slots("cuda") == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert sweep.gpu_slots("cuda") == [None]


STAND_IN = """
import os, sys, time
from pathlib import Path
run_dir = Path(sys.argv[sys.argv.index("--save_dir") + 1])
run_dir.mkdir()
(run_dir / "started").write_text(str(time.time()))
time.sleep(1.0)
(run_dir / "gpu").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
(run_dir / "ended").write_text(str(time.time()))
sys.exit(3 if "--seed 13" in " ".join(sys.argv) else 0)
"""


@pytest.mark.slow  # multi-process sweep
@pytest.mark.gpu_path
def test_seeds_run_in_parallel_one_per_gpu(tmp_path, monkeypatch):
    """Stand-in children record the CUDA_VISIBLE_DEVICES they got and when they ran."""
    real = sweep.child_argv
    monkeypatch.setattr(sweep, "child_argv", lambda *a: [sys.executable, "-c", STAND_IN, *real(*a)[4:]])
    seeds = [11, 12, 13, 14]
    (tmp_path / "seed-14").mkdir()  # failed before its first checkpoint: set aside, started afresh
    (tmp_path / "seed-14" / "log.txt").write_text("old")
    outcomes = sweep.run_all(seeds, ["3", "5"], lambda s, slot: sweep.run_seed(tmp_path, {"epochs": 1}, s, slot))
    assert {s: o.returncode for s, o in outcomes.items()} == {11: 0, 12: 0, 13: 3, 14: 0}
    runs = {s: sweep.seed_dir(tmp_path, s) for s in seeds}
    gpus = {s: (d / "gpu").read_text() for s, d in runs.items()}
    assert sorted(gpus.values()) == ["3", "3", "5", "5"]
    assert gpus[11] != gpus[12]  # the first two started together, one on each GPU
    span = {s: (float((d / "started").read_text()), float((d / "ended").read_text())) for s, d in runs.items()}
    assert span[11][0] < span[12][1] and span[12][0] < span[11][1]  # they overlapped
    assert outcomes[13].error == "exit code 3"  # no output: the exit code is the reason
    assert (tmp_path / "seed-14.failed" / "log.txt").read_text() == "old"


# --- real sweeps ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """A finished sweep of two tiny CPU searches (children are real `python -m milenas_fast search`)."""
    sweep_dir = tmp_path_factory.mktemp("sweeps") / "sw"
    assert main(["sweep", "--seeds", "2,1", "--save_dir", str(sweep_dir), *TINY]) == 0
    return sweep_dir


@pytest.mark.slow  # shares the two-seed sweep: two real child searches, ~28 s of CPU
def test_sweep_end_to_end(two_seeds, capsys):
    rows = _table(two_seeds)
    assert [r["seed"] for r in rows] == ["2", "1"] and {r["status"] for r in rows} == {"finished"}
    for r in rows:
        run_dir = two_seeds / f"seed-{r['seed']}"
        assert json.loads((run_dir / "args.json").read_text())["seed"] == int(r["seed"])
        history = [json.loads(line) for line in (run_dir / "genotypes.jsonl").read_text().splitlines()]
        g = gt.load(run_dir)
        assert r["genotype"] == gt.to_text(g) and float(r["valid_acc"]) == history[-1]["valid_acc"]
        assert (int(r["n"]), int(r["r"])) == gt.conv_counts(g) and r["model_size"] == f"n{r['n']}r{r['r']}"
        assert float(r["params_MB"]) > 1.0 and r["epochs"] == "1"
    chosen = [r for r in rows if r["selected"] == "yes"]
    assert len(chosen) == 1
    assert float(chosen[0]["valid_acc"]) == max(float(r["valid_acc"]) for r in rows)
    assert gt.load(two_seeds) == gt.from_text(chosen[0]["genotype"])  # where `train --genotype SWEEP` reads it
    for ext in ("png", "svg"):
        assert (two_seeds / f"sweep.{ext}").stat().st_size > 1000
    assert json.loads((two_seeds / sweep.SWEEP_FILE).read_text())["seeds"] == [2, 1]


@pytest.mark.slow  # shares the two-seed sweep: two real child searches, ~28 s of CPU
def test_resume_skips_finished_seeds(two_seeds, tmp_path, monkeypatch, capsys):
    sweep_dir = Path(shutil.copytree(two_seeds, tmp_path / "sw"))
    (sweep_dir / "genotype.json").unlink()
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: pytest.fail("a finished seed was started again"))
    assert main(["sweep", "--resume", str(sweep_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "seed 2: finished already, skipped" in out and "seed 1: finished already, skipped" in out
    assert "milenas-fast train --genotype " + str(sweep_dir) in out
    assert _table(sweep_dir) == _table(two_seeds) and gt.load(sweep_dir) == gt.load(two_seeds)
    # a flag that changes what the searches compute may not change on resume, nor may the seeds
    assert main(["sweep", "--resume", str(sweep_dir), "--epochs", "3"]) == 2
    assert main(["sweep", "--resume", str(sweep_dir), "--seeds", "1,2"]) == 2


@pytest.mark.slow  # shares the two-seed sweep: two real child searches, ~28 s of CPU
def test_failing_seed_is_reported_and_the_next_one_still_runs(two_seeds, tmp_path, capsys):
    """Resumed sweep: seed 2 (run first) has a corrupt checkpoint and its child exits 2; seed 1 lost its final
    files (killed after its last checkpoint) and still finishes through its own --resume; exit code 1."""
    sweep_dir = Path(shutil.copytree(two_seeds, tmp_path / "sw"))
    for s in (1, 2):
        (sweep_dir / f"seed-{s}" / "genotype.json").unlink()
    (sweep_dir / "seed-2" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["sweep", "--resume", str(sweep_dir)]) == 1
    out = capsys.readouterr().out
    assert out.index("seed 2: resuming") < out.index("seed 1: resuming")
    assert "failed seeds: 2" in out
    rows = {r["seed"]: r for r in _table(sweep_dir)}
    assert rows["2"]["status"] == "failed" and "unreadable or corrupt" in rows["2"]["error"]
    assert rows["1"]["status"] == "finished" and rows["1"]["selected"] == "yes"
    assert "resuming" in (sweep_dir / "seed-1" / "log.txt").read_text()
    assert gt.load(sweep_dir) == gt.load(sweep_dir / "seed-1") == gt.load(two_seeds / "seed-1")


# --- one writer per folder -------------------------------------------------------------------------------
def test_a_second_sweep_on_a_running_sweeps_folder_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: pytest.fail("a child was started"))
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    (sweep_dir / sweep.SWEEP_FILE).write_text(json.dumps({"seeds": [1], "flags": {"device": "cpu"}}))
    with runs.RunLock(sweep_dir):
        assert main(["sweep", "--resume", str(sweep_dir)]) == 2
    assert f"is in use by another run (pid {os.getpid()})" in capsys.readouterr().err


CHILD = """
import os, sys, time
from milenas_fast.sweep import die_with_sweep
die_with_sweep()  # what `python -m milenas_fast search` does first
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(60)
"""
PARENT = """
import sys
from pathlib import Path
from milenas_fast import sweep
sweep.child_argv = lambda seed, flags, run_dir: [sys.executable, "-c", sys.argv[2], sys.argv[3]]
sweep.run_seed(Path(sys.argv[1]), {}, 1, None)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is dead, waiting for init
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_sweep_takes_its_running_seed_with_it(sig, tmp_path):
    """SIGTERM (or SIGKILL) to a sweep used to leave its search child running, orphaned, writing into the seed
    folder while `sweep --resume` started a second writer there."""
    child_pid = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), CHILD, str(child_pid)])
    deadline = time.monotonic() + 60
    while not child_pid.exists() or not child_pid.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the child never started"
        time.sleep(0.05)
    pid = int(child_pid.read_text())
    parent.send_signal(sig)
    parent.wait()
    deadline = time.monotonic() + 10
    while not _gone(pid):
        assert time.monotonic() < deadline, "the seed's child outlived its sweep"
        time.sleep(0.05)
