"""`milenas-fast info`: versions, the GPU, which fast paths are usable, and what `auto` picks and why."""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
import warnings


def _version(module: str) -> str:
    try:
        m = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install raises anything
        return f"not installed ({type(e).__name__})" if isinstance(e, ImportError) else f"broken ({type(e).__name__}: {e})"
    return str(getattr(m, "__version__", "installed"))


def versions() -> dict[str, str]:
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "milenas-fast": _version("milenas_fast"),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "CUDA (torch built for)": torch.version.cuda or "none (CPU build)",
        "cuDNN": str(cudnn) if cudnn else "unavailable",
        "Triton": _version("triton"),
        "DALI": _version("nvidia.dali"),
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "graphviz dot": shutil.which("dot") or "not found (cell plots use the matplotlib layout)",
    }


def gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                   f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    return out


def _triton_kernels() -> str:
    """Whether the Triton stencil kernels can run here (on a GPU, or through the interpreter on CPU)."""
    import torch

    try:
        importlib.import_module("triton")
    except ImportError:
        return "unusable: Triton is not installed (pip install milenas-fast[triton])"
    try:
        importlib.import_module("milenas_fast.ops.stencil")
    except Exception as e:  # noqa: BLE001
        return f"unusable: importing milenas_fast.ops.stencil failed ({type(e).__name__}: {e})"
    if torch.cuda.is_available():
        return "usable (CUDA)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter only (TRITON_INTERPRET=1, no GPU): correct but slow, for tests"
    return "not on this machine: no CUDA GPU (the kernels need one, or TRITON_INTERPRET=1 for the interpreter)"


def _extension() -> str:
    from .ops import extension

    try:
        return ("usable: " if extension.available() else "") + extension.describe()
    except Exception as e:  # noqa: BLE001
        return f"unusable: {type(e).__name__}: {e}"


def _impl_choices(device) -> dict[str, str]:
    from .search.plan import resolve_mixed_op

    out = {}
    for requested in ("auto", "fused", "reference"):
        try:
            cls, why, _ = resolve_mixed_op(requested, device)
            out[requested] = f"{getattr(cls, '__module__', '')}.{getattr(cls, '__name__', cls)} ({why})"
        except Exception as e:  # noqa: BLE001 - ConfigError for an impossible request, anything from a rewrite
            out[requested] = f"refused: {e}"
    return out


def _edge_reduce(device) -> str:
    """Which edge_reduce kernels the fused path uses on `device`: the C++ op, its Triton kernels, or none."""
    from .ops import select

    try:
        impl, why = select.edge_reduce_impl(device.type)
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {e}"
    return f"{impl or 'unusable'} ({why})"


def _selftest() -> str:
    from .space import selftest

    res = selftest.results()
    return "; ".join(f"{k}: {v}" for k, v in res.items()) or "not run (no fused choice above)"


def _loader_choice(device) -> str:
    from .data import resolve_loader

    try:
        name, why = resolve_loader("auto", device)
        return f"{name} ({why})"
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {e}"


def _plan(device) -> dict | str:
    """The execution plan `milenas-fast search` would resolve here with its default flags (search/plan.py)."""
    from .config import SearchConfig
    from .search import plan

    try:
        return plan.resolve(SearchConfig(), device).to_dict()
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {e}"


def collect() -> dict:
    """Everything `info` prints, as plain data. Warnings raised while deciding (no nvcc, a failed self-test,
    a stale build lock, ...) are collected under "warnings" instead of going to stderr unformatted."""
    from .runtime import resolve_device

    device = resolve_device("auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = {
            "versions": versions(),
            "gpus": gpus(),
            "device (auto)": str(device),
            "C++ extension": _extension(),
            "Triton kernels": _triton_kernels(),
            f"edge_reduce ({device.type})": _edge_reduce(device),
            "MixedOp --impl": _impl_choices(device),
            "fused self-test": _selftest(),
            "loader --loader auto": _loader_choice(device),
            "search plan (default flags)": _plan(device),
        }
    from .ops.backends import Kernels

    seen = []
    for text in [str(w.message) for w in caught] + [Kernels.for_device(device.type).notice()]:  # even if said before
        if text and text not in seen:
            seen.append(text)
    info["warnings"] = seen
    return info


def format_report(info: dict) -> str:
    lines = ["versions:"]
    width = max(map(len, info["versions"]))
    lines += [f"  {k:<{width}}  {v}" for k, v in info["versions"].items()]
    lines.append("GPU: " + ("none visible to torch" if not info["gpus"] else ""))
    lines += [f"  {g}" for g in info["gpus"]]
    lines.append(f"device (auto): {info['device (auto)']}")
    lines.append(f"C++ extension: {info['C++ extension']}")
    lines.append(f"Triton kernels: {info['Triton kernels']}")
    lines += [f"{k}: {v}" for k, v in info.items() if k.startswith("edge_reduce (")]
    lines.append("MixedOp implementation (--impl):")
    lines += [f"  {k:<9} → {v}" for k, v in info["MixedOp --impl"].items()]
    lines.append(f"fused self-test: {info['fused self-test']}")
    lines.append(f"loader (--loader auto): {info['loader --loader auto']}")
    plan = info["search plan (default flags)"]
    heading = "search plan (`milenas-fast search` with default flags):"
    lines.append(heading + ("" if isinstance(plan, dict) else f" {plan}"))
    if isinstance(plan, dict):
        lines += [f"  {k:<17} {v}" for k, v in plan.items() if k != "warnings"]
    lines += [f"WARNING: {w}" for w in info["warnings"]]
    return "\n".join(lines)
