"""Loads the C++/CUDA extension: the prebuilt `milenas_fast._C` (setup.py), else a just-in-time build.

torch is imported lazily so that setup.py can reuse `cuda_home()` / `cuda_arch_list()` from this file
at build time (it loads the file by path, without importing the package or torch).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import threading
import warnings
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"  # present in a source checkout / editable install
DEFAULT_ARCH_LIST = "8.0;9.0"

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


def _jit_build() -> str:
    import torch
    from torch.utils import cpp_extension

    if not CSRC.is_dir():
        raise RuntimeError(f"C++ sources not found at {CSRC} (not a source checkout)")
    home = cuda_home()
    with_cuda = bool(torch.version.cuda) and torch.cuda.is_available() and home is not None
    name = "milenas_fast_ext_cuda" if with_cuda else "milenas_fast_ext_cpu"
    kwargs = dict(
        name=name,
        sources=sources(with_cuda),
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        is_python_module=False,  # loads the library with torch.ops.load_library: the ops register on load
        verbose=os.environ.get("MILENAS_FAST_VERBOSE_BUILD") == "1",
    )
    with cuda_build_env(home) if with_cuda else contextlib.nullcontext():
        cpp_extension.load(**kwargs)
    return f"JIT-built {name} ({'CPU+CUDA' if with_cuda else 'CPU only'})"


def load():
    """The op namespace `torch.ops.milenas_fast` (a module) once the extension is loaded, else None."""
    with _lock:
        if _state["tried"]:
            return _state["ops"]
        _state["tried"] = True
        import torch

        errors = []
        how = ""
        try:
            importlib.import_module("milenas_fast._C")
            how = "prebuilt milenas_fast._C"
        except (ImportError, OSError) as e:
            errors.append(f"no usable prebuilt milenas_fast._C ({e})")
            try:
                how = _jit_build()
            except Exception as e:  # noqa: BLE001 - compiler errors come in many types
                errors.append(f"JIT build failed: {type(e).__name__}: {str(e).strip()[-2000:]}")
        if how:
            has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("milenas_fast::edge_reduce", "CUDA")
            _state.update(ops=torch.ops.milenas_fast, why="", how=f"{how}; CUDA kernels: {'yes' if has_cuda else 'no'}")
        else:
            _state["why"] = "; ".join(errors)
            warnings.warn(
                f"milenas_fast: C++/CUDA extension unavailable, the PyTorch reference ops will be used. {_state['why']}",
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
