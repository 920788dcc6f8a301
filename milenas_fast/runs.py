"""Run folders (claimed by one run at a time), atomic file writes, checkpoints, resuming, the one-line
errors of a stopped run and the DARTS-format log."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import os
import pickle
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import distributed
from .divergence import Diverged

CHECKPOINT = "checkpoint.pt"
ARGS = "args.json"
LOCK = ".lock"
# What --resume continues from (a search or train run, a sweep): a folder holding one is a run's.
RESUMABLE = (CHECKPOINT, ARGS, "sweep.json")
# What a run that died before writing args.json leaves: a new run may take a folder holding only these.
LEFTOVERS = ("log.txt", LOCK)
PREFIX = {"search": "search", "train": "eval", "sweep": "sweep"}
# 2: the RNG state holds no numpy array, so a checkpoint loads with torch.load(weights_only=True). Format 1
# (numpy's RNG keys as a pickled array) still loads: exactly the globals that rebuild an array are allowed.
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the requested run."""


class RunStopped(RuntimeError):
    """A run that cannot go on (exit 1); the message is one line that says what is left to continue from."""


# --- run folders ------------------------------------------------------------------------------------------
def run_dir_path(kind: str, save: str, save_dir: str = "") -> Path:
    """`<prefix>-<save>-<YYYYmmdd-HHMMSS>/` in the working directory, or exactly `save_dir`."""
    return Path(save_dir) if save_dir else Path(f"{PREFIX[kind]}-{save}-{time.strftime('%Y%m%d-%H%M%S')}")


def _is_tmp(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(".tmp")  # atomic_write_bytes' temporary files


def _only_leftovers(path: Path) -> bool:
    return all(p.name in LEFTOVERS or _is_tmp(p) for p in path.iterdir())


def check_new_run_dir(path: Path) -> None:
    """Refuse a folder a new run cannot take, before any data is loaded: a file in the way, a folder holding
    a run (continue it with --resume) or anything else."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"run folder {path} exists and is not a folder")
    if not path.exists():
        parent = next(p for p in path.parents if p.exists())  # '.' or '/' at worst
        if not parent.is_dir():
            raise CheckpointError(f"run folder {path} cannot be created: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CheckpointError(f"run folder {path} cannot be created: {parent} is not writable")
        return
    if _only_leftovers(path):
        return
    if any((path / name).is_file() for name in RESUMABLE):
        raise CheckpointError(f"run folder {path} exists and is not empty: it holds a run (continue it with "
                              f"--resume {path})")
    raise CheckpointError(f"run folder {path} exists and is not empty (and holds no run to resume); choose "
                          "another --save_dir")


_held_locks: set[int] = set()  # the descriptors of the run locks this process holds


def _drop_locks_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file: its copy would keep the folder
    locked after the run released it, for as long as the child lives."""
    for fd in _held_locks:
        os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


class RunLock:
    """An exclusive lock on a run folder for the life of a run: flock on RUN_DIR/.lock, which holds the
    owner's pid. A second run on the folder is refused naming that pid; the OS drops the lock when the
    process ends, however it ends, so a killed run never blocks the next (a pid file alone would)."""

    def __init__(self, run_dir: Path):
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"run folder {run_dir} is in use by another run (pid {holder}); wait for it to "
                                  "end or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd
        _held_locks.add(fd)

    def release(self) -> None:
        if self.fd is not None:
            _held_locks.discard(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def clean_stale_tmp(run_dir: Path) -> None:
    """Remove the temporary files of atomic writes killed part-way; called under the folder's lock, when no
    write of a live run can be in flight."""
    for p in run_dir.iterdir():
        if _is_tmp(p):
            p.unlink(missing_ok=True)


def claim(run_dir: Path) -> RunLock:
    """Lock an existing run folder (to resume it) and clean it."""
    lock = RunLock(run_dir)
    clean_stale_tmp(run_dir)
    return lock


def create_run_dir(path: Path) -> RunLock:
    """Create and claim a new run's folder. Of two runs racing for it, one gets it and the other a clean error:
    the folder is created without exist_ok, and an existing one is taken only under its lock, when empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # an existing folder: empty (or leftovers only), checked below
        path.mkdir()
    lock = RunLock(path)
    try:
        check_new_run_dir(path)
    except BaseException:
        lock.release()
        raise
    clean_stale_tmp(path)
    return lock


# --- files ------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file. The
    file gets the mode open() would give it (mkstemp's is 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() names no file: name the one being written
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# --- checkpoints ------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def resolve_checkpoint(source: str | Path) -> Path:
    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def _numpy_array_globals() -> list:
    """What rebuilds a plain numpy array (format 1's RNG keys), under the names numpy 1 and 2 pickle it by.
    Rebuilding an array calls none of the file's choosing: every other global is still refused."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    rebuild = core.multiarray._reconstruct
    return [(rebuild, "numpy.core.multiarray._reconstruct"), (rebuild, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# The keys every checkpoint holds and those of each kind, with their types: a file that passes loads without a
# KeyError or TypeError deep in a load_state_dict. Keys absent from older checkpoints are in OPTIONAL.
SCHEMA = {
    "any": {"kind": str, "config": dict, "epoch": int, "model": dict, "scheduler": dict, "precision": dict,
            "history": list, "rng": dict},
    "search": {"finished": bool, "alphas": list, "w_optimizer": dict, "a_optimizer": dict, "valid_stream": dict,
               "model_sizes": dict},
    "train": {"genotype": str, "best_acc": (int, float), "optimizer": dict},
}
OPTIONAL = {"world_size": int, "sampler": (dict, type(None))}
RNG_SCHEMA = {"python": tuple, "numpy": tuple, "torch": torch.Tensor}


def _type_problem(value, types) -> str:
    """'' when `value` has one of `types` (a bool is no int here), else what it is."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return ""
    return f"is a {type(value).__name__}, not {' or '.join(t.__name__ for t in types)}"


def check_schema(path: Path, state: dict, kind: str) -> None:
    """One line naming the first missing or mistyped key."""
    wanted = {**SCHEMA["any"], **SCHEMA[kind]}
    present = {k: t for k, t in OPTIONAL.items() if k in state}
    for scope, d, schema in (("", state, {**wanted, **present}), ("rng.", state.get("rng"), RNG_SCHEMA)):
        for key, types in schema.items():
            if key not in d:
                raise CheckpointError(f"checkpoint {path} lacks '{scope}{key}'")
            if problem := _type_problem(d[key], types):
                raise CheckpointError(f"checkpoint {path}: '{scope}{key}' {problem}")


def load_checkpoint(source: str | Path, kind: str) -> tuple[Path, dict]:
    """(run folder, checkpoint dict); `kind` is 'search' or 'train' and must match what wrote it. Loaded with
    weights_only=True: a file holding anything but tensors and plain data is refused, never executed."""
    path = resolve_checkpoint(source)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if unsafe:  # weights_only refused a global the pickle names: what would have run
            raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data "
                                  f"({unsafe[1]}); refused, as loading it could run code") from None
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not a milenas-fast checkpoint (or an incompatible version)")
    if state.get("kind") != kind:
        raise CheckpointError(f"{path} is a {state.get('kind')!r} checkpoint, not a {kind!r} one")
    check_schema(path, state, kind)
    return path.parent, state


@contextlib.contextmanager
def restoring():
    """Restoring a run from a checkpoint of the right schema can still fail on what it holds (another
    network's shapes, a malformed RNG state): one line naming the problem, not a traceback."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        if out_of_memory(e) is not None:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"checkpoint does not fit this run ({type(e).__name__}: {first})") from None


# --- resuming, and where a run writes ----------------------------------------------------------------------
def check_resume_flags(cls, saved: dict, explicit: dict, whose: str) -> None:
    """Flags typed on a --resume command line must not change what the run computes."""
    saved = cls.current_names(saved)
    for name, value in explicit.items():
        if name not in cls.RUNTIME and name in saved and saved[name] != value:
            raise CheckpointError(f"--{name} {value} does not match {whose} {saved[name]} (only runtime flags such "
                                  "as --device may change on --resume)")


def read_resume(source: str | Path, kind: str, cls) -> tuple[dict | None, dict]:
    """(checkpoint state or None, stored configuration) of `--resume SOURCE`: the checkpoint's or, for a run
    that stopped before its first checkpoint, its args.json (the run then starts again at epoch 0)."""
    path = Path(source)
    if path.is_file() or (path / CHECKPOINT).is_file():
        state = load_checkpoint(path, kind)[1]
        return state, state["config"]
    if not (path / ARGS).is_file():
        fresh = f"; start it afresh with --save_dir {path}" if path.is_dir() and _only_leftovers(path) else ""
        raise CheckpointError(f"no checkpoint at {path / CHECKPOINT} and no {ARGS}: nothing to resume{fresh}")
    try:
        stored = json.loads((path / ARGS).read_text())
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path / ARGS} is unreadable or not a settings object")
    unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(cls)})
    if unknown:  # args.json does not say which command wrote it; its settings do
        raise CheckpointError(f"{path / ARGS} has settings a {kind} run does not have ({', '.join(unknown[:3])}): "
                              f"not a {kind} run folder")
    return None, stored


def open_run(kind: str, cls, cfg, explicit: dict | None, main: bool):
    """Where the run writes, settled before any data is loaded. `--resume`: the folder is claimed (`main`
    only: the rank that writes) and its checkpoint read, or its args.json; the stored configuration is taken,
    with the runtime flags typed now (an untyped --data must not become ./data). A new run's folder is only
    checked: it is created once the run is built, so bad input leaves nothing behind.
    Returns (validated configuration, run folder, checkpoint state or None, lock or None)."""
    if not cfg.resume:
        cfg.validate()
        path = run_dir_path(kind, cfg.save, cfg.save_dir)
        if main:
            check_new_run_dir(path)
        return cfg, path, None, None
    path = Path(cfg.resume)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    run_dir = path if path.is_dir() else path.parent
    lock = claim(run_dir) if main else None
    try:
        state, saved = read_resume(path, kind, cls)
        check_resume_flags(cls, saved, explicit or {}, "the checkpoint's" if state is not None else f"{ARGS}'s")
        runtime = {k: getattr(cfg, k) for k in cls.RUNTIME if explicit is None or k in explicit}
        return cls.from_dict({**saved, **runtime}).validate(), run_dir, state, lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def run_in_folder(kind: str, cls, cfg, explicit: dict | None, console: bool, build, body) -> Path:
    """A search or train run from its folder's point of view: settle the folder (open_run), `build(cfg,
    run_dir, state)` (data and model: nothing written yet), create and claim a new folder, log into it, then
    `body(built, run_dir, resumed, bar)`. The folder stays locked until the run ends; what stops it part-way
    is one line (one_line_stops)."""
    main = distributed.is_main()  # rank 0 alone claims and writes the folder; the others log to the console
    cfg, run_dir, state, lock = open_run(kind, cls, cfg, explicit, main)
    try:
        with one_line_stops(run_dir, cfg):
            built = build(cfg, run_dir, state)
            if not cfg.resume:
                run_dir = distributed.from_rank0(run_dir)
                lock = create_run_dir(run_dir) if main else None
            bar = console and main and not cfg.quiet and sys.stderr.isatty()
            setup_logging(run_dir if main else None, console=console, quiet=cfg.quiet or not main, bar=bar)
            return body(built, run_dir, bool(cfg.resume), bar)
    finally:
        close_logging()
        if lock is not None:
            lock.release()


# --- one-line errors of a run that stops part-way ----------------------------------------------------------
def checkpoint_note(run_dir: Path) -> str:
    """What a stopped run leaves behind ('' when no epoch was checkpointed)."""
    ckpt = run_dir / CHECKPOINT
    return f"the last complete checkpoint is intact ({ckpt})" if ckpt.is_file() else ""


def resume_note(run_dir: Path) -> str:
    """How to continue a run stopped by something outside it (a full disk, Ctrl-C); '' when nothing can be."""
    if (run_dir / CHECKPOINT).is_file():
        return f"{checkpoint_note(run_dir)}; continue with --resume {run_dir}"
    if (run_dir / ARGS).is_file():
        return f"no epoch was checkpointed; --resume {run_dir} starts it again from epoch 0"
    return ""


_ALLOCATION = re.compile(r"allocate (\d[\d.]* ?(?:bytes|[KMGTP]i?B))", re.IGNORECASE)


def out_of_memory(e: BaseException) -> str | None:
    """None unless `e` is an allocator's out-of-memory error (CUDA, the CPU allocator, numpy); then what it
    tried to allocate, when it says."""
    text = str(e)
    if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text):
        return None
    amount = _ALLOCATION.search(text)
    if amount is None:
        return ""
    if amount[1].lower().endswith("bytes"):
        return f"{int(amount[1].split()[0]) / 2**30:.1f} GiB"
    return amount[1]


def stop_line(e: Exception, run_dir: Path, cfg) -> str | None:
    """The one line for what stopped a run, with what is left to continue from; None: not ours to word."""
    if isinstance(e, Diverged):
        parts = (str(e), checkpoint_note(run_dir), e.hint)
    elif isinstance(e, OSError):  # a full disk, a vanished folder: the path, never a half-written file
        where = f": {e.filename}" if e.filename else ""
        parts = (f"{e.strerror or e}{where}", resume_note(run_dir))
    elif (amount := out_of_memory(e)) is not None:
        tried = f" (tried to allocate {amount})" if amount else ""
        parts = (f"out of memory{tried} with --batch_size {cfg.batch_size}, --layers {cfg.layers}, "
                 f"--init_channels {cfg.init_channels}, {cfg.image_size}x{cfg.image_size} images",
                 checkpoint_note(run_dir), "start again with a smaller --batch_size, --layers or --init_channels")
    else:
        return None
    return "; ".join(p for p in parts if p)


@contextlib.contextmanager
def one_line_stops(run_dir: Path, cfg):
    """What stops a run part-way becomes RunStopped (exit 1): one line, with what is left to continue from.
    Ctrl-C stays KeyboardInterrupt (exit 130) and carries the same note. A lost rank is distributed's to say."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(resume_note(run_dir)) from None
    except Exception as e:  # noqa: BLE001 — stop_line picks the ones it words
        line = None if distributed.is_collective_failure(e) else stop_line(e, run_dir, cfg)
        if line is None:
            raise
        raise RunStopped(line) from None


class _TqdmHandler(logging.StreamHandler):
    """Console lines that do not tear a live progress bar; per-step lines are left to the bar."""

    def emit(self, record):
        if getattr(record, "step_line", False):
            return
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stdout)


def setup_logging(run_dir: Path | None, console: bool = True, quiet: bool = False,
                  bar: bool = False) -> logging.Logger:
    """DARTS log format in log.txt (appending, so a resumed run continues the same file); the same lines
    on the console unless quiet (then warnings only)."""
    log = logging.getLogger("milenas_fast")
    close_logging()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%m/%d %I:%M:%S %p")
    if run_dir is not None:  # None: a rank other than 0 of a distributed run (it writes no files)
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    if console:
        sh = _TqdmHandler(sys.stdout) if bar else logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        sh.setLevel(logging.WARNING if quiet else logging.INFO)
        log.addHandler(sh)
    return log


def close_logging() -> None:
    log = logging.getLogger("milenas_fast")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
