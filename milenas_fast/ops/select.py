"""The one place that decides which MixedOp implementation runs, and says why.

    MILENAS_FAST_IMPL = auto | fused | reference      (default auto; the search CLI's --impl overrides it)

- reference: the plain-PyTorch module forwards, everywhere.
- fused:     the Triton multi-stencil + edge_reduce path. On CUDA it needs Triton; edge_reduce runs the
             extension's CUDA kernels, or — when the extension has none (no nvcc: torch wheels ship none) or
             cannot load — its Triton kernels, with ONE warning saying why. On CPU it runs only when
             TRITON_INTERPRET=1 (the Triton interpreter, how CI checks it), with the extension's CPU kernels
             (or the Triton edge_reduce). An explicit request that cannot be honoured raises `FusedUnavailable` — never a
             silent fallback.
- auto:      fused for CUDA tensors when everything it needs is present, reference otherwise (CPU included:
             the interpreter is for checking, not for speed).

`decide(requested, device, dtype)` returns a `Decision` (implementation + reasons) and never raises for an
unavailable fused path; `blockers(device, dtype)` lists what stands in its way (empty = it can run);
`Kernels.for_device(device_type)` (ops/backends.py) says which edge_reduce kernels the fused path uses there, and
why.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from .backends import Kernels, interpreting, triton_problem

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


def edge_reduce_impl(device_type: str) -> tuple[str, str]:
    """("cpp" | "triton" | "", why) for edge_reduce on `device_type`: `Kernels.for_device`'s, as a pair."""
    k = Kernels.for_device(device_type)
    return k.edge_reduce, k.why


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def blockers(device: torch.device | str, dtype: torch.dtype | None = None) -> list[str]:
    """What prevents the fused kernels from running on `device` (and `dtype`, if given); [] = nothing."""
    device = torch.device(device)
    out = []
    if device.type == "cuda":
        if not torch.cuda.is_available():
            out.append("no CUDA GPU visible to torch")
        elif interpreting():
            out.append("TRITON_INTERPRET=1 is set, so Triton cannot launch on the GPU")
        elif _capability(device.index) < (7, 5):
            out.append(f"GPU compute capability {_capability(device.index)} < 7.5 (Triton's minimum)")
    elif device.type == "cpu":
        if not interpreting():
            out.append("CPU tensors: the Triton kernels run on CPU only through the interpreter (TRITON_INTERPRET=1)")
    else:
        out.append(f"no fused kernels for device type {device.type!r}")
    if dtype is not None and dtype not in FUSED_DTYPES:
        out.append(f"dtype {dtype} (fused supports float32, bfloat16, float16)")
    if out:
        return out
    if triton_problem():
        out.append(triton_problem())
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
