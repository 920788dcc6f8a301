"""Build script: the pure-Python package always; the C++/CUDA extension `milenas_fast._C` when it can be built.

The extension is skipped when MILENAS_FAST_BUILD_EXT=0 or when torch is not importable at build time
(pip's isolated build: a plain `pip install -e .`); it is then compiled just in time on first use
(milenas_fast/ops/extension.py). Use `pip install -e . --no-build-isolation` to build it here. A failed
extension build never fails the install. A built `_C` gets a record of the csrc/ sources it was built from
(extension.BUILD_RECORD beside it), so that a later edit of csrc/ is JIT-built instead of silently shadowed.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
EXT_NAME = "milenas_fast._C"


def _toolkit_helpers():
    """milenas_fast/ops/extension.py loaded by path (torch-free at import): one CUDA_HOME/arch logic."""
    spec = importlib.util.spec_from_file_location("_milenas_fast_ext_helpers", ROOT / "milenas_fast/ops/extension.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def extension_plan(env=None):
    """("cuda" | "cpu" | None, reason). Decides only; builds nothing."""
    env = os.environ if env is None else env
    if env.get("MILENAS_FAST_BUILD_EXT", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "MILENAS_FAST_BUILD_EXT=0: extension skipped (built just in time on first use)"
    try:
        import torch
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError as e:
        return None, f"torch not importable at build time ({e}): extension will be built just in time on first use"
    home = _toolkit_helpers().cuda_home()
    if torch.version.cuda and home:
        return "cuda", f"CUDA torch {torch.__version__} and toolkit at {home}"
    why = "torch has no CUDA" if not torch.version.cuda else "no CUDA toolkit found"
    return "cpu", f"{why}: CPU-only extension"


def write_build_record(ext_path, kind):
    """Record beside the built extension the hash of the csrc/ it was built from (checked at load)."""
    helpers = _toolkit_helpers()
    record = Path(ext_path).with_name(helpers.BUILD_RECORD)
    record.write_text(json.dumps({"source_hash": helpers.source_hash(ROOT / "csrc"), "kind": kind}))
    return record


def extension_setup_kwargs(kind):
    """ext_modules/cmdclass for setup(); build failures become warnings."""
    from torch.utils import cpp_extension

    helpers = _toolkit_helpers()
    srcs = [os.path.relpath(s, ROOT) for s in helpers.sources(with_cuda=kind == "cuda")]
    flags = {"cxx": ["-O3", "-DMILENAS_FAST_PYTHON_MODULE"], "nvcc": ["-O3", "-DMILENAS_FAST_PYTHON_MODULE"]}
    if kind == "cuda":
        os.environ["CUDA_HOME"] = helpers.cuda_home()
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # torch's import-time guess may be wrong
        os.environ["TORCH_CUDA_ARCH_LIST"] = helpers.cuda_arch_list()
        ext = cpp_extension.CUDAExtension(EXT_NAME, srcs, extra_compile_args=flags)
    else:
        ext = cpp_extension.CppExtension(EXT_NAME, srcs, extra_compile_args={"cxx": flags["cxx"]})

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
                for e in self.extensions:
                    write_build_record(self.get_ext_fullpath(e.name), kind)
            except Exception as e:  # noqa: BLE001 - compiler failures come in many types
                print(f"milenas_fast: WARNING: extension build failed ({e}); it will be built just in time "
                      "on first use", file=sys.stderr)

    print(f"milenas_fast: building {EXT_NAME} ({kind}); sources: {', '.join(srcs)}; "
          f"CUDA_HOME={os.environ.get('CUDA_HOME', '-')}; TORCH_CUDA_ARCH_LIST="
          f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '-') if kind == 'cuda' else '-'}; "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}


def main():
    kind, reason = extension_plan()
    print(f"milenas_fast: extension: {kind or 'skipped'} ({reason})")
    kwargs = {}
    if kind:
        try:
            kwargs = extension_setup_kwargs(kind)
        except Exception as e:  # noqa: BLE001
            print(f"milenas_fast: WARNING: extension not configured ({e}); continuing without it", file=sys.stderr)
    packages = find_packages(include=["milenas_fast", "milenas_fast.*"]) + ["milenas_fast.kernels"]
    setup(packages=packages, package_dir={"milenas_fast.kernels": "kernels"}, **kwargs)


if __name__ == "__main__":
    main()
