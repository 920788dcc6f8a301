"""The search's execution plan (search/plan.py): decided once into a frozen value, logged as before, and
changed only by deriving a new plan."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from milenas_fast.config import SearchConfig
from milenas_fast.ops.backends import Kernels
from milenas_fast.search import plan
from milenas_fast.search.graphed import EagerGraphs
from milenas_fast.space.mixed_op import FusedMixedOp, ReferenceMixedOp
from milenas_fast.space.sampled_op import HardSampledMixedOp

CPU = torch.device("cpu")


def test_a_cpu_plan_says_what_runs_and_why():
    p = plan.resolve(SearchConfig(), CPU)
    assert (p.device, p.loader, p.mixed_op, p.kernels, p.graphs, p.compile) == \
        (CPU, "torch", ReferenceMixedOp, None, False, False)
    first, second = p.log_lines()
    assert first == (f"device = cpu; fp32; loader = torch ({p.loader_why}); MixedOp = ReferenceMixedOp "
                     f"({p.mixed_op_why})")
    assert second == f"CUDA graphs: {p.graphs_why}; shared train pass: False; torch.compile: False"
    assert "ignored on cpu" in p.graphs_why and p.to_dict()["MixedOp"].startswith("ReferenceMixedOp")


def test_flags_reach_the_plan():
    p = plan.resolve(SearchConfig(amp=True, shared_train_pass=True, compile=True, sampler="softmax"), CPU,
                     graphs=EagerGraphs())
    assert p.precision == "AMP: bf16 autocast on CPU" and p.shared_train_pass and p.compile
    assert p.graphs and p.graphs_why == "on (EagerGraphs)"
    assert plan.resolve(SearchConfig(sampler="gumbel"), CPU).mixed_op is HardSampledMixedOp


def test_a_plan_is_frozen_and_a_fallback_derives_a_new_one():
    p = dataclasses.replace(plan.resolve(SearchConfig(), CPU, graphs=EagerGraphs()), compile=True,
                            mixed_op=FusedMixedOp, mixed_op_why="fused", kernels=Kernels("cpu", "cpp", "C++"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.graphs = False
    q = p.without("CUDA graph", "Boom: replay failed")
    assert (q.graphs, q.graphs_why) == (False, "off: Boom: replay failed; eager loop") and p.graphs
    assert not p.without("torch.compile", "x").compile
    r = p.without("fused MixedOp", "Boom: kernel")
    assert (r.mixed_op, r.kernels, r.fused, p.fused) == (ReferenceMixedOp, None, False, True)
    assert r.mixed_op_why == "reference (Boom: kernel)"
    with pytest.raises(ValueError, match="no fast component"):
        p.without("DALI", "x")
