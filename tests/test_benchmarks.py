"""Benchmarks and gpu_check.sh: without a GPU they say so and exit 0 (the search benchmark still exercises its
code on a tiny CPU configuration); a failing op or mode is recorded and the rest go on, every row reaching the
CSV as soon as it is measured; gpu_check.sh stays within its 8-minute budget by construction and its dry run
goes through every stage."""
import csv
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks run for real")


def load(script):
    spec = importlib.util.spec_from_file_location(script.replace(".py", ""), ROOT / "benchmarks" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@no_gpu
@pytest.mark.parametrize("script", ["bench_kernels.py", "bench_search.py"])
def test_benchmark_without_gpu_says_so_and_exits_0(script, tmp_path):
    csv_path = tmp_path / "rows.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--csv", str(csv_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no cuda gpu" in proc.stdout.lower() or "no gpu" in proc.stdout.lower(), proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # the kernel benchmark's CPU smoke
@pytest.mark.gpu_path
def test_bench_kernels_records_a_failing_op_and_goes_on(tmp_path, monkeypatch, capsys):
    bk = load("bench_kernels.py")
    csv_path = tmp_path / "k.csv"
    seen_before_failure = []

    def boom(*args):
        seen_before_failure.extend(read_csv(csv_path))  # the op before this one is already in the CSV
        raise RuntimeError("CUDA error: misaligned address\nsecond line")

    monkeypatch.setitem(bk.OPS, "boom", boom)
    assert bk.main(["--cpu-smoke", "--quick", "--ops", "edge_reduce,boom,edge_reduce", "--csv", str(csv_path)]) == 0
    rows = read_csv(csv_path)
    # edge_reduce: 3 phases x (eager, fused = C++ op, Triton twin)
    assert len(seen_before_failure) == 9 and {r["op"] for r in seen_before_failure} == {"edge_reduce"}
    errors = [r for r in rows if r["error"]]
    assert [(r["op"], r["error"]) for r in errors] == [("boom", "RuntimeError: CUDA error: misaligned address")]
    assert len(rows) == 19 and rows[-1]["op"] == "edge_reduce" and rows[-1]["median_ms"]  # it went on
    out = capsys.readouterr().out
    assert "boom" in out and "ERROR RuntimeError: CUDA error: misaligned address" in out


@pytest.mark.gpu_path
def test_bench_search_records_a_failing_mode_and_goes_on(tmp_path, monkeypatch, capsys):
    bs = load("bench_search.py")
    csv_path = tmp_path / "s.csv"
    calls = []

    def bench_mode(mode, args, device):
        calls.append(mode[0])
        if mode[0] == "eager-fp32":
            raise RuntimeError("CUDA out of memory\nsecond line")
        return {"status": "ok", "median_ms": 2.0, "p20_ms": 1.9, "p80_ms": 2.1, "peak_mib": 3.0, "valid_ms": 1.0,
                "proj_50ep_min": 0.5, "notes": "stub"}

    monkeypatch.setattr(bs, "bench_mode", bench_mode)
    monkeypatch.setattr(bs.torch.cuda, "is_available", lambda: False)
    assert bs.main(["--csv", str(csv_path)]) == 0
    (row,) = read_csv(csv_path)  # on a CPU only the reference runs
    assert calls == ["eager-fp32"] and row["status"] == "error: RuntimeError: CUDA out of memory"
    assert "error: RuntimeError: CUDA out of memory" in capsys.readouterr().out


def script_limits():
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    values = dict(re.findall(r"\b([A-Z_]+)=(\d+)\b", text))
    return {k: int(v) for k, v in values.items()}


def test_gpu_check_limits_add_up_to_less_than_8_minutes():
    v = script_limits()
    stages = [v[k] for k in v if k.startswith("L_")]
    assert len(stages) == v["STAGES"] == 6
    assert sum(stages) + v["STAGES"] * v["KILL_AFTER"] + v["SUMMARY_S"] <= v["BUDGET"] == 480


@no_gpu
@pytest.mark.gpu_path
@pytest.mark.slow
def test_gpu_check_dry_run_goes_through_every_stage(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.strip().endswith(summary.strip().splitlines()[-1])  # printed last
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    for line in ("nvcc:", '"C++ extension"', '"Triton kernels"', "pytest ", "install        skipped (dry run)",
                 "-- fallbacks and warnings"):
        assert line in summary, (line, summary)
    stages = re.findall(r"^(env|info|bench-search|bench-kernels|pytest) +ok ", summary, re.M)
    assert stages == ["env", "info", "bench-search", "bench-kernels", "pytest"], summary  # search first
    assert re.search(r"^eager-fp32 +[\d.]+ \(", summary, re.M), summary
    assert re.search(r"^mixed_op +4 +8 +1 fwd\+bwd fused", summary, re.M), summary
    assert re.search(r"tests collected", summary), summary
    assert [r["status"] for r in read_csv(out / "search.csv")] == ["ok"]
    assert not [r for r in read_csv(out / "kernels.csv") if r["error"]]


@pytest.mark.slow  # five methods, darts_2nd's five passes included: ~60 s on the loaded 2-core machine
def test_bench_methods_runs_every_method_tiny_on_the_cpu(tmp_path, capsys):
    bm = load("bench_methods.py")
    csv_path = tmp_path / "m.csv"
    assert bm.main(["--device", "cpu", "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out and "device: cpu" in out
    rows = {r["method"]: r for r in read_csv(csv_path)}
    assert list(rows) == ["milenas", "darts", "darts_2nd", "single_level", "gumbel_milenas"]
    has_sampler = not bm.available({"sampler": "gumbel"})
    for name, r in rows.items():
        if name == "gumbel_milenas" and not has_sampler:
            assert r["status"].startswith("not available"), r
            continue
        assert r["status"] == "ok" and float(r["median_ms"]) > 0, r
    assert float(rows["milenas"]["vs_milenas"]) == 1.0
    ratio = float(rows["darts_2nd"]["median_ms"]) / float(rows["milenas"]["median_ms"])
    assert f"MiLeNAS vs second-order DARTS on cpu: {ratio:.2f}x faster per iteration" in out


def test_bench_methods_says_which_settings_a_build_lacks():
    bm = load("bench_methods.py")
    assert bm.available({"optimization": "darts_2nd"}) == ""
    assert bm.available({"optimization": "milenas", "no_such_flag": 1}) == (
        "not available (SearchConfig has no no_such_flag)")
    assert bm.mode_for(("fast", "fused", True, True, True, False), {"sampler": "gumbel"})[1] == "auto"
