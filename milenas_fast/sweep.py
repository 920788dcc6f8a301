"""The paper's multi-seed protocol: one ordinary search run folder per seed, then the seeds side by side and
the genotype with the best search-time validation accuracy selected for training from scratch.

Each seed is a child process `python -m milenas_fast search ... --seed S --save_dir SWEEP/seed-S`, so a seed
is exactly what `milenas-fast search` would have produced (and can be resumed or plotted on its own). With
several CUDA GPUs visible the seeds run in parallel, one per GPU (CUDA_VISIBLE_DEVICES per child); otherwise
one after another.

Ranking uses each seed's FINAL validation accuracy: the run's genotype (genotype.json) is derived from the
final α, so the final epoch's accuracy is the one measured on the supernet that produced it; a best-epoch
accuracy may belong to an earlier, different genotype. With --early_stopping the final epoch is the stopping
epoch, so the same holds.
"""
from __future__ import annotations

import csv
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import runs
from .config import TENSORBOARD_IN_RUN, SearchConfig
from .errors import ConfigError
from .space import genotype as gt

SWEEP_FILE = "sweep.json"
TABLE = "sweep.csv"
# SearchConfig fields the sweep owns: the seed comes from --seeds, the folders and resume are the sweep's.
OWN_FLAGS = ("seed", "save", "save_dir", "resume")
COLUMNS = ("seed", "status", "epochs", "valid_acc", "n", "r", "model_size", "params_MB", "selected", "genotype",
           "error")


# --- input -------------------------------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or not all(s.isdigit() for s in items):
        raise ConfigError(f"--seeds must be comma-separated non-negative integers (e.g. 1,2,3,4), got {text!r}")
    seeds = [int(s) for s in items]
    dup = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if dup is not None:
        raise ConfigError(f"--seeds lists seed {dup} twice")
    return seeds


def check_flags(flags: dict, seeds: list[int]) -> SearchConfig:
    """What `search` would refuse for any seed, refused here before anything is written or spawned."""
    from .runtime import resolve_device

    cfg = SearchConfig.from_dict({**flags, "seed": seeds[0]}).validate()
    resolve_device(cfg.device)
    return cfg


def new_sweep(seeds: list[int], flags: dict, save: str, save_dir: str) -> tuple[Path, runs.RunLock]:
    """The new sweep folder, created and locked for the sweep's life."""
    check_flags(flags, seeds)
    sweep_dir = runs.run_dir_path("sweep", save, save_dir)
    runs.check_new_run_dir(sweep_dir)
    lock = runs.create_run_dir(sweep_dir)
    runs.atomic_write_json(sweep_dir / SWEEP_FILE, {"seeds": seeds, "flags": flags})
    return sweep_dir, lock


def resume_sweep(sweep_dir: str, seeds: list[int] | None,
                 typed: dict) -> tuple[Path, list[int], dict, runs.RunLock]:
    """The stored seeds and flags, and the folder locked for the sweep's life; typed flags may only change how
    the runs execute (as for search)."""
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        stored = json.loads(path.read_text())
        stored_seeds, stored_flags = list(stored["seeds"]), dict(stored["flags"])
    except (OSError, ValueError, KeyError, TypeError):
        raise runs.CheckpointError(f"{sweep_dir}: no readable {SWEEP_FILE} (not a sweep folder?)") from None
    if seeds is not None and seeds != stored_seeds:
        raise ConfigError(f"--seeds {','.join(map(str, seeds))} does not match the sweep's "
                          f"{','.join(map(str, stored_seeds))}")
    runs.check_resume_flags(SearchConfig, SearchConfig.from_dict(stored_flags).to_dict(), typed, "the sweep's")
    flags = {**stored_flags, **{k: v for k, v in typed.items() if k in SearchConfig.RUNTIME}}
    check_flags(flags, stored_seeds)
    return Path(sweep_dir), stored_seeds, flags, runs.claim(Path(sweep_dir))


# --- running the seeds -------------------------------------------------------------------------------
PARENT_ENV = "MILENAS_FAST_SWEEP_PID"  # set for a seed's child: the sweep's pid
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_sweep() -> None:
    """In a seed's search (PARENT_ENV set): end when the sweep that started it ends, however it ends (a
    parent-death signal, Linux), so a killed sweep leaves no orphan writing into the seed's folder."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the sweep ended before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def seed_dir(sweep_dir: Path, seed: int) -> Path:
    return sweep_dir / f"seed-{seed}"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "genotype.json").is_file()  # written after the last checkpoint, once the search is done


def flag_args(flags: dict) -> list[str]:
    out = []
    for name, value in flags.items():
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no-{name}")
        else:
            out += [f"--{name}", str(value)]
    return out


def tracking_flags(flags: dict, seed: int, sweep_dir: Path) -> dict:
    """Each seed its own tracked run: a --tensorboard DIR gets a seed-S/ subfolder (the default, tb/ in the
    run folder, already is the seed's own), a W&B run is named <sweep or --wandb_name>-seed-S."""
    own = {}
    if flags.get("tensorboard") not in (None, "", TENSORBOARD_IN_RUN):
        own["tensorboard"] = str(Path(flags["tensorboard"]) / f"seed-{seed}")
    if flags.get("wandb"):
        own["wandb_name"] = f"{flags.get('wandb_name') or sweep_dir.name}-seed-{seed}"
    return {**flags, **own}


def child_argv(seed: int, flags: dict, run_dir: Path) -> list[str]:
    """A fresh search, or the seed's own --resume when it has a checkpoint."""
    where = ["--resume" if (run_dir / runs.CHECKPOINT).is_file() else "--save_dir", str(run_dir)]
    own = tracking_flags(flags, seed, run_dir.parent)
    return [sys.executable, "-m", "milenas_fast", "search", *flag_args(own), "--seed", str(seed), *where]


def gpu_slots(device: str) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES values, one per parallel child; [None] (sequential, environment unchanged) unless
    at least two CUDA GPUs are visible and the device is not the CPU."""
    import torch

    count = torch.cuda.device_count() if device != "cpu" else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")][:count] if visible is not None else list(map(str, range(count)))
    return ids if len(ids) >= 2 else [None]


@dataclass
class Outcome:
    returncode: int
    error: str = ""


def _last_line(path: Path, start: int) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_seed(sweep_dir: Path, flags: dict, seed: int, slot: str | None) -> Outcome:
    """One child search; its console output is appended to SWEEP/seed-S.out."""
    run_dir = seed_dir(sweep_dir, seed)
    if run_dir.exists() and not (run_dir / runs.CHECKPOINT).is_file():
        # failed before its first checkpoint: nothing to resume; keep its log aside and start afresh
        aside = sweep_dir / f"seed-{seed}.failed"
        shutil.rmtree(aside, ignore_errors=True)
        run_dir.rename(aside)
    argv = child_argv(seed, flags, run_dir)
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    out = sweep_dir / f"seed-{seed}.out"
    print(f"seed {seed}: {'resuming' if '--resume' in argv else 'searching'} in {run_dir}"
          + (f" on GPU {slot}" if slot is not None else ""), flush=True)
    with open(out, "ab") as f:
        start = f.tell()
        rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc == 0:
        print(f"seed {seed}: done", flush=True)
        return Outcome(0)
    error = _last_line(out, start) or f"exit code {rc}"
    print(f"seed {seed}: FAILED (exit code {rc}): {error}", flush=True)
    return Outcome(rc, error)


def run_all(seeds: list[int], slots: list, run_one) -> dict[int, Outcome]:
    """run_one(seed, slot) for every seed, at most one at a time per slot; a failed seed does not stop the
    others, Ctrl-C starts no further seed."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for s in seeds:
        todo.put(s)
    stop, outcomes = threading.Event(), {}

    def worker(slot):
        while not stop.is_set():
            try:
                seed = todo.get_nowait()
            except queue.Empty:
                return
            outcomes[seed] = run_one(seed, slot)

    pool = ThreadPoolExecutor(len(slots))
    try:
        list(pool.map(worker, slots))
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True)
    return outcomes


# --- the table ---------------------------------------------------------------------------------------
@dataclass
class SeedRow:
    seed: int
    status: str  # finished | failed
    epochs: int = 0
    valid_acc: float | None = None  # the final epoch's (see the module docstring)
    n: int | None = None
    r: int | None = None
    params_mb: float | None = None
    genotype: str = ""
    error: str = ""


def eval_params_mb(g: gt.Genotype) -> float:
    """DARTS' `param size` of the CIFAR-10 network `milenas-fast train --genotype` builds by default (auxiliary
    head excluded): one size to compare the seeds by; built on the meta device, so nothing is allocated."""
    import torch

    from .data.datasets import NUM_CLASSES
    from .space.evalnet import NetworkCIFAR, param_count
    from .train.config import TrainConfig

    cfg = TrainConfig()
    with torch.device("meta"):
        net = NetworkCIFAR(cfg.init_channels, NUM_CLASSES, cfg.layers, False, g)
    return param_count(net) / 1e6


def read_seed(run_dir: Path, seed: int, outcome: Outcome | None = None) -> SeedRow:
    from .plot import read_history

    if not is_finished(run_dir):  # the folder decides, as it does for --resume
        error = outcome.error if outcome is not None and outcome.error else "no genotype.json (did not finish)"
        return SeedRow(seed, "failed", error=error)
    try:
        history = read_history(run_dir)
        g = gt.load(run_dir)
        if not history:
            raise gt.GenotypeError(f"{run_dir}: genotypes.jsonl is missing or empty")
    except gt.GenotypeError as e:
        return SeedRow(seed, "failed", error=str(e))
    n, r = gt.conv_counts(g)
    return SeedRow(seed, "finished", len(history), history[-1]["valid_acc"], n, r, eval_params_mb(g), gt.to_text(g))


def select(rows: list[SeedRow]) -> SeedRow | None:
    """The finished seed with the best final validation accuracy; ties go to the earlier seed in --seeds."""
    return max((r for r in rows if r.status == "finished"), key=lambda r: r.valid_acc, default=None)


def table_csv(rows: list[SeedRow], selected: SeedRow | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        done = r.status == "finished"
        w.writerow([r.seed, r.status, r.epochs if done else "", r.valid_acc if done else "", r.n if done else "",
                    r.r if done else "", f"n{r.n}r{r.r}" if done else "", f"{r.params_mb:.6f}" if done else "",
                    "yes" if r is selected else "", r.genotype, r.error])
    return buf.getvalue()


def plot_table(rows: list[SeedRow], selected: SeedRow | None, stem: Path) -> list[Path]:
    """Final validation accuracy per seed as points, each labelled with its model size; the selected seed stands
    out, a failed seed is marked on the axis. Points on an axis fitted to the seeds: seeds a point or two
    apart looked equal as bars from 0 %."""
    from matplotlib.ticker import MaxNLocator

    from .plot import new_figure, save_figure

    fig = new_figure(1.2 * len(rows) + 2.5, 4)
    ax = fig.add_subplot()
    done = [r.valid_acc for r in rows if r.status == "finished"]
    low, high = (min(done), max(done)) if done else (0.0, 1.0)
    pad = max(1.0, 0.25 * (high - low))
    ax.set_ylim(low - pad, high + 2 * pad)  # room above for the labels
    for i, r in enumerate(rows):
        if r.status != "finished":
            ax.text(i, low - pad, "failed", ha="center", va="bottom", color="#d62728", fontsize=9)
            continue
        chosen = r is selected
        ax.plot(i, r.valid_acc, "o", ms=12 if chosen else 9, color="#2ca02c" if chosen else "#6b8fc7",
                markeredgecolor="black")
        ax.annotate(f"{r.valid_acc:.2f}%\nn{r.n}r{r.r}\n{r.params_mb:.2f}MB", (i, r.valid_acc), xytext=(0, 10),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"seed {r.seed}" for r in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel("final search validation accuracy (%)")
    ax.set_title(f"selected: seed {selected.seed} (green)" if selected else "no seed finished")
    return save_figure(fig, stem)


# --- the whole sweep ---------------------------------------------------------------------------------
def run(sweep_dir: Path, seeds: list[int], flags: dict) -> int:
    """Run the unfinished seeds, then write sweep.csv, sweep.{png,svg} and the selected genotype
    (SWEEP/genotype.json, read by `train --genotype SWEEP`). 0 when every seed finished, else 1."""
    slots = gpu_slots(SearchConfig.from_dict(flags).device)
    todo = [s for s in seeds if not is_finished(seed_dir(sweep_dir, s))]
    for s in seeds:
        if s not in todo:
            print(f"seed {s}: finished already, skipped")
    outcomes = run_all(todo, slots, lambda seed, slot: run_seed(sweep_dir, flags, seed, slot))
    rows = [read_seed(seed_dir(sweep_dir, s), s, outcomes.get(s)) for s in seeds]
    best = select(rows)
    runs.atomic_write_text(sweep_dir / TABLE, table_csv(rows, best))
    pictures = plot_table(rows, best, sweep_dir / "sweep")
    for r in rows:
        done = r.status == "finished"
        detail = f"valid_acc {r.valid_acc:.4f}  n{r.n}r{r.r}  {r.params_mb:.6f}MB" if done else r.error
        print(f"{'*' if r is best else ' '} seed {r.seed:<6} {r.status:<9} {detail}")
    print(f"table: {sweep_dir / TABLE}; plot: {', '.join(str(p) for p in pictures)}")
    if best is not None:
        g = gt.from_text(best.genotype)
        runs.atomic_write_json(sweep_dir / "genotype.json", gt.to_dict(g))
        runs.atomic_write_text(sweep_dir / "genotype.txt", best.genotype + "\n")
        print(f"selected: seed {best.seed} (final search validation accuracy {best.valid_acc:.4f}%)")
        print(f"genotype = {best.genotype}")
        print(f"train it: milenas-fast train --genotype {sweep_dir} --auxiliary --cutout")
    failed = [r.seed for r in rows if r.status != "finished"]
    if failed:
        print(f"failed seeds: {', '.join(map(str, failed))} (see {sweep_dir}/seed-S.out; rerun with "
              f"--resume {sweep_dir})")
    return 1 if failed else 0
