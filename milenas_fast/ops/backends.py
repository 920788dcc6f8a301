"""Which kernels the fused ops run on a device: one immutable value, resolved once and handed down.

    kernels = Kernels.for_device("cuda")     # Kernels("cuda", edge_reduce="cpp", why="C++/CUDA kernels", max_tile=0)
    triton = kernels.with_triton("C++ edge_reduce failed the self-test (...)")   # the Triton edge_reduce, or None

edge_reduce: "cpp" (the extension's C++/CUDA kernels, primary), "triton" (its Triton kernels: where the extension has
no kernels for the device, e.g. torch wheels without nvcc, or cannot load), or "" (neither can run: `why`).
The ops take a Kernels as an argument (`kernels=`); MixedOp holds the one it resolved (space/mixed_op.py).
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Kernels:
    device: str  # device type: "cuda" | "cpu"
    edge_reduce: str  # "cpp" | "triton" | "" (none can run)
    why: str
    max_tile: int = 0  # the stencils' largest tile (0: their launchers' own, ops/tiles.py)

    @staticmethod
    def for_device(device_type: str) -> "Kernels":
        """The C++ op where the extension serves `device_type`, else the Triton edge_reduce (ONE warning per process
        says why), else none. Resolved once per device type: the extension and Triton do not come and go."""
        kernels = _RESOLVED.get(device_type)  # a dict lookup: Dynamo traces it
        return kernels if kernels is not None else _RESOLVED.setdefault(device_type, _resolve(device_type))

    def with_triton(self, why: str) -> "Kernels | None":
        """These kernels with edge_reduce's Triton kernels instead of the C++ op (which failed: `why`), or None where
        the Triton edge_reduce cannot run or the C++ op was not in use."""
        if self.edge_reduce != "cpp" or triton_edge_reduce_problem():
            return None
        return replace(self, edge_reduce="triton", why=f"Triton kernels, because the {why}")

    def notice(self) -> str:
        """The warning text when edge_reduce runs its Triton kernels, else ""."""
        if self.edge_reduce != "triton":
            return ""
        hint = (" Install a CUDA toolkit (nvcc) matching torch's CUDA and run `milenas-fast info --rebuild` for the "
                "C++/CUDA kernels." if self.device == "cuda" else "")
        return f"milenas_fast: edge_reduce on {self.device}: {self.why}.{hint}"

    def require(self) -> str:
        """edge_reduce's implementation ("cpp" | "triton"); RuntimeError where none can run."""
        if self.edge_reduce not in ("cpp", "triton"):
            raise RuntimeError(f"milenas_fast: edge_reduce cannot run on {self.device}: {self.why}")
        return self.edge_reduce


_RESOLVED: dict[str, Kernels] = {}  # memo of `_resolve`, a function of the process's extension and Triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_problem(what: str, *modules: str) -> str:
    """'' when every module imports (importing the kernels fails early if they cannot), else why not."""
    try:
        for module in modules:
            importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "this path is unavailable"
        return f"{what} unavailable ({type(e).__name__}: {e})"
    return ""


@functools.lru_cache(maxsize=None)
def triton_problem() -> str:
    """'' when the Triton stencil imports, else why not."""
    return _import_problem("Triton stencil", "triton", "milenas_fast.ops.stencil")


@functools.lru_cache(maxsize=None)
def triton_edge_reduce_problem() -> str:
    return _import_problem("Triton edge_reduce", "milenas_fast.ops.edge_reduce_triton")


@functools.lru_cache(maxsize=None)
def extension_problem(device_type: str) -> str:
    """'' when the extension (loaded now if it was not) has edge_reduce kernels for `device_type`, else why not."""
    from . import extension

    if not extension.available():
        return f"C++ extension unavailable ({extension.why_not()})"
    key = "CUDA" if device_type == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("milenas_fast::edge_reduce", key):
        return f"C++ extension has no {key} kernels ({extension.describe()})"
    return ""


def _resolve(device_type: str) -> Kernels:
    problem = extension_problem(device_type)
    if not problem:
        return Kernels(device_type, "cpp", "C++/CUDA kernels" if device_type == "cuda" else "C++ CPU kernels")
    triton_problem_ = triton_edge_reduce_problem() or (
        "the Triton edge_reduce runs on CPU only through the interpreter (TRITON_INTERPRET=1)"
        if device_type == "cpu" and not interpreting() else "")
    if triton_problem_:
        return Kernels(device_type, "", f"{problem}; {triton_problem_}")
    kernels = Kernels(device_type, "triton", f"Triton kernels, because the {problem}")
    warnings.warn(kernels.notice(), RuntimeWarning, stacklevel=3)
    return kernels
