"""The one place that decides which MixedOp implementation runs, and says why.

    MILENAS_FAST_IMPL = auto | fused | reference      (default auto; the search CLI's --impl overrides it)

- reference: the plain-PyTorch module forwards, everywhere.
- fused:     the Triton multi-stencil + edge_reduce path. On CUDA it needs Triton; edge_reduce runs the
             extension's CUDA kernels, or — when the extension has none (no nvcc: torch wheels ship none) or
             cannot load — its Triton twin, with ONE warning saying why. On CPU it runs only when
             TRITON_INTERPRET=1 (the Triton interpreter, how CI checks it), with the extension's CPU kernels
             (or the twin). An explicit request that cannot be honoured raises `FusedUnavailable` — never a
             silent fallback.
- auto:      fused for CUDA tensors when everything it needs is present, reference otherwise (CPU included:
             the interpreter is for checking, not for speed).

`decide(requested, device, dtype)` returns a `Decision` (implementation + reasons) and never raises for an
unavailable fused path; `blockers(device, dtype)` lists what stands in its way (empty = it can run);
`edge_reduce_impl(device_type)` says which edge_reduce kernels the fused path uses there, and why.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

ENV = "MILENAS_FAST_IMPL"
CHOICES = ("auto", "fused", "reference")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedUnavailable(RuntimeError):
    """An explicit request for the fused MixedOp that cannot run here."""


@dataclass(frozen=True)
class Decision:
    requested: str  # auto | fused | reference
    impl: str  # fused | reference
    reasons: tuple[str, ...]  # why `impl` (for fused-requested-but-impossible: what blocks it)

    @property
    def ok(self) -> bool:
        """False when fused was requested explicitly but cannot run."""
        return not (self.requested == "fused" and self.impl != "fused")

    def why(self) -> str:
        return f"{self.requested}: {self.impl} ({'; '.join(self.reasons)})"


def requested_impl(value: str | None = None) -> str:
    """The requested implementation: `value` if given, else $MILENAS_FAST_IMPL, else auto."""
    req = (value if value is not None else os.environ.get(ENV, "auto")).strip().lower() or "auto"
    if req not in CHOICES:
        src = "requested" if value is not None else f"${ENV}"
        raise ValueError(f"{src}={req!r}: must be one of {', '.join(CHOICES)}")
    return req


def _import_problem(what: str, *modules: str) -> str:
    """'' when every module imports (importing the kernels fails early if they cannot), else why not."""
    try:
        for module in modules:
            importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "this path is unavailable"
        return f"{what} unavailable ({type(e).__name__}: {e})"
    return ""


@functools.lru_cache(maxsize=None)
def _triton_problem() -> str:
    return _import_problem("Triton stencil", "triton", "milenas_fast.ops.stencil")


@functools.lru_cache(maxsize=None)
def _extension_problem(device_type: str) -> str:
    from . import extension

    if not extension.available():
        return f"C++ extension unavailable ({extension.why_not()})"
    key = "CUDA" if device_type == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("milenas_fast::edge_reduce", key):
        return f"C++ extension has no {key} kernels ({extension.describe()})"
    from .edge_reduce import register

    register()
    return ""


@functools.lru_cache(maxsize=None)
def _triton_edge_reduce_problem() -> str:
    return _import_problem("Triton twin", "milenas_fast.ops.edge_reduce_triton")


def edge_reduce_impl(device_type: str) -> tuple[str, str]:
    """("cpp" | "triton" | "", why) for edge_reduce on `device_type` ("" = neither can run). The C++ op is
    primary; the Triton twin stands in, with ONE warning per process, when the extension cannot serve.
    Cached: `milenas_fast.ops.edge_reduce` reads the choice on every call."""
    from .edge_reduce import IMPL

    if device_type not in IMPL:
        problem = _extension_problem(device_type)
        twin_problem = _triton_edge_reduce_problem() or (
            "the Triton twin runs on CPU only through the interpreter (TRITON_INTERPRET=1)"
            if device_type == "cpu" and not _interpreting() else "")
        if not problem:
            IMPL[device_type] = ("cpp", "C++/CUDA kernels" if device_type == "cuda" else "C++ CPU kernels")
        elif twin_problem:
            IMPL[device_type] = ("", f"{problem}; {twin_problem}")
        else:
            IMPL[device_type] = ("triton", f"Triton twin, because the {problem}")
            warnings.warn(twin_notice(device_type), RuntimeWarning, stacklevel=2)
    return IMPL[device_type]


def switch_to_twin(device_type: str, why: str) -> tuple[str, str] | None:
    """Make edge_reduce on `device_type` run the Triton twin (the C++ kernels failed at run time); returns
    the previous choice to restore, or None (and changes nothing) when the twin cannot run."""
    from .edge_reduce import IMPL

    if _triton_edge_reduce_problem() or IMPL.get(device_type, ("",))[0] != "cpp":
        return None
    previous = IMPL[device_type]
    IMPL[device_type] = ("triton", f"Triton twin, because the {why}")
    return previous


def twin_notice(device_type: str) -> str:
    """The warning text when edge_reduce on `device_type` runs its Triton twin, else ""."""
    from .edge_reduce import IMPL

    impl, why = IMPL.get(device_type, ("", ""))
    if impl != "triton":
        return ""
    hint = (" Install a CUDA toolkit (nvcc) matching torch's CUDA and run `milenas-fast info --rebuild` for the "
            "C++/CUDA kernels." if device_type == "cuda" else "")
    return f"milenas_fast: edge_reduce on {device_type}: {why}.{hint}"


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def blockers(device: torch.device | str, dtype: torch.dtype | None = None) -> list[str]:
    """What prevents the fused kernels from running on `device` (and `dtype`, if given); [] = nothing."""
    device = torch.device(device)
    out = []
    if device.type == "cuda":
        if not torch.cuda.is_available():
            out.append("no CUDA GPU visible to torch")
        elif _interpreting():
            out.append("TRITON_INTERPRET=1 is set, so Triton cannot launch on the GPU")
        elif _capability(device.index) < (7, 5):
            out.append(f"GPU compute capability {_capability(device.index)} < 7.5 (Triton's minimum)")
    elif device.type == "cpu":
        if not _interpreting():
            out.append("CPU tensors: the Triton kernels run on CPU only through the interpreter (TRITON_INTERPRET=1)")
    else:
        out.append(f"no fused kernels for device type {device.type!r}")
    if dtype is not None and dtype not in FUSED_DTYPES:
        out.append(f"dtype {dtype} (fused supports float32, bfloat16, float16)")
    if out:
        return out
    if _triton_problem():
        out.append(_triton_problem())
    impl, why = edge_reduce_impl(device.type)
    if not impl:
        out.append(why)
    return out


def decide(requested: str | None = None, device: torch.device | str = "cuda",
           dtype: torch.dtype | None = None) -> Decision:
    """Which implementation a MixedOp on `device` runs, with the reasons (for logs and `info`)."""
    req = requested_impl(requested)
    if req == "reference":
        return Decision(req, "reference", ("requested",))
    device = torch.device(device)
    if req == "auto" and device.type != "cuda":
        return Decision(req, "reference", (f"{device.type} tensors: fused runs on CUDA only (set {ENV}=fused "
                                           "with TRITON_INTERPRET=1 to check it on CPU)",))
    problems = blockers(device, dtype)
    if problems:
        return Decision(req, "reference", tuple(problems))
    where = "Triton interpreter" if device.type == "cpu" else "Triton"
    return Decision(req, "fused", (f"{where} stencil + edge_reduce: {edge_reduce_impl(device.type)[1]}",))


def require_fused(decision: Decision) -> None:
    if not decision.ok:
        raise FusedUnavailable(f"the fused MixedOp was requested ({ENV} or --impl fused) but cannot run: "
                               f"{'; '.join(decision.reasons)}. Use reference (or auto) instead.")
