"""Run folders, atomic file writes, checkpoints and the DARTS-format log."""
from __future__ import annotations

import contextlib
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

from .divergence import Diverged

CHECKPOINT = "checkpoint.pt"
# 2: the RNG state holds no numpy array, so a checkpoint loads with torch.load(weights_only=True). Format 1
# (numpy's RNG keys as a pickled array) still loads: exactly the globals that rebuild an array are allowed.
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the requested run."""


class RunStopped(RuntimeError):
    """A run that cannot go on (exit 1); the message is one line that says what is left to continue from."""


def new_run_dir(kind: str, save: str, save_dir: str = "") -> Path:
    """`<kind>-<save>-<YYYYmmdd-HHMMSS>/` in the working directory, or exactly `save_dir`."""
    path = Path(save_dir) if save_dir else Path(f"{kind}-{save}-{time.strftime('%Y%m%d-%H%M%S')}")
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"run folder {path} exists and is not empty; use --resume {path} to continue it")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


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


def checkpoint_note(run_dir: Path) -> str:
    """What a stopped run leaves behind, for its one-line error ('' when no epoch finished)."""
    ckpt = run_dir / CHECKPOINT
    return f"the last complete checkpoint {ckpt} is intact" if ckpt.is_file() else ""


@contextlib.contextmanager
def one_line_stops(run_dir: Path):
    """What stops a run part-way becomes RunStopped: one line, with what is left to continue from."""
    try:
        yield
    except Diverged as e:
        raise RunStopped("; ".join(filter(None, (str(e), checkpoint_note(run_dir), e.hint)))) from None


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
