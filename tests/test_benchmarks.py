"""Benchmarks on a machine without a GPU: they say so and exit 0 (the search benchmark still exercises
its code on a tiny CPU configuration)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks run for real")


@pytest.mark.parametrize("script", ["bench_kernels.py", "bench_search.py"])
def test_benchmark_without_gpu_says_so_and_exits_0(script, tmp_path):
    csv = tmp_path / "rows.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--csv", str(csv)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no cuda gpu" in proc.stdout.lower() or "no gpu" in proc.stdout.lower(), proc.stdout
    assert "Traceback" not in proc.stderr
