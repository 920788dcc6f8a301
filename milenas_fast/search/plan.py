"""A search's execution plan: every run-time choice made once, in one place, into one frozen value.

    device → precision → loader → MixedOp implementation (+ its edge_reduce kernels) → CUDA graphs →
    torch.compile → the training pass (shared or not)

`resolve(cfg, device)` decides each with the reason; the run logs the plan, `milenas-fast info` shows it,
and the search builds what it describes. When a fast component fails at run time, the guard does not flip
a switch somewhere: it derives a new plan (`Plan.without`) and the search rebuilds to match it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import distributed
from ..config import SearchConfig
from ..data import resolve_loader
from ..errors import ConfigError
from ..ops import select
from ..ops.backends import Kernels
from ..precision import Precision
from ..space import selftest
from ..space.mixed_op import FusedMixedOp, ReferenceMixedOp
from ..space.sampled_op import HardSampledMixedOp
from . import graphed


@dataclass(frozen=True)
class Plan:
    device: torch.device
    precision: str             # Precision.note: fp32, or which autocast
    loader: str                # data.select.LoaderName (carries whether a DALI failure may fall back)
    loader_why: str
    mixed_op: type             # the MixedOp class the supernet is built with
    mixed_op_why: str
    kernels: Kernels | None    # the fused MixedOp's kernels (edge_reduce: C++ or Triton); None unfused
    graphs: bool               # the CUDA-graph iteration
    graphs_why: str
    compile: bool
    shared_train_pass: bool
    warnings: tuple[str, ...] = ()  # logged once the run folder's log exists

    @property
    def fused(self) -> bool:
        return self.mixed_op is FusedMixedOp

    def without(self, component: str, why: str) -> Plan:
        """This plan with a failed fast component ("CUDA graph" | "torch.compile" | "fused MixedOp") off."""
        if component == "CUDA graph":
            return replace(self, graphs=False, graphs_why=f"off: {why}; eager loop")
        if component == "torch.compile":
            return replace(self, compile=False)
        if component == "fused MixedOp":
            return replace(self, mixed_op=ReferenceMixedOp, mixed_op_why=f"reference ({why})", kernels=None)
        raise ValueError(f"no fast component {component!r}")

    def log_lines(self) -> list[str]:
        return [f"device = {self.device}; {self.precision}; loader = {self.loader} ({self.loader_why}); "
                f"MixedOp = {self.mixed_op.__name__} ({self.mixed_op_why})",
                f"CUDA graphs: {self.graphs_why}; shared train pass: {self.shared_train_pass}; "
                f"torch.compile: {self.compile}"]

    def to_dict(self) -> dict:
        """Plain data, for `milenas-fast info --json`."""
        return {"device": str(self.device), "precision": self.precision,
                "loader": f"{self.loader} ({self.loader_why})",
                "MixedOp": f"{self.mixed_op.__name__} ({self.mixed_op_why})",
                "edge_reduce": f"{self.kernels.edge_reduce} ({self.kernels.why})" if self.kernels else "unused",
                "CUDA graphs": self.graphs_why,
                "torch.compile": self.compile, "shared train pass": self.shared_train_pass,
                "warnings": list(self.warnings)}


def resolve(cfg: SearchConfig, device: torch.device, graphs=None) -> Plan:
    """The plan of a search with `cfg` on `device`. `graphs`: a capture mechanism to use instead of deciding
    (graphed.EagerGraphs() runs the graph path on a CPU, for tests)."""
    warnings: list[str] = []
    loader, loader_why = resolve_loader(cfg.loader, device)
    on, graphs_why = graphed.decide(cfg.cuda_graphs, cfg.compile, cfg.amp, device)
    on, graphs_why, warning = distributed.graphs_policy(on, graphs_why)
    warnings += [warning] if warning else []
    if on and cfg.sampler == "gumbel":
        on, graphs_why = False, "off: --sampler gumbel chooses on the host which candidates run"
    if graphs is not None:
        on, graphs_why = True, f"on ({type(graphs).__name__})"
    elif on and (why := graphed.self_test(device)):
        on, graphs_why = False, f"off: the capture self-test failed ({why}); eager loop"
        warnings.append(f"CUDA graph capture self-test failed ({why}); using the eager loop")
    if cfg.sampler == "gumbel":
        mixed_op, mixed_op_why, kernels = HardSampledMixedOp, "the sampled candidate only (--sampler gumbel)", None
    else:
        mixed_op, mixed_op_why, kernels = resolve_mixed_op(cfg.impl, device)
    return Plan(device, Precision(device, cfg.amp).note, loader, loader_why, mixed_op, mixed_op_why, kernels,
                on, graphs_why, cfg.compile, cfg.shared_train_pass, tuple(warnings))


def resolve_mixed_op(requested: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """(MixedOp class, why, Kernels or None) for `--impl` auto|fused|reference on `device` (ops/select.py
    decides). A fused choice must first pass the start-up self-test on `device` (space/selftest.py), which
    also says with which kernels: if it fails, `auto` warns once and takes the reference; an explicit `fused`
    that cannot run or fails raises ConfigError with the reasons."""
    try:
        decision = select.decide(requested, device)
    except ValueError as e:
        raise ConfigError(f"--impl: {e}") from None
    if not decision.ok:
        raise ConfigError(f"--impl fused cannot run on {device}: {'; '.join(decision.reasons)}; "
                          "use --impl reference or auto")
    if decision.impl != "fused":
        return ReferenceMixedOp, decision.why(), None
    kernels, problem = selftest.fused_mixed_op(device, dtype)
    if not problem:
        return FusedMixedOp, f"{decision.why()}; self-test passed on {device} ({kernels.why})", kernels
    if decision.requested == "fused":
        raise ConfigError(f"--impl fused: the fused MixedOp failed its self-test on {device} ({problem}); "
                          "use --impl reference or auto")
    selftest.warn_disabled(device, dtype, problem)
    return ReferenceMixedOp, (f"{decision.requested}: reference (the fused MixedOp failed its self-test on "
                              f"{device}: {problem})"), None
