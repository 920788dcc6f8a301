"""Start-up self-test of the fused MixedOp on the device it is about to run on.

Kernels that compile are not kernels that are right on this GPU, driver and Triton version: before a run
commits to the fused MixedOp (search/plan.py), one small random MixedOp per stride runs forward and
backward fused and reference, and the output, input gradient, every weight gradient and the mixing-weight
gradient must agree. The result, with the kernels it passed with, is cached per (device, dtype) for the
life of the process; the global RNG is left untouched, so a run's initialisation does not depend on whether
the test ran.
"""
from __future__ import annotations

import warnings

import torch

from ..ops.backends import Kernels
from .mixed_op import FusedMixedOp, ReferenceMixedOp, set_impl

_results: dict[tuple[str, torch.dtype], tuple[Kernels | None, str]] = {}
_warned: set[tuple[str, torch.dtype]] = set()
# Largest error allowed, relative to the largest reference value of each tensor. The fused path sums in
# another order (and in fp32 where the reference may use TF32 convolutions); a wrong kernel is off by O(1).
# Low precision: the fused error may also be twice the reference's own distance from fp32.
TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SHAPE = dict(N=2, C=4, H=7)  # odd planes exercise every edge mask; C even for the stride-2 skip


def fused_mixed_op(device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple[Kernels | None, str]:
    """(the kernels with which the fused MixedOp matches the reference on `device` in `dtype`, "") or
    (None, why it does not)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key not in _results:
        _results[key] = _run_or_use_triton(device, dtype)
    return _results[key]


def _run_or_use_triton(device: torch.device, dtype: torch.dtype) -> tuple[Kernels | None, str]:
    """A failure with the C++ edge_reduce is retried with its Triton backend: if that passes, those are the
    kernels to run (one warning); if not, both reasons are reported."""
    kernels = Kernels.for_device(device.type)
    problem = _run(device, dtype, kernels)
    if not problem:
        return kernels, ""
    triton = kernels.with_triton(f"C++ edge_reduce failed the fused self-test ({problem})")
    if triton is None:
        return None, problem
    again = _run(device, dtype, triton)
    if again:
        return None, f"{problem}; with the Triton edge_reduce too: {again}"
    warnings.warn(triton.notice(), RuntimeWarning, stacklevel=3)
    return triton, ""


def results() -> dict[str, str]:
    """Every self-test run in this process: "device dtype" -> "passed" or "FAILED: why" (for `info`)."""
    return {f"{d} {str(t).removeprefix('torch.')}": (f"FAILED: {r}" if r else f"passed ({k.why})")
            for (d, t), (k, r) in _results.items()}


def warn_disabled(device: torch.device | str, dtype: torch.dtype, problem: str) -> None:
    """The one warning of an `auto` run that falls back to the reference after a failed self-test."""
    key = (str(torch.device(device)), dtype)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"milenas_fast: fused MixedOp disabled on {device}: its start-up self-test failed "
                      f"({problem}); using the reference MixedOp", RuntimeWarning, stacklevel=3)


def _run(device: torch.device, dtype: torch.dtype, kernels: Kernels) -> str:
    cuda = [device.index] if device.type == "cuda" else []
    stride = 1
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            for stride in (1, 2):
                problem = _compare(stride, device, dtype, kernels)
                if problem:
                    return f"stride {stride}: {problem}"
    except Exception as e:  # noqa: BLE001 - a kernel can fail in any way; the reason is what matters
        lines = str(e).strip().splitlines()
        return f"stride {stride}: {type(e).__name__}: {lines[0][:300] if lines else ''}"
    return ""


def _compare(stride: int, device: torch.device, dtype: torch.dtype, kernels: Kernels) -> str:
    n, c, h = SHAPE["N"], SHAPE["C"], SHAPE["H"]
    torch.manual_seed(stride)
    ref = ReferenceMixedOp(c, stride).to(device)
    g = torch.Generator().manual_seed(stride)
    x = torch.randn(n, c, h, h, generator=g).to(device)
    alpha = torch.softmax(torch.randn(len(ref.primitives), generator=g), 0).to(device)
    grad_out = torch.randn(n, c, (h - 1) // stride + 1, (h - 1) // stride + 1, generator=g).to(device)
    low = dtype != torch.float32
    runs = {"reference": (ReferenceMixedOp, dtype), "fused": (FusedMixedOp, dtype)}
    if low:  # the yardstick: how far the reference itself lands from fp32 in this dtype
        runs["fp32"] = (ReferenceMixedOp, torch.float32)
    got = {}
    for name, (cls, dt) in runs.items():
        mod = cls(c, stride).to(device)
        if cls is FusedMixedOp:
            set_impl(mod, "fused", kernels)
        mod.load_state_dict(ref.state_dict())
        xi, ai = x.clone().requires_grad_(), alpha.clone().requires_grad_()
        with torch.autocast(device.type, dtype=dt, enabled=dt != torch.float32):
            out = mod(xi, ai)
        out.backward(grad_out.to(out.dtype))
        got[name] = {"output": out.detach(), "input grad": xi.grad, "mixing-weight grad": ai.grad,
                     **{f"grad of {p}": t.grad for p, t in mod.named_parameters()}}
    tol = TOLERANCE[dtype]
    oracle = got["fp32" if low else "reference"]
    for what, want in oracle.items():
        have, plain = got["fused"][what], got["reference"][what]
        if (want is None) != (have is None):
            return f"{what}: {'missing' if have is None else 'unexpected'}"
        if want is None:
            continue
        if have.shape != want.shape:
            return f"{what}: shape {tuple(have.shape)} != {tuple(want.shape)}"
        err = (have.double() - want.double()).abs().max().item()
        scale = want.double().abs().max().item()
        slack = 2 * (plain.double() - want.double()).abs().max().item() if low else 0.0
        if not err <= slack + tol * scale + 1e-6:  # `not <=` also catches NaN
            ref_err = f", the reference's own {slack / 2:.3g}" if low else ""
            return (f"{what} differs from the fp32 reference by {err:.3g}{ref_err} (largest value {scale:.3g}, "
                    f"tolerance {tol:g})")
    return ""
