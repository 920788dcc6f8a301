"""Loads the C++/CUDA extension: the prebuilt `milenas_fast._C` (setup.py), else a just-in-time build.

Guards, so that one bad build does not cost every later process:
- a prebuilt `_C` whose recorded csrc/ hash (BUILD_RECORD, written by setup.py) differs from the sources
  in this checkout is not imported: warning, then the JIT build;
- a failed JIT build is remembered on disk (FAILED_RECORD in torch's build folder, keyed by the csrc/
  hash, torch version, compiler and CUDA toolkit) and not retried until one of those changes, or
  $MILENAS_FAST_REBUILD=1 / `milenas-fast info --rebuild`;
- a build lock left by a killed build is removed (with a warning); a live one is waited for, at most
  $MILENAS_FAST_BUILD_LOCK_MINUTES (default 10), never forever.

torch is imported lazily so that setup.py can reuse `cuda_home()` / `cuda_arch_list()` / `source_hash()`
from this file at build time (it loads the file by path, without importing the package or torch).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"  # present in a source checkout / editable install
DEFAULT_ARCH_LIST = "8.0;9.0"
BUILD_RECORD = "_C.build.json"  # beside the prebuilt _C: {"source_hash": ...}
FAILED_RECORD = "milenas_fast_failed_build.json"
REBUILD_ENV = "MILENAS_FAST_REBUILD"
LOCK_ENV = "MILENAS_FAST_BUILD_LOCK_MINUTES"
SOURCE_SUFFIXES = (".cpp", ".cc", ".cu", ".cuh", ".h", ".hpp")

_lock = threading.Lock()
_state: dict = {"tried": False, "ops": None, "how": "", "why": "not loaded yet"}


def cuda_home() -> str | None:
    """The CUDA toolkit prefix (folder above nvcc's bin/), or None. Checks that nvcc and headers exist,
    because a wrapper script on PATH (e.g. /usr/local/bin/nvcc) points torch's guess at the wrong place."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda"]
    for prefix in filter(None, candidates):
        if (Path(prefix) / "bin" / "nvcc").is_file() and (Path(prefix) / "include" / "cuda_runtime.h").is_file():
            return prefix
    return None


def cuda_arch_list() -> str:
    """An explicit TORCH_CUDA_ARCH_LIST wins; else the visible GPUs; else DEFAULT_ARCH_LIST (A100, H100).
    torch's own detection crashes when no GPU is visible, so a value is always returned."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    try:
        import torch

        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{major}.{minor}" for major, minor in caps)
    except Exception:  # noqa: BLE001 - any failure here just means "no usable GPU"
        pass
    return DEFAULT_ARCH_LIST


@contextlib.contextmanager
def cuda_build_env(home: str):
    """CUDA_HOME and TORCH_CUDA_ARCH_LIST for the duration of a build (torch reads both)."""
    from torch.utils import cpp_extension

    saved = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    saved_home = cpp_extension.CUDA_HOME
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home  # torch caches its (possibly wrong) guess at import time
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sources(with_cuda: bool) -> list[str]:
    files = sorted(CSRC.rglob("*.cpp"))
    if with_cuda:
        files += sorted(CSRC.rglob("*.cu"))
    return [str(f) for f in files]


def source_hash(root: Path = CSRC) -> str:
    """sha256 of the C++/CUDA sources and headers under csrc/ (relative names and contents): what a build
    was made from."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def prebuilt_problem(origin: str | None) -> str | None:
    """For a prebuilt _C at `origin`: None when there is none, "" when it matches csrc/ (or there is no
    csrc/ to compare with: an installed wheel), else why it must not be loaded."""
    if not origin:
        return None
    if not CSRC.is_dir():
        return ""
    record = Path(origin).with_name(BUILD_RECORD)
    try:
        recorded = json.loads(record.read_text())["source_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"prebuilt {origin} has no readable {BUILD_RECORD} (built before source hashing)"
    current = source_hash()
    if recorded != current:
        return f"prebuilt {origin} was built from other csrc/ sources ({recorded[:12]} != {current[:12]})"
    return ""


def _no_cuda_reason(home: str | None) -> str:
    import torch

    if not torch.version.cuda:
        return "torch has no CUDA"
    if home is None:
        return "no CUDA toolkit (nvcc) found; torch wheels ship none"
    if not torch.cuda.is_available():
        return "no GPU visible at build time"
    return ""


def _build_key(with_cuda: bool, home: str | None) -> str:
    import torch

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "none"
    parts = [source_hash(), torch.__version__, str(torch.version.cuda), f"cuda={with_cuda}", str(home),
             os.path.realpath(compiler)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _lock_holders(path: Path) -> list[int] | None:
    """PIDs that have `path` open (Linux /proc), or None without /proc. Processes whose open files cannot be
    read (another user's, a container's init) are not counted: a build holding the lock runs as us."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target, pids = os.path.realpath(path), []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (d / "fd").iterdir()):
                pids.append(int(d.name))
        except OSError:  # not ours to inspect, or it ended while we looked
            pass
    return pids


def _torch_lock_is_a_file_baton() -> bool:
    """Older torch (2.11, say) locks the build folder with FileBaton: the lock FILE's existence blocks, so a
    killed build leaves it behind. Newer torch (2.14) holds an OS lock on it, released when the holder dies."""
    from torch.utils import cpp_extension

    try:
        return "FileBaton(" in inspect.getsource(cpp_extension._jit_compile)
    except (OSError, TypeError, AttributeError):
        return True


def lock_minutes() -> float:
    try:
        return max(0.0, float(os.environ.get(LOCK_ENV, "10")))
    except ValueError:
        return 10.0


def clear_stale_lock(lock: Path, timeout_s: float, baton: bool, poll_s: float = 0.5) -> None:
    """Return when torch can take the build lock `lock`. A lock nobody holds is stale (its build was killed):
    a FileBaton one is removed with a warning. A held one is waited for, at most `timeout_s`; then
    RuntimeError. When holders cannot be seen, a lock older than `timeout_s` counts as stale."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        holders = _lock_holders(lock)
        if holders == [] or (holders is None and age > timeout_s):
            if baton:
                why = "no process holds it" if holders == [] else f"it is {age / 60:.1f} min old"
                warnings.warn(f"milenas_fast: removing a stale C++ extension build lock {lock} ({why}; a build was "
                              "interrupted)", RuntimeWarning, stacklevel=3)
                lock.unlink(missing_ok=True)
            return
        if time.monotonic() >= deadline:
            who = f"pid {', '.join(map(str, holders))}" if holders else "an unknown process"
            raise RuntimeError(f"the build lock {lock} has been held by {who} for more than {timeout_s / 60:.1f} "
                               f"min (${LOCK_ENV}); giving up instead of waiting forever. If that build is stuck, "
                               "end it or delete the lock")
        time.sleep(poll_s)


def _read_failure(path: Path, key: str) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("key") == key else None


def _jit_build() -> str:
    import torch
    from torch.utils import cpp_extension

    if not CSRC.is_dir():
        raise RuntimeError(f"C++ sources not found at {CSRC} (not a source checkout)")
    home = cuda_home()
    with_cuda = bool(torch.version.cuda) and torch.cuda.is_available() and home is not None
    name = "milenas_fast_ext_cuda" if with_cuda else "milenas_fast_ext_cpu"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    failed, key = build_dir / FAILED_RECORD, _build_key(with_cuda, home)
    rec = _read_failure(failed, key)
    if rec and os.environ.get(REBUILD_ENV) != "1":
        raise RuntimeError(f"the JIT build of {name} failed before ({rec.get('when')}, recorded in {failed}) and "
                           f"nothing it depends on has changed; not retried. Its error: {rec.get('error')}. Set "
                           f"{REBUILD_ENV}=1 or run `milenas-fast info --rebuild` to retry")
    clear_stale_lock(build_dir / "lock", lock_minutes() * 60, _torch_lock_is_a_file_baton())
    kwargs = dict(
        name=name,
        sources=sources(with_cuda),
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        build_directory=str(build_dir),
        is_python_module=False,  # loads the library with torch.ops.load_library: the ops register on load
        verbose=os.environ.get("MILENAS_FAST_VERBOSE_BUILD") == "1",
    )
    try:
        with cuda_build_env(home) if with_cuda else contextlib.nullcontext():
            cpp_extension.load(**kwargs)
    except Exception as e:
        error = f"{type(e).__name__}: {str(e).strip()[-2000:]}"
        with contextlib.suppress(OSError):
            failed.write_text(json.dumps({"key": key, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "error": error}))
        raise
    failed.unlink(missing_ok=True)
    no_cuda = "" if with_cuda else f" ({_no_cuda_reason(home)})"
    return f"JIT-built {name} ({'CPU+CUDA' if with_cuda else 'CPU only'}{no_cuda})"


def load():
    """The op namespace `torch.ops.milenas_fast` (a module) once the extension is loaded, else None."""
    with _lock:
        if _state["tried"]:
            return _state["ops"]
        _state["tried"] = True
        import torch

        errors = []
        how = ""
        spec = importlib.util.find_spec("milenas_fast._C")
        problem = prebuilt_problem(spec.origin if spec else None)
        if problem:
            warnings.warn(f"milenas_fast: {problem}; JIT-building csrc/ instead (`pip install -e . "
                          "--no-build-isolation` refreshes the prebuilt one)", RuntimeWarning, stacklevel=2)
            errors.append(problem)
        elif problem == "":
            try:
                importlib.import_module("milenas_fast._C")
                how = "prebuilt milenas_fast._C"
            except (ImportError, OSError) as e:
                errors.append(f"no usable prebuilt milenas_fast._C ({e})")
        if not how:
            try:
                how = _jit_build()
            except Exception as e:  # noqa: BLE001 - compiler errors come in many types
                errors.append(f"JIT build failed: {type(e).__name__}: {str(e).strip()[-2000:]}")
        if how:
            from .edge_reduce_meta import register_cpp

            register_cpp()  # with the load, under the lock: a loaded library is complete
            has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("milenas_fast::edge_reduce", "CUDA")
            cuda = "yes" if has_cuda else "no" + ("" if how.startswith("JIT") else " (built without nvcc)")
            _state.update(ops=torch.ops.milenas_fast, why="", how=f"{how}; CUDA kernels: {cuda}")
        else:
            _state["why"] = "; ".join(errors)
            warnings.warn(
                f"milenas_fast: C++/CUDA extension unavailable (the Triton edge_reduce or the PyTorch reference stands in): "
                f"{_state['why']}",
                RuntimeWarning,
                stacklevel=2,
            )
        return _state["ops"]


def available() -> bool:
    return load() is not None


def why_not() -> str:
    """Why the extension is unavailable ("" when it is loaded)."""
    load()
    return _state["why"]


def describe() -> str:
    """One line for an `info` command: how the extension was loaded, or why it was not."""
    return _state["how"] if available() else f"unavailable: {why_not()}"


def require():
    """The op namespace; raises RuntimeError when the extension cannot be loaded."""
    ops = load()
    if ops is None:
        raise RuntimeError(
            "milenas_fast: the C++/CUDA extension was requested but cannot be loaded: "
            f"{_state['why']}. Build it with `pip install -e . --no-build-isolation` (needs torch and a C++ "
            "compiler; nvcc for CUDA), or install ninja for the just-in-time build."
        )
    return ops
