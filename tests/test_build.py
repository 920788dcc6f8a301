"""Build checks: every .cu file compiles for Hopper with nvcc (no GPU needed), and setup.py's
extension decision honours MILENAS_FAST_BUILD_EXT and an absent torch."""
import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from milenas_fast.ops import extension

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))


@pytest.fixture(scope="module")
def setup_module_():
    """setup.py imported as a module; its setup() call is behind `if __name__ == "__main__"`."""
    spec = importlib.util.spec_from_file_location("milenas_fast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_setup_honours_build_ext_off(setup_module_, value):
    kind, reason = setup_module_.extension_plan({"MILENAS_FAST_BUILD_EXT": value})
    assert kind is None and "MILENAS_FAST_BUILD_EXT=0" in reason


def test_setup_skips_extension_without_torch(setup_module_, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError, as in pip's isolation
    kind, reason = setup_module_.extension_plan({})
    assert kind is None and "torch not importable" in reason


def test_setup_builds_extension_by_default(setup_module_):
    kind, _ = setup_module_.extension_plan({"MILENAS_FAST_BUILD_EXT": "1"})
    expect = "cuda" if torch.version.cuda and extension.cuda_home() else "cpu"
    assert kind == expect


def test_arch_list_explicit_env_wins(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert extension.cuda_arch_list() == "8.6"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    if not torch.cuda.is_available():
        assert extension.cuda_arch_list() == extension.DEFAULT_ARCH_LIST


@pytest.mark.skipif(extension.cuda_home() is None, reason="no CUDA toolkit (nvcc) here")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_for_sm90(cu, tmp_path):
    from torch.utils import cpp_extension

    home = extension.cuda_home()
    cmd = [
        str(Path(home) / "bin" / "nvcc"), "-c", str(cu), "-o", str(tmp_path / "k.o"),
        "-std=c++20", "-O1", "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{sysconfig.get_paths()['include']}",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *[f"-I{p}" for p in cpp_extension.include_paths(device_type="cpu")],
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"


def test_there_is_cuda_code():
    assert CU_FILES, "csrc/ has no .cu files"
