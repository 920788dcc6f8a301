"""Run folders that never get stuck and never get two writers: a run that stopped before its first checkpoint
resumes from its args.json; one run at a time holds a folder (an OS lock, released however the run ends);
the folder is created atomically and checked before any data is loaded; stale temporary files are cleaned;
files honour the umask; what stops a run part-way (a failing file, running out of memory) is one line naming
the path or the sizes, mentioning --resume only where there is something to resume."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from milenas_fast import runs
from milenas_fast.cli import main
from milenas_fast.search import loop as search_loop
from milenas_fast.train import loop as train_loop

TINY = ["--dataset", "synthetic", "--synthetic_images", "32", "--layers", "3", "--init_channels", "4",
        "--batch_size", "8", "--workers", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(search_loop, "_plot", lambda run_dir: None)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def no_data_load(monkeypatch):
    """Loading data fails the test: what is checked must be checked before it."""
    def refuse(*a, **k):
        pytest.fail("the data was loaded")
    monkeypatch.setattr(search_loop, "load_dataset", refuse)
    monkeypatch.setattr(train_loop, "load_train_test", refuse)


# --- a run that stopped before its first checkpoint ----------------------------------------------------------

@pytest.mark.parametrize("kind", [pytest.param("search", marks=pytest.mark.slow), "train"])  # search: ~3.5 s
def test_a_run_stopped_in_epoch_0_resumes_from_its_args_json(kind, tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 0 used to leave a folder that refused both a new run ("not empty") and --resume ("no
    checkpoint"). Now the stop line says --resume starts it again, and it does, with the stored settings."""
    run_dir = tmp_path / "run"
    cls = search_loop.Search if kind == "search" else train_loop.Trainer
    real = cls.train_epoch

    def interrupted(self, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, "train_epoch", interrupted)
    assert main([kind, *TINY, "--epochs", "1", "--save_dir", str(run_dir), "--seed", "3"]) == 130
    assert f"--resume {run_dir} starts it again from epoch 0" in capsys.readouterr().err
    assert not (run_dir / runs.CHECKPOINT).exists() and (run_dir / runs.ARGS).is_file()
    (run_dir / ".args.json.x1y2.tmp").write_text("{")  # as a write killed part-way leaves it

    assert main([kind, "--resume", str(run_dir), "--epochs", "2"]) == 2  # the same flag rules as any resume
    assert "--epochs 2 does not match args.json's 1" in one_line(capsys)
    monkeypatch.setattr(cls, "train_epoch", real)
    assert main([kind, "--resume", str(run_dir), "--quiet"]) == 0
    state = runs.load_checkpoint(run_dir, kind)[1]
    assert state["epoch"] == 1 and state["config"]["seed"] == 3
    assert f"resuming {run_dir} at epoch 0" in (run_dir / "log.txt").read_text()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_what_a_folder_without_a_run_allows_is_what_its_errors_say(tmp_path, monkeypatch, capsys):
    no_data_load(monkeypatch)
    dead = tmp_path / "dead"  # died before args.json: a log and a temporary file
    dead.mkdir()
    (dead / "log.txt").write_text("old\n")
    (dead / ".args.json.abc.tmp").write_text("{")
    assert main(["search", "--resume", str(dead)]) == 2
    assert f"nothing to resume; start it afresh with --save_dir {dead}" in one_line(capsys)
    runs.check_new_run_dir(dead)  # ... which a new run accepts

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"")
    assert main(["search", "--resume", str(foreign)]) == 2
    assert "nothing to resume" in (line := one_line(capsys)) and "--save_dir" not in line
    assert main(["search", *TINY, "--save_dir", str(foreign)]) == 2
    assert "holds no run to resume); choose another --save_dir" in one_line(capsys)

    train_run = tmp_path / "train-run"
    train_run.mkdir()
    (train_run / runs.ARGS).write_text('{"arch": "MILENAS", "auxiliary": true}')
    assert main(["search", "--resume", str(train_run)]) == 2
    assert "settings a search run does not have (arch, auxiliary): not a search run folder" in one_line(capsys)
    assert main(["search", *TINY, "--save_dir", str(train_run)]) == 2
    assert f"it holds a run (continue it with --resume {train_run})" in one_line(capsys)


# --- one run per folder ------------------------------------------------------------------------------------

def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder(tmp_path, capsys):
    resumed, new = tmp_path / "resumed", tmp_path / "new"
    for d in (resumed, new):
        d.mkdir()
    (resumed / runs.ARGS).write_text("{}")
    with runs.RunLock(resumed), runs.RunLock(new):  # as two runs started a second apart would hold them
        assert main(["search", "--resume", str(resumed)]) == 2
        assert f"run folder {resumed} is in use by another run (pid {os.getpid()})" in one_line(capsys)
        assert main(["train", *TINY, "--epochs", "1", "--save_dir", str(new)]) == 2
        assert f"run folder {new} is in use by another run (pid {os.getpid()})" in one_line(capsys)
    assert sorted(p.name for p in new.iterdir()) == [runs.LOCK]  # the second run wrote nothing
    runs.claim(resumed).release()  # released: the folder can be had again


def test_a_lock_whose_holder_was_killed_does_not_block(tmp_path):
    """The holder writes its pid and is SIGKILLed holding the flock: the OS drops the lock (a pid file alone
    would block forever)."""
    holder = ("import fcntl, os, signal, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", holder, str(tmp_path / runs.LOCK)])
    assert proc.returncode == -signal.SIGKILL and (tmp_path / runs.LOCK).read_text()
    runs.RunLock(tmp_path).release()


def test_of_runs_racing_for_a_new_folder_one_gets_it(tmp_path):
    path, start, won, lost = tmp_path / "a" / "run", threading.Barrier(8), [], []

    def race():
        start.wait()
        try:
            won.append(runs.create_run_dir(path))
        except runs.CheckpointError as e:
            lost.append(str(e))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7 and all("in use by another run" in e for e in lost), lost
    won[0].release()


# --- the folder, checked first; its files ------------------------------------------------------------------

def test_a_bad_save_dir_is_refused_before_the_data_is_loaded(tmp_path, monkeypatch, capsys):
    no_data_load(monkeypatch)
    (tmp_path / "file").write_text("")
    for kind, save_dir, message in (("search", "file", "exists and is not a folder"),
                                     ("train", "file/run", "cannot be created: " + str(tmp_path / "file")),
                                     ("search", ".", "exists and is not empty")):
        assert main([kind, *TINY, "--save_dir", str(tmp_path / save_dir)]) == 2
        assert message in one_line(capsys)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_honour_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        runs.atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:  # what log.txt gets
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == \
        0o666 & ~umask


# --- one line for what stops a run part-way ----------------------------------------------------------------

def test_a_failing_file_names_its_path_and_no_resume_when_there_is_no_run(tmp_path, monkeypatch, capsys):
    """It used to say "the last complete checkpoint is intact (continue with --resume RUN_DIR)" even here."""
    def unreadable(*a, **k):
        raise PermissionError(13, "Permission denied", "/data/cifar/batch_1")

    monkeypatch.setattr(search_loop, "load_dataset", unreadable)
    assert main(["search", *TINY, "--save_dir", str(tmp_path / "new")]) == 1
    assert one_line(capsys).endswith("error: Permission denied: /data/cifar/batch_1")
    assert not (tmp_path / "new").exists()


def test_a_failed_write_names_the_file_being_written(tmp_path, monkeypatch):
    def full_disk(fd):
        raise OSError(28, "No space left on device")  # as write() and fsync() raise it: no file named

    monkeypatch.setattr(runs.os, "fsync", full_disk)
    with pytest.raises(OSError) as e:
        runs.atomic_write_text(tmp_path / "x.json", "{}")
    assert e.value.filename == str(tmp_path / "x.json") and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, amount", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 1228800000000 bytes. Error code 12"), "1144.4 GiB"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                            "79.19 GiB of which 1.2 GiB is free."), "20.00 GiB"),
    (MemoryError("Unable to allocate 72.8 TiB for an array with shape (10000000000000,)"), "72.8 TiB"),
])
def test_out_of_memory_in_the_second_epoch_is_one_line_with_the_sizes(error, amount, tmp_path, monkeypatch,
                                                                     capsys):
    real = train_loop.Trainer.train_epoch

    def allocate(self, progress):
        if self.epoch == 1:
            raise error
        return real(self, progress)

    monkeypatch.setattr(train_loop.Trainer, "train_epoch", allocate)
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--save_dir", str(run_dir)]) == 1
    line = one_line(capsys)
    assert f"out of memory (tried to allocate {amount}) with --batch_size 8, --layers 3, --init_channels 4" in line
    assert f"checkpoint is intact ({run_dir / runs.CHECKPOINT})" in line and "smaller --batch_size" in line
    assert runs.load_checkpoint(run_dir, "train")[1]["epoch"] == 1


def test_other_runtime_errors_are_not_worded_as_out_of_memory(tmp_path):
    with pytest.raises(RuntimeError, match="Sizes of tensors"), runs.one_line_stops(tmp_path, None):
        raise RuntimeError("Sizes of tensors must match")


def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path):
    """DataLoader workers are forked while the run holds its lock: a worker still alive when the run ends
    must not keep the folder locked (the next --resume in the same session said 'in use')."""
    lock = runs.RunLock(tmp_path)
    ready, started = os.pipe()
    child = os.fork()
    if child == 0:  # a worker outliving the run
        os.write(started, b"x")  # the fork's hooks have run
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        lock.release()
        runs.RunLock(tmp_path).release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(started)
