"""Build checks: every .cu file compiles for Hopper with nvcc (no GPU needed), and setup.py's
extension decision honours MILENAS_FAST_BUILD_EXT and an absent torch; the build guards (failure record,
stale lock, prebuilt _C vs csrc/) with injected conditions and no compiler runs."""
import importlib
import importlib.util
import os
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


@pytest.mark.stack  # compiled against this stack's torch/Triton
@pytest.mark.slow  # nvcc for sm_90
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


# ---- guards around the extension build: failure record, stale lock, prebuilt _C vs csrc/ ----


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """_jit_build in a scratch TORCH_EXTENSIONS_DIR with cpp_extension.load replaced (no compiler runs)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv(extension.REBUILD_ENV, raising=False)
    calls = []

    def load(**kw):
        calls.append(kw["name"])
        if fake_build.error:
            raise RuntimeError(fake_build.error)

    fake_build.error, fake_build.calls = "ninja: build stopped: subcommand failed", calls
    monkeypatch.setattr(cpp_extension, "load", load)
    return fake_build


def _failure_records(root: Path):
    return list(root.rglob(extension.FAILED_RECORD))


def test_failed_jit_build_is_not_retried(fake_build, tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="subcommand failed"):
        extension._jit_build()
    (record,) = _failure_records(tmp_path)
    assert "subcommand failed" in record.read_text()
    with pytest.raises(RuntimeError, match=r"failed before .*not retried.*subcommand failed.*info --rebuild"):
        extension._jit_build()
    assert len(fake_build.calls) == 1  # the compiler was not run again
    monkeypatch.setattr(extension, "source_hash", lambda *a: "edited csrc")  # a new key: retried
    fake_build.error = ""
    assert extension._jit_build().startswith("JIT-built")
    assert len(fake_build.calls) == 2 and not _failure_records(tmp_path)  # success clears the record


def test_injected_failure_record_and_forced_retry(fake_build, tmp_path, monkeypatch):
    import json

    with pytest.raises(RuntimeError):
        extension._jit_build()
    (record,) = _failure_records(tmp_path)
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({**rec, "error": "injected: cc1plus killed"}))
    with pytest.raises(RuntimeError, match="injected: cc1plus killed"):
        extension._jit_build()
    record.write_text(json.dumps({**rec, "key": "another torch"}))  # a record for other conditions: ignored
    with pytest.raises(RuntimeError, match="subcommand failed"):
        extension._jit_build()
    assert len(fake_build.calls) == 2
    monkeypatch.setenv(extension.REBUILD_ENV, "1")
    fake_build.error = ""
    extension._jit_build()
    assert len(fake_build.calls) == 3 and not _failure_records(tmp_path)


def test_stale_baton_lock_is_removed_with_one_warning(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()  # a FileBaton left by a killed build: nobody holds it
    with pytest.warns(RuntimeWarning, match="stale C\\+\\+ extension build lock") as rec:
        extension.clear_stale_lock(lock, timeout_s=60, baton=True)
    assert not lock.exists() and len(rec) == 1


def test_unheld_os_lock_file_is_left_alone(tmp_path, recwarn):
    lock = tmp_path / "lock"
    lock.touch()  # newer torch: an OS lock on the file, released by the kernel; the file may stay
    extension.clear_stale_lock(lock, timeout_s=60, baton=False)
    assert lock.exists() and not [w for w in recwarn if "lock" in str(w.message)]


class FakeClock:
    """extension's `time`, advanced only by its sleep(): waits are counted, never taken, so no bound here
    depends on the machine's speed or load."""
    EPOCH = 1_700_000_000.0

    def __init__(self):
        self.elapsed, self.sleeps = 0.0, []

    def monotonic(self):
        return 100.0 + self.elapsed

    def time(self):
        return self.EPOCH + self.elapsed

    def sleep(self, s):
        assert len(self.sleeps) < 10_000, "still waiting after 10000 polls: it never gives up"
        self.sleeps.append(s)
        self.elapsed += s


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(extension, "time", c)
    return c


@pytest.mark.parametrize("baton", [True, False])
def test_held_lock_times_out_instead_of_hanging(tmp_path, baton, clock):
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # a live holder: this process
    try:
        if extension._lock_holders(lock) is None:
            pytest.skip("/proc cannot show open files here")
        with pytest.raises(RuntimeError, match=rf"held by pid {os.getpid()}.*10.0 min.*giving up"):
            extension.clear_stale_lock(lock, timeout_s=600, baton=baton, poll_s=7)
        # Polled every poll_s until the limit was reached, then gave up at once; the lock is left alone.
        assert clock.sleeps == [7] * 86 and 600 <= clock.elapsed < 607 and lock.exists()
    finally:
        os.close(fd)
    clock.sleeps.clear()
    extension.clear_stale_lock(lock, timeout_s=600, baton=False)  # released: returns at once
    assert clock.sleeps == []


def test_old_lock_is_stale_when_holders_cannot_be_seen(tmp_path, monkeypatch, clock):
    monkeypatch.setattr(extension, "_lock_holders", lambda path: None)  # no /proc
    lock = tmp_path / "lock"
    lock.touch()
    os.utime(lock, (clock.time(), clock.time()))  # just created
    with pytest.warns(RuntimeWarning, match="min old"):  # young: waited for until it is `timeout_s` old
        extension.clear_stale_lock(lock, timeout_s=600, baton=True, poll_s=7)
    assert clock.sleeps == [7] * 86 and 600 < clock.elapsed <= 607 and not lock.exists()
    clock.sleeps.clear()
    lock.touch()
    os.utime(lock, (clock.time() - 3600, clock.time() - 3600))
    with pytest.warns(RuntimeWarning, match="min old"):  # an hour old: removed at once
        extension.clear_stale_lock(lock, timeout_s=600, baton=True)
    assert clock.sleeps == [] and not lock.exists()


def test_setup_records_sources_and_loader_compares(setup_module_, tmp_path):
    so = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    assert extension.prebuilt_problem(None) is None
    assert "no readable" in extension.prebuilt_problem(str(so))
    record = setup_module_.write_build_record(so, "cpu")
    assert record.name == extension.BUILD_RECORD
    assert extension.prebuilt_problem(str(so)) == ""
    record.write_text(record.read_text().replace(extension.source_hash()[:16], "0" * 16))
    assert "built from other csrc/ sources" in extension.prebuilt_problem(str(so))


def test_stale_prebuilt_is_not_imported(tmp_path, monkeypatch):
    """A prebuilt _C with a mismatched source hash: one warning, then the JIT build (never the import)."""
    import importlib.machinery
    import importlib.util as iu
    import json

    so = tmp_path / "_C.so"
    (tmp_path / extension.BUILD_RECORD).write_text(json.dumps({"source_hash": "an older csrc/"}))
    real_find, real_import = iu.find_spec, importlib.import_module
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None, origin=str(so))
                        if name == "milenas_fast._C" else real_find(name, *a))

    def guarded_import(name, *a):
        assert name != "milenas_fast._C", "a stale prebuilt _C was imported"
        return real_import(name, *a)

    monkeypatch.setattr(importlib, "import_module", guarded_import)
    monkeypatch.setattr(extension, "_jit_build", lambda: "JIT-built (fake)")
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    monkeypatch.setattr(extension, "_state", {"tried": False, "ops": None, "how": "", "why": ""})
    with pytest.warns(RuntimeWarning, match="built from other csrc/ sources.*JIT-building") as rec:
        assert extension.load() is not None
    assert len([w for w in rec if "csrc" in str(w.message)]) == 1
    assert extension.describe().startswith("JIT-built (fake)")
