"""Every registered milenas_fast op passes torch.library.opcheck (schema, fake tensor, autograd registration,
AOT dispatch) on CPU (the Triton ops through the interpreter, the C++ ops' CPU kernels), and the list of ops is
the registry's own, so a new op cannot escape; and the op surface stays small: one op per kernel and direction."""
import importlib
import pkgutil

import pytest
import torch

pytest.importorskip("triton")
import milenas_fast.ops as ops_pkg  # noqa: E402
from milenas_fast.ops import extension  # noqa: E402


def registered() -> set[str]:
    for m in pkgutil.iter_modules(ops_pkg.__path__):  # every op module registers at import
        importlib.import_module(f"milenas_fast.ops.{m.name}")
    extension.require()  # the C++ ops (with their fake and autograd kernels, registered as it loads)
    return {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("milenas_fast::")}


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU's real kernels where there is one


def _t(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).to(DEV).requires_grad_(grad)


def samples():
    """{op name: [argument tuples]}: small odd shapes; differentiable inputs require grad where the op has autograd."""
    N, C, H = 2, 3, 5
    x, x5 = _t(N, C, H, H, grad=True), _t(N, C, H, H, grad=True)
    w3, w5, wd3, wd5 = (_t(C, 1, k, k, grad=True) for k in (3, 5, 3, 5))
    g = [_t(N, C, H, H) for _ in range(6)]
    mean, rstd = _t(2, C), torch.rand(2, C, device=DEV) + 0.5
    tile_stats = torch.rand(2, N * 2, 2, C, device=DEV)  # two rows (h3's, h5's), two tiles per image
    ys = [_t(N, C, H, H, grad=True) for _ in range(3)]
    yd = [y.detach() for y in ys]
    w, m3, r3 = torch.rand(3, device=DEV, requires_grad=True), _t(3, C), torch.rand(3, C, device=DEV) + 0.5
    grad = _t(N, C, H, H)
    pw_x = [_t(N, C, H, H, grad=True) for _ in range(2)]
    pw_w = [_t(4, C, 1, 1, grad=True) for _ in range(2)]
    pw_g = [_t(N, 4, H, H) for _ in range(2)]
    er = (ys, w, m3, r3)
    return {
        "stencil_fwd": [([x], [w3], [w5], [wd3], [wd5], 2, True, [], [], [], None, [], 0, 0, 0.0, 0),
                        ([x], [w3], [w5], [], [], 1, False, [x5], [mean], [rstd], None, [], 0, 0, 0.0, 0),
                        ([x.detach()], [w3.detach()], [w5.detach()], [], [], 1, False, [x5.detach()], [], [],
                         tile_stats, [0, 1], 0, 16, 1e-5, 0)],
        "stencil_bwd_input": [([x.detach()], [w3.detach()], [w5.detach()], [], [], [g[4]], [g[0]], [g[1]], [], [],
                               [g[4]], [g[5]], 1, [g[2]], [], [], [], 0),
                              ([x.detach()], [w3.detach()], [w5.detach()], [], [], [], [g[0]], [g[1]], [], [], [], [],
                               1, [], [x5.detach()], [mean], [rstd], 16)],
        "stencil_bwd_weight": [([x.detach()], [g[0]], [g[1]], [g[2]], [g[3]], 1, [], [], [], 0),
                               ([x.detach()] * 2, [g[0]] * 2, [], [], [], 1, [], [], [], 16)],
        # every output's statistics: the rows of unnamed outputs are unspecified
        # every output's statistics: the rows of unnamed outputs are unspecified
        "pointwise": [(pw_x, pw_w, 0), ([t.detach() for t in pw_x], [t.detach() for t in pw_w], 0b11)],
        "pointwise_input_grad": [(pw_g, [t.detach() for t in pw_w])],
        "pointwise_wgrad": [([t.detach() for t in pw_x], pw_g)],
        "bn_stats": [(yd, 0b101, 1e-5)],
        "bn_running_rstd": [(torch.rand(3, C, device=DEV), 0b011, 1e-5)],
        "bn_fold_grad": [(grad, yd, w.detach(), m3, r3, _t(3, C), _t(3, C), None, None, 0b101),
                         (grad, yd, w.detach(), m3, r3, None, None, _t(3, C, 2), _t(C, 2), 0b001)],
        "bn_backward": [(g[:2], [x.detach(), x5.detach()], [mean[0], mean[1]], [rstd[0], rstd[1]])],
        "edge_reduce": [er, (*er, _t(N, C, H, H, grad=True))],
        "edge_reduce_backward": [(grad, yd, w.detach(), m3, r3, [True, True, False, True])],
        "edge_reduce_partials": [(grad, yd, w.detach(), m3, r3)],
        "edge_reduce_triton": [er],
        "edge_reduce_triton_backward": [(grad, yd, w.detach(), m3, r3, [True, False, True, True], False),
                                        (grad, yd, w.detach(), m3, r3, [False] * 4, True)],
    }


def test_every_registered_op_has_samples_and_the_surface_is_small():
    names = registered()
    assert names == set(samples()), f"ops without an opcheck sample: {names - set(samples())}"
    assert len(names) <= 16 and not any(n.endswith("_group") for n in names), sorted(names)


@pytest.mark.parametrize("name", sorted(samples()))
def test_opcheck(name):
    registered()
    torch.manual_seed(0)
    op = getattr(torch.ops.milenas_fast, name).default
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA" if DEV == "cuda" else "CPU") \
            and not name.startswith(("stencil", "pointwise", "bn_", "edge_reduce_triton")):
        pytest.skip(f"the extension has no {DEV} kernels")  # (a CUDA build without nvcc: the twin serves)
    for args in samples()[name]:
        torch.library.opcheck(op, args)


_LOAD_ONLY = """
import torch
from milenas_fast.ops import extension
extension.require()  # nothing else imported: the library alone must be complete once loaded
print([torch._C._dispatch_has_kernel_for_dispatch_key(f"milenas_fast::{n}", k)
       for n in ("edge_reduce", "edge_reduce_backward", "edge_reduce_partials") for k in ("Meta", "Autograd")][:5])
"""

_NO_EXTENSION = """
import importlib, pkgutil, torch
from milenas_fast.ops import extension
extension._state.update(tried=True, ops=None, why="forced off for the test")
import milenas_fast.ops as ops
for m in pkgutil.iter_modules(ops.__path__):
    importlib.import_module(f"milenas_fast.ops.{m.name}")
from milenas_fast.ops.backends import Kernels
names = torch._C._dispatch_get_all_op_names()
print("milenas_fast::edge_reduce" in names, Kernels.for_device("cpu").edge_reduce)
"""


def _python(code: str) -> str:
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_registration_comes_with_the_library_and_imports_are_safe_without_it():
    """Loading the extension registers its ops' fake and autograd kernels at once (no op module imported);
    without the extension every op module still imports, and the fused path's edge_reduce takes the twin."""
    assert _python(_LOAD_ONLY) == "[True, True, True, False, True]"  # (the backward ops have no autograd)
    assert _python(_NO_EXTENSION) == "False triton"
