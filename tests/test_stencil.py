"""The multi-stencil Triton op against its plain-PyTorch twin (forward, d/dx and the four filters).

Without a GPU the kernels run in Triton's interpreter, which must be switched on before triton or the
kernel module is imported (hence the environment line above the imports).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
from milenas_fast.ops.stencil import stencil, stencil_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("dw3", "dw5", "dil3", "dil5", "max", "avg")
GRADS = ("x", "w3", "w5", "wd3", "wd5")


def make(N, C, H, dtype, gen, ties=False):
    if ties:  # few distinct values: max-pool windows with several maxima (tests PyTorch's tie rule)
        x = torch.randint(-2, 3, (N, C, H, H), generator=gen).to(dtype)
    else:
        x = torch.randn(N, C, H, H, generator=gen).to(dtype)
    ws = [(torch.randn(C, 1, k, k, generator=gen) / k).to(dtype) for k in (3, 5, 3, 5)]
    return x.to(DEV), [w.to(DEV) for w in ws]


def run(fn, x, ws, stride, grad_outs, need=(True,) * 5):
    """Outputs of fn and the gradients of Σ⟨grad_out, y⟩ (grad_out None: that output is unused)."""
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip([x, *ws], need)]
    ys = fn(*leaves, stride)
    used = [(y, g) for y, g in zip(ys, grad_outs) if g is not None and y.requires_grad]
    wrt = [t for t in leaves if t.requires_grad]
    gs = torch.autograd.grad([y for y, _ in used], wrt, [g for _, g in used], allow_unused=True)
    it = iter(g if g is not None else torch.zeros_like(t) for g, t in zip(gs, wrt))  # unused: zero
    return [y.detach() for y in ys], [next(it) if n else None for n in need]


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("H", [7, 9, 16])
def test_fp32_matches_reference(H, stride):
    gen = torch.Generator().manual_seed(H * 10 + stride)
    x, ws = make(3, 5, H, torch.float32, gen)
    HO = (H - 1) // stride + 1
    g = [torch.randn(3, 5, HO, HO, generator=gen).to(DEV) for _ in NAMES]
    ys, gs = run(stencil, x, ws, stride, g)
    yr, gr = run(stencil_reference, x, ws, stride, g)
    for name, a, b in zip(NAMES, ys, yr):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for name, a, b in zip(GRADS, gs, gr):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=f"grad {name}")


@pytest.mark.parametrize("stride", [1, 2])
def test_maxpool_ties_and_absent_grads(stride):
    """Integer-valued input: many tied maxima, and ReLU inputs exactly 0. Only some outputs used."""
    gen = torch.Generator().manual_seed(7 + stride)
    x, ws = make(3, 5, 9, torch.float32, gen, ties=True)
    HO = (9 - 1) // stride + 1
    g = [torch.randn(3, 5, HO, HO, generator=gen).to(DEV) for _ in NAMES]
    for keep in ((4,), (0, 3, 5)):
        gk = [gi if i in keep else None for i, gi in enumerate(g)]
        _, gs = run(stencil, x, ws, stride, gk)
        _, gr = run(stencil_reference, x, ws, stride, gk)
        for name, a, b in zip(GRADS, gs, gr):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=f"grad {name}, outputs {keep}")


def test_partial_requires_grad():
    """α-only style (x only) and frozen input (filters only): each backward half alone is right."""
    gen = torch.Generator().manual_seed(3)
    x, ws = make(3, 5, 7, torch.float32, gen)
    g = [torch.randn(3, 5, 4, 4, generator=gen).to(DEV) for _ in NAMES]
    for need in ((True, False, False, False, False), (False, True, True, False, True)):
        _, gs = run(stencil, x, ws, 2, g, need)
        _, gr = run(stencil_reference, x, ws, 2, g, need)
        for name, a, b in zip(GRADS, gs, gr):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=f"grad {name}")


def check_low_precision(N, C, H, stride, dtype, seed):
    """STYLE.md's rule: error vs an fp64 reference ≤ 2× plain PyTorch's in the same dtype + a small term."""
    gen = torch.Generator().manual_seed(seed)
    x, ws = make(N, C, H, dtype, gen)
    HO = (H - 1) // stride + 1
    g = [torch.randn(N, C, HO, HO, generator=gen).to(dtype).to(DEV) for _ in NAMES]
    ys, gs = run(stencil, x, ws, stride, g)
    yl, gl = run(stencil_reference, x, ws, stride, g)  # PyTorch in the low precision
    y64, g64 = run(stencil_reference, x.double(), [w.double() for w in ws], stride, [t.double() for t in g])
    eps = torch.finfo(dtype).eps
    for name, a, lo, ref in zip(NAMES + GRADS, ys + gs, yl + gl, y64 + g64):
        assert a.dtype == dtype, name
        bound = 2 * err(lo, ref) + eps * ref.abs().max().item()
        assert err(a, ref) <= bound, f"{name}: {err(a, ref):.3g} > {bound:.3g} (torch {err(lo, ref):.3g})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stride", [1, 2])
def test_low_precision(dtype, stride):
    check_low_precision(3, 5, 9, stride, dtype, seed=stride)


# --- every kernel lowers for Hopper (no GPU needed) ------------------------------------------------

KERNELS = ("stencil_fwd_kernel", "stencil_bwd_input_kernel", "stencil_bwd_weight_kernel")
_COMPILE = r"""
import importlib.util, json, os, sys
os.environ["TRITON_INTERPRET"] = "0"  # the interpreter's patched triton.language cannot compile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("_stencil", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
dt, res = sys.argv[2], {}
for name in sys.argv[3:]:
    fn = getattr(mod, name)
    sig = {p.name: "constexpr" if p.is_constexpr else
           ("*fp32" if p.name == "part_ptr" else "*" + dt) if p.name.endswith("_ptr") else "i32"
           for p in fn.params}
    consts = {p.name: True for p in fn.params if p.name.startswith("HAS")}
    consts.update(STRIDE=2, BLOCK_P=2, BLOCK_HW=64)
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        res[name] = "ok" if k.asm.get("cubin") else "no cubin"
    except Exception as e:
        res[name] = repr(e)[-2000:]
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def sm90_builds():
    """Compile every kernel for sm_90 in fp32 and bf16: two fresh processes (one per core)."""
    src = Path(__file__).resolve().parents[1] / "kernels" / "stencil.py"
    procs = {dt: subprocess.Popen([sys.executable, "-c", _COMPILE, str(src), dt, *KERNELS],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for dt in ("fp32", "bf16")}
    out = {}
    for dt, p in procs.items():
        so, se = p.communicate(timeout=600)
        assert p.returncode == 0, se[-3000:]
        out[dt] = json.loads(so.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_for_sm90(sm90_builds, kernel, dtype):
    assert sm90_builds[dtype][kernel] == "ok", sm90_builds[dtype][kernel]


# --- on a real GPU: the search's shapes ------------------------------------------------------------

REAL = [(16, 32), (32, 16), (64, 8)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("C,H", REAL)
def test_cuda_real_shapes_fp32(C, H, stride):
    gen = torch.Generator().manual_seed(C + stride)
    x, ws = make(64, C, H, torch.float32, gen)
    HO = (H - 1) // stride + 1
    g = [torch.randn(64, C, HO, HO, generator=gen).to(DEV) for _ in NAMES]
    ys, gs = run(stencil, x, ws, stride, g)
    y64, g64 = run(stencil_reference, x.double(), [w.double() for w in ws], stride, [t.double() for t in g])
    for name, a, b in zip(NAMES + GRADS, ys + gs, y64 + g64):  # fp64 oracle: cuDNN may use TF32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("C,H", REAL)
def test_cuda_real_shapes_bf16(C, H, stride):
    check_low_precision(64, C, H, stride, torch.bfloat16, seed=C + stride)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_opcheck():
    """Schema, fake-tensor and autograd registration (fake tracing cannot run in the interpreter)."""
    gen = torch.Generator().manual_seed(0)
    x, ws = make(2, 16, 9, torch.float32, gen)
    torch.library.opcheck(torch.ops.milenas_fast.stencil_fwd.default,
                          (x.requires_grad_(), *[w.requires_grad_() for w in ws], 2))
