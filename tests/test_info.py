"""`milenas-fast info` runs anywhere and states its decisions (edge_reduce kernels, self-test, warnings)."""
import importlib
import json
import os

import pytest

from milenas_fast.cli import main


def test_info_prints_versions_and_decisions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("python", "torch", "Triton", "CUDA", "cuDNN", "DALI", "GPU:", "C++ extension:",
                   "Triton kernels:", "MixedOp implementation", "auto ", "loader (--loader auto):",
                   "search plan (`milenas-fast search` with default flags):", "CUDA graphs", "shared train pass"):
        assert needle in out, needle
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["MixedOp --impl"]) == {"auto", "fused", "reference"}
    assert "(" in info["MixedOp --impl"]["auto"]  # the class and why it was picked
    assert info["loader --loader auto"].split()[0] in ("torch", "gpu", "dali")
    assert "fused self-test" in info and isinstance(info["warnings"], list)
    assert any(k.startswith("edge_reduce (") for k in info)
    plan = info["search plan (default flags)"]  # what a search resolves (search/plan.py)
    assert plan["device"] == info["device (auto)"] and plan["MixedOp"].split()[0] in ("ReferenceMixedOp",
                                                                                      "FusedMixedOp")


@pytest.mark.gpu_path
def test_info_shows_triton_warning_and_failed_selftest(capsys, monkeypatch):
    """A machine where edge_reduce runs its Triton kernels and the fused kernels fail their self-test."""
    from milenas_fast.space import selftest
    from milenas_fast.ops import select
    from milenas_fast.runtime import resolve_device

    from milenas_fast.ops import backends
    fmo = importlib.import_module("milenas_fast.space.fused_mixed_op")
    dev = resolve_device("auto")
    monkeypatch.setattr(selftest, "_results", {})
    monkeypatch.setattr(selftest, "_warned", set())
    why = "Triton kernels, because the C++ extension has no kernels (injected)"
    monkeypatch.setitem(backends._RESOLVED, dev.type, backends.Kernels(dev.type, "triton", why))
    def broken(*a, **k):
        raise RuntimeError("injected launch failure")

    monkeypatch.setattr(fmo, "stencil_group", broken)
    monkeypatch.delenv(select.ENV, raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"edge_reduce ({dev.type}): triton ({why})" in out
    assert f"WARNING: milenas_fast: edge_reduce on {dev.type}: Triton kernels, because" in out
    assert "fused self-test: " in out and "FAILED: stride 1: RuntimeError: injected launch failure" in out
    assert "refused: --impl fused: the fused MixedOp failed its self-test" in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [w for w in info["warnings"] if f"edge_reduce on {dev.type}: Triton kernels, because" in w]
    assert "float32: FAILED" in info["fused self-test"]


def test_info_rebuild_asks_for_a_retry(capsys, monkeypatch):
    from milenas_fast import info as info_mod
    from milenas_fast.ops import extension

    seen = []
    monkeypatch.delenv(extension.REBUILD_ENV, raising=False)
    monkeypatch.setattr(info_mod, "collect", lambda: seen.append(os.environ.get(extension.REBUILD_ENV)) or {})
    monkeypatch.setattr(info_mod, "format_report", lambda info: "")
    assert main(["info", "--rebuild"]) == 0 and main(["info"]) == 0
    assert seen == ["1", None] and extension.REBUILD_ENV not in os.environ
