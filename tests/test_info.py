"""`milenas-fast info` runs anywhere and states its decisions."""
import json

from milenas_fast.cli import main


def test_info_prints_versions_and_decisions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("python", "torch", "Triton", "CUDA", "cuDNN", "DALI", "GPU:", "C++ extension:",
                   "Triton kernels:", "MixedOp implementation", "auto ", "loader (--loader auto):"):
        assert needle in out, needle
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["MixedOp --impl"]) == {"auto", "fused", "reference"}
    assert "(" in info["MixedOp --impl"]["auto"]  # the class and why it was picked
    assert info["loader --loader auto"].split()[0] in ("torch", "gpu", "dali")
