"""edge_reduce: the C++/CUDA op against its PyTorch reference (fp64 oracle), gradients, opcheck,
torch.compile, determinism. The first test in a session JIT-builds the extension (cached afterwards).

The ops take the candidates as a list; most tests build them as the rows of one [K, N, C, H, W] leaf (`rows`),
so autograd stacks their gradients for comparison; test_separate_candidates gives each its own storage."""
import importlib
import time

import pytest
import torch

from milenas_fast.ops import edge_reduce, edge_reduce_reference, extension, tiles
er_module = importlib.import_module("milenas_fast.ops.edge_reduce")  # the package attribute is the function

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def ext():
    t = time.perf_counter()
    extension.require()  # fails (not skips) when the extension cannot be built: that is a bug here
    from milenas_fast.ops.backends import Kernels

    assert Kernels.for_device("cpu").edge_reduce == "cpp"  # resolved before any torch.compile trace
    print(f"\nextension: {extension.describe()} ({time.perf_counter() - t:.1f} s)")


def make_inputs(K, N=3, C=5, H=7, W=None, dtype=torch.float32, device="cpu", seed=0):
    """Candidate outputs with per-channel offsets and scales, their batch statistics, softmax weights."""
    g = torch.Generator().manual_seed(seed)
    W = H if W is None else W
    y = torch.randn(K, N, C, H, W, generator=g, dtype=torch.float64)
    y = y * (0.5 + torch.rand(K, 1, C, 1, 1, generator=g, dtype=torch.float64)) + torch.randn(K, 1, C, 1, 1, generator=g, dtype=torch.float64)
    y = y.to(dtype)  # the low-precision values are the exact inputs every implementation sees
    yd = y.double()
    if N:
        mean = yd.mean(dim=(1, 3, 4)).float()
        rstd = (yd.var(dim=(1, 3, 4), unbiased=False) + 1e-5).rsqrt().float()
    else:  # no statistics of an empty batch
        mean, rstd = torch.zeros(K, C), torch.ones(K, C)
    w = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0).float()
    grad = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    return [t.to(device) for t in (y, w, mean, rstd)], grad.to(device)


def rows(fn):
    """fn over a [K, N, C, H, W] tensor's rows: the list of candidates the ops take."""
    return lambda y, *rest: fn(list(y.unbind(0)), *rest)


def split(inputs):
    """(y [K, ...], w, mean, rstd) -> the ops' arguments (ys list, w, mean, rstd)."""
    return [list(inputs[0].unbind(0)), *inputs[1:]]


def run(fn, inputs, grad, requires=(True, True, True, True)):
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip(inputs, requires)]
    out = rows(fn)(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def oracle(inputs, grad):
    return run(edge_reduce_reference, [t.double().cpu() for t in inputs], grad.double().cpu())


def naive_low_precision(ys, w, mean, rstd):
    """What plain PyTorch does in y's precision (the yardstick of the relative rule)."""
    y = torch.stack(ys)
    dt, k, c = y.dtype, y.shape[0], y.shape[2]
    return ((y - mean.to(dt).view(k, 1, c, 1, 1)) * (rstd * w[:, None]).to(dt).view(k, 1, c, 1, 1)).sum(0)


NAMES = ["out", "grad_y", "grad_w", "grad_mean", "grad_rstd"]


@pytest.mark.parametrize("K", [1, 3, 7])
@pytest.mark.parametrize("H", [7, 9])
def test_fp32_matches_reference(K, H):
    inputs, grad = make_inputs(K, H=H, seed=K * 10 + H)
    got, want = run(edge_reduce, inputs, grad), oracle(inputs, grad)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == (inputs[0].dtype if name in ("out", "grad_y") else torch.float32), name
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [1, 7])
def test_low_precision_relative_rule(dtype, K):
    inputs, grad = make_inputs(K, H=9, dtype=dtype, seed=K)
    got, want = run(edge_reduce, inputs, grad), oracle(inputs, grad)
    naive = run(naive_low_precision, inputs, grad)
    for name, a, b, c in zip(NAMES, got, want, naive):
        err, err_naive = (a.double() - b).abs().max().item(), (c.double() - b).abs().max().item()
        assert err <= 2 * err_naive + 1e-4 * b.abs().max().item(), f"{name}: {err:.3g} vs plain {err_naive:.3g}"


def test_output_mask_skips_unrequested_gradients():
    inputs, grad = make_inputs(3)
    want = oracle(inputs, grad)
    for mask in ([False, True, False, False], [True, False, False, False], [False, False, True, True]):
        outs = torch.ops.milenas_fast.edge_reduce_backward(grad, *split(inputs), mask)
        for m, o, b, name in zip(mask, outs, want[1:], NAMES[1:]):
            if m:
                torch.testing.assert_close(o.double(), b, atol=1e-5, rtol=1e-5, msg=lambda s: f"{name}: {s}")
            else:
                assert o is None, name
    # through autograd: only w requires grad (an α-only style pass)
    _, gy, gw, gm, gr = run(edge_reduce, inputs, grad, requires=(False, True, False, False))
    assert gy is None and gm is None and gr is None
    torch.testing.assert_close(gw.double(), want[2], atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs():
    inputs, grad = make_inputs(3, H=7, W=9)
    y, w, mean, rstd = inputs
    y_nc = y.transpose(3, 4).contiguous().transpose(3, 4)
    mean_nc = mean.t().contiguous().t()
    assert not y_nc.is_contiguous() and not mean_nc.is_contiguous()
    a = run(edge_reduce, [y_nc, w, mean_nc, rstd], grad.transpose(2, 3).contiguous().transpose(2, 3))
    b = run(edge_reduce, inputs, grad)
    for name, x, z in zip(NAMES, a, b):
        assert torch.equal(x, z), name


def test_empty_batch():
    inputs, grad = make_inputs(3, N=0, H=1)
    out, gy, gw, gm, gr = run(edge_reduce, inputs, grad)
    assert out.shape == (0, 5, 1, 1) and gy.shape == inputs[0].shape
    assert not gw.any() and not gm.any() and not gr.any()


def bad_cases(inputs, grad):
    """(op, args, message): what the C++ op and the Triton edge_reduce reject, with the same messages."""
    y, w, mean, rstd = inputs
    ys, k = list(y.unbind(0)), y.shape[0]
    fwd = [((ys, w.double(), mean, rstd), "float32"), ((ys, w[:2], mean, rstd), rf"\[K={k}"),
           ((ys, w, mean[:, :2], rstd), "mean and rstd"),
           (([t[0] for t in ys], w, mean, rstd), r"each candidate must be \[N, C, H, W\]"),
           (([t.double() for t in ys], w, mean, rstd), "bfloat16 or float16"),
           ((ys[:1] * 9, w.new_ones(9), mean[:1].expand(9, -1), rstd[:1].expand(9, -1)),
            "need 1 to 8 candidates, got 9"),
           (([], w, mean, rstd), "need 1 to 8 candidates, got 0"),
           ((ys[:2] + [ys[2][..., :-1]] + ys[3:], w, mean, rstd), r"ys\[2\] must match ys\[0\]"),
           ((ys[:1] + [ys[1].to(torch.bfloat16)] + ys[2:], w, mean, rstd), r"ys\[1\] must match ys\[0\]"),
           ((ys, w, mean, rstd, ys[0][..., :-1]), r"acc must match ys\[0\]"),
           ((ys, w, mean, rstd, ys[0].to(torch.bfloat16)), r"acc must match ys\[0\]")]
    bwd = [((grad[:, :-1], ys, w, mean, rstd, [True] * 4), r"grad_out must match ys\[0\]"),
           ((grad, ys[:1] * 9, w.new_ones(9), mean[:1].expand(9, -1), rstd[:1].expand(9, -1), [True] * 4),
            "got 9")]
    return [("fwd", a, m) for a, m in fwd] + [("bwd", a, m) for a, m in bwd]


@pytest.mark.parametrize("impl", ["cpp", pytest.param("triton", marks=pytest.mark.gpu_path)])
def test_rejects_bad_inputs(impl):
    """Wrong w/mean/rstd, candidates of the wrong rank or dtype, more than 8 or none, list entries that do not
    match the first (shape, dtype), a grad_out unlike the candidates: one clear error each."""
    dev = "cpu" if impl == "cpp" else TRITON_DEV
    inputs, grad = make_inputs(4, N=2, C=3, H=5, W=5)
    ops = {"cpp": (torch.ops.milenas_fast.edge_reduce, torch.ops.milenas_fast.edge_reduce_backward),
           "triton": (lambda *a: torch.ops.milenas_fast.edge_reduce_triton(*a),
                    lambda *a: torch.ops.milenas_fast.edge_reduce_triton_backward(*a, False))}[impl]
    if impl == "triton":
        importlib.import_module("milenas_fast.ops.edge_reduce_triton")
    for which, args, match in bad_cases([t.to(dev) for t in inputs], grad.to(dev)):
        with pytest.raises(RuntimeError, match=match):
            ops[which == "bwd"](*args)


@pytest.mark.parametrize("impl", ["cpp", pytest.param("triton", marks=pytest.mark.gpu_path)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 7])
def test_separate_candidates(impl, dtype, K, monkeypatch):
    """Candidates in separate storages (as the fused MixedOp's are), some not requiring grad: each gets its own
    gradient (a row of the op's one grad_y buffer) and the rest None; the Triton edge_reduce on a multi-program grid."""
    monkeypatch.setattr(tiles, "PLANE_TILE", 16)
    dev = "cpu" if impl == "cpp" else TRITON_DEV
    fn = edge_reduce if impl == "cpp" else triton_fn
    (y, w, mean, rstd), grad = make_inputs(K, N=2, C=3, H=5, W=7, dtype=dtype, seed=K)
    ys = [y[k].clone().to(dev).requires_grad_(k % 3 != 1) for k in range(K)]
    assert len({t.data_ptr() for t in ys}) == K
    vecs = [t.to(dev).requires_grad_() for t in (w, mean, rstd)]
    out = fn(ys, *vecs)
    need = [t for t in ys + vecs if t.requires_grad]
    got = dict(zip(map(id, need), torch.autograd.grad(out, need, grad.to(dev))))
    ref_in = [t.detach().double().cpu().requires_grad_() for t in ys + vecs]
    ref = edge_reduce_reference(ref_in[:K], *ref_in[K:])
    want = torch.autograd.grad(ref, ref_in, grad.double())
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    for i, (t, b) in enumerate(zip(ys + vecs, want)):
        if not t.requires_grad:
            continue
        a = got[id(t)].double().cpu()
        assert got[id(t)].dtype == t.dtype and a.shape == b.shape, i
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=lambda m: f"input {i}: {m}")


@pytest.mark.parametrize("impl", ["cpp", pytest.param("triton", marks=pytest.mark.gpu_path)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_acc_is_added(impl, dtype, monkeypatch):
    """acc (a node's running sum) is added to the output in fp32 before the one rounding; its gradient is the
    output's; the candidates' and w's gradients are unchanged by it. The Triton edge_reduce on a multi-program grid."""
    monkeypatch.setattr(tiles, "PLANE_TILE", 16)
    dev = "cpu" if impl == "cpp" else TRITON_DEV
    fn = edge_reduce if impl == "cpp" else (lambda *a: torch.ops.milenas_fast.edge_reduce_triton(*a))
    (y, w, mean, rstd), grad = make_inputs(5, N=2, C=3, H=5, W=7, dtype=dtype, seed=11)
    acc = (4 * torch.randn(y.shape[1:], generator=torch.Generator().manual_seed(12))).to(dtype)
    leaves = [t.to(dev).requires_grad_() for t in (y, w, acc)]
    out = fn(list(leaves[0].unbind(0)), leaves[1], mean.to(dev), rstd.to(dev), leaves[2])
    got = torch.autograd.grad(out, leaves, grad.to(dev))
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (y, w, acc)]
    ref = edge_reduce_reference(list(ref_in[0].unbind(0)), ref_in[1], mean.double(), rstd.double(), ref_in[2])
    want = torch.autograd.grad(ref, ref_in, grad.double())
    # one rounding of the fp32 sum: within an ulp of the result (the interpreter's casts truncate) or fp32 noise
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert out.dtype == dtype and (out.double().cpu() - ref).abs().max() <= tol * ref.abs().max() + 1e-6
    assert torch.equal(got[2].cpu(), grad)  # acc's gradient: the output's, untouched
    for name, a, b in zip(("grad y", "grad w"), got[:2], want[:2]):
        torch.testing.assert_close(a.double().cpu(), b, rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-5 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")
    without = fn(list(leaves[0].detach().unbind(0)), w.to(dev), mean.to(dev), rstd.to(dev))
    assert not torch.equal(out.detach(), without)  # acc was read


@pytest.mark.parametrize("impl", ["cpp", pytest.param("triton", marks=pytest.mark.gpu_path)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partials_sum_to_the_backward_reductions(impl, dtype, monkeypatch):
    """edge_reduce_partials: [K, C, S] sums of g·(y_k − mean_k) and [C, S] sums of g whose totals over S are the
    backward's (fp64 oracle); S = 1 on the CPU, pixel tiles × images for the Triton edge_reduce (a multi-program grid)."""
    monkeypatch.setattr(tiles, "PLANE_TILE", 16)
    dev = "cpu" if impl == "cpp" else TRITON_DEV
    op = (torch.ops.milenas_fast.edge_reduce_partials if impl == "cpp"
          else importlib.import_module("milenas_fast.ops.edge_reduce_triton").partials)
    (y, w, mean, rstd), grad = make_inputs(4, N=3, C=5, H=5, W=7, dtype=dtype, seed=21)
    ys = [t.to(dev) for t in y.unbind(0)]
    pgy, pg = op(grad.to(dev), ys, w.to(dev), mean.to(dev), rstd.to(dev))
    s = 1 if impl == "cpp" else tiles.plane_config(3 * 5, 5 * 7)[2][1] * 3
    assert pgy.shape == (4, 5, s) and pg.shape == (5, s) and pgy.dtype == pg.dtype == torch.float32
    want = er_module.edge_reduce_partials_reference(grad.double(), list(y.double().unbind(0)), w, mean, rstd)
    for a, b in zip((pgy, pg), want):
        torch.testing.assert_close(a.sum(-1).double().cpu(), b.sum(-1), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="grad_out must match"):
        op(grad[:, :-1].to(dev), ys, w.to(dev), mean.to(dev), rstd.to(dev))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    inputs, grad = make_inputs(3, H=5, dtype=dtype)
    leaves = split([t.clone().requires_grad_() for t in inputs])
    torch.library.opcheck(torch.ops.milenas_fast.edge_reduce.default, leaves)
    acc = torch.randn(inputs[0].shape[1:]).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.milenas_fast.edge_reduce.default, [*leaves, acc])
    for mask in ([True, True, True, True], [False, True, False, True]):
        torch.library.opcheck(torch.ops.milenas_fast.edge_reduce_backward.default, [grad, *split(inputs), mask])
    torch.library.opcheck(torch.ops.milenas_fast.edge_reduce_partials.default, [grad, *split(inputs)])


def test_deterministic_across_runs_and_thread_counts():
    inputs, grad = make_inputs(7, N=4, C=6, H=9, seed=3)
    threads = torch.get_num_threads()
    try:
        first = run(edge_reduce, inputs, grad)
        second = run(edge_reduce, inputs, grad)
        torch.set_num_threads(1)
        single = run(edge_reduce, inputs, grad)
    finally:
        torch.set_num_threads(threads)
    for name, a, b, c in zip(NAMES, first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c), name


def _compile_and_compare(backend):
    inputs, grad = make_inputs(3, H=7)

    def f(ys, w, mean, rstd):
        return torch.relu(edge_reduce(ys, w, mean, rstd)) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    t = time.perf_counter()
    got = run(compiled, inputs, grad)
    print(f"\ntorch.compile ({backend}, CPU) first call: {time.perf_counter() - t:.1f} s")
    for name, a, b in zip(NAMES, got, run(f, inputs, grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def test_torch_compile_traces_fullgraph():
    """Dynamo + AOTAutograd through the fake and autograd registrations (no code generation: fast)."""
    _compile_and_compare("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    """Inductor codegen around the op; ~30-100 s on 2 cores (C++ compile of the generated kernels)."""
    _compile_and_compare("inductor")


# ---- CUDA (run on a GPU machine; skipped here) ----


@cuda
@needs_gpu
@pytest.mark.parametrize("shape", [dict(K=1, N=3, C=5, H=7), dict(K=7, N=3, C=5, H=9), dict(K=8, N=64, C=16, H=32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_cuda_matches_reference(shape, dtype, impl):
    if impl == "cpp":
        if extension.cuda_home() is None:
            pytest.skip("no nvcc here: the extension has no CUDA kernels (the Triton edge_reduce's case)")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("milenas_fast::edge_reduce", "CUDA"), \
            extension.describe()
        fn = torch.ops.milenas_fast.edge_reduce
    else:
        fn = importlib.import_module("milenas_fast.ops.edge_reduce_triton").edge_reduce_triton
    inputs, grad = make_inputs(**shape, dtype=dtype, device="cuda", seed=shape["K"])
    got, want = run(fn, inputs, grad), oracle(inputs, grad)
    naive = run(naive_low_precision, inputs, grad) if dtype != torch.float32 else None
    for i, (name, a, b) in enumerate(zip(NAMES, got, want)):
        assert a.is_cuda and a.dtype == (dtype if name in ("out", "grad_y") else torch.float32), name
        a = a.double().cpu()
        if naive is None:  # fp32: sums of up to 65k terms, so a relative tolerance on the largest value
            torch.testing.assert_close(a, b, atol=1e-5 + 1e-6 * b.abs().max().item(), rtol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
        else:
            err, err_naive = (a - b).abs().max().item(), (naive[i].double().cpu() - b).abs().max().item()
            assert err <= 2 * err_naive + 1e-4 * b.abs().max().item(), f"{name}: {err:.3g} vs plain {err_naive:.3g}"


@cuda
@needs_gpu
def test_cuda_masks_determinism_and_streams():
    inputs, grad = make_inputs(8, N=64, C=16, H=16, dtype=torch.bfloat16, device="cuda", seed=5)
    want = oracle(inputs, grad)
    first = run(edge_reduce, inputs, grad)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the kernels must follow the current stream
        second = run(edge_reduce, inputs, grad)
    torch.cuda.current_stream().wait_stream(side)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name
    for mask in ([False, True, False, False], [True, False, False, False], [False, False, True, False]):
        outs = torch.ops.milenas_fast.edge_reduce_backward(grad, *split(inputs), mask)
        for m, o, full, name in zip(mask, outs, first[1:], NAMES[1:]):
            assert (o is None) != m, name
            if m:
                assert torch.equal(o, full), name
    torch.testing.assert_close(first[2].double().cpu(), want[2], atol=1e-3, rtol=1e-3)


@cuda
@needs_gpu
def test_cuda_opcheck_and_graph_capture():
    inputs, grad = make_inputs(3, N=4, C=6, H=8, device="cuda")
    leaves = split([t.clone().requires_grad_() for t in inputs])
    torch.library.opcheck(torch.ops.milenas_fast.edge_reduce.default, leaves)
    torch.library.opcheck(torch.ops.milenas_fast.edge_reduce_backward.default, [grad, *split(inputs), [True] * 4])
    eager = torch.ops.milenas_fast.edge_reduce_backward(grad, *split(inputs), [True] * 4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # no host syncs or non-capturable allocations inside
        captured = torch.ops.milenas_fast.edge_reduce_backward(grad, *split(inputs), [True] * 4)
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(NAMES[1:], captured, eager):
        assert torch.equal(a, b), name


# ---- the Triton edge_reduce (milenas_fast/ops/edge_reduce_triton.py): on the GPU, else through the interpreter ----

gpu_path = pytest.mark.gpu_path
TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = TRITON_DEV == "cpu"
TRITON_SHAPES = [dict(K=1, N=3, C=5, H=7, W=9), dict(K=2, N=1, C=3, H=5, W=3), dict(K=5, N=3, C=1, H=3, W=5),
               dict(K=8, N=1, C=7, H=1, W=1), dict(K=3, N=5, C=3, H=9, W=7)]


@pytest.fixture
def triton_er(monkeypatch):
    """The Triton edge_reduce's module with tiles of at most 16 elements: multi-program grids in both dimensions."""
    monkeypatch.setattr(tiles, "PLANE_TILE", 16)
    return importlib.import_module("milenas_fast.ops.edge_reduce_triton")


def triton_fn(ys, w, mean, rstd):
    return torch.ops.milenas_fast.edge_reduce_triton(ys, w, mean, rstd)


def on_dev(*ts):
    return [t.to(TRITON_DEV) for t in ts]


def to_cpu(ts):
    return [t.cpu() if t is not None else None for t in ts]


def run_triton(inputs, grad, requires=(True, True, True, True), fn=triton_fn):
    """`run` on TRITON_DEV, results back on the CPU."""
    return to_cpu(run(fn, on_dev(*inputs), grad.to(TRITON_DEV), requires))


@gpu_path
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "K{K}N{N}C{C}H{H}W{W}".format(**s))
def test_triton_fp32_matches_reference(triton_er, shape):
    bp, bhw, grid, _ = tiles.plane_config(shape["N"] * shape["C"], shape["H"] * shape["W"])
    inputs, grad = make_inputs(**shape, seed=shape["K"])
    got, want = run_triton(inputs, grad), oracle(inputs, grad)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == (torch.float32 if name not in ("out", "grad_y") else inputs[0].dtype), name
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} {grid}: {m}")


@gpu_path
def test_triton_uses_many_programs(triton_er):
    assert tiles.plane_config(3 * 5, 7 * 9)[2] == (15, 4)  # one plane × 16 pixels per program
    assert tiles.plane_config(5 * 3, 1)[2] == (1, 1)  # 16 one-pixel planes in one program


@gpu_path
def test_triton_matches_cpp_op(triton_er):
    """The Triton edge_reduce vs the C++ op (CPU kernels here; on a GPU whatever edge_reduce runs there)."""
    inputs, grad = make_inputs(7, N=3, C=5, H=5, W=7, seed=11)
    for name, a, b in zip(NAMES, run_triton(inputs, grad), run_triton(inputs, grad, fn=edge_reduce)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6, msg=lambda m: f"{name}: {m}")


@gpu_path
@pytest.mark.parametrize("mask", [[bool(i >> j & 1) for j in range(4)] for i in range(16)],
                         ids=lambda m: "".join("1" if b else "0" for b in m))
def test_triton_output_mask(triton_er, mask):
    inputs, grad = make_inputs(3, N=3, C=3, H=5, W=3, seed=2)
    want = oracle(inputs, grad)
    outs = to_cpu(torch.ops.milenas_fast.edge_reduce_triton_backward(grad.to(TRITON_DEV), *split(on_dev(*inputs)), mask,
                                                                     False))
    for m, o, b, name in zip(mask, outs, want[1:], NAMES[1:]):
        if m:
            torch.testing.assert_close(o.double(), b, atol=1e-5, rtol=1e-5, msg=lambda s: f"{name}: {s}")
        else:
            assert o is None, name


@gpu_path
@pytest.mark.parametrize("requires", [(False, True, False, False), (True, False, False, False),
                                      (False, False, True, True), (True, True, True, False)])
def test_triton_autograd_asks_only_for_needed_grads(triton_er, requires):
    inputs, grad = make_inputs(3, N=2, C=3, H=3, W=5, seed=4)
    want = oracle(inputs, grad)
    got = run_triton(inputs, grad, requires=requires)
    for r, a, b, name in zip(requires, got[1:], want[1:], NAMES[1:]):
        if r:
            torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=lambda s: f"{name}: {s}")
        else:
            assert a is None, name


@gpu_path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [1, 6])
def test_triton_low_precision_relative_rule(triton_er, dtype, K):
    inputs, grad = make_inputs(K, N=3, C=3, H=7, W=5, dtype=dtype, seed=K)
    got, want = run_triton(inputs, grad), oracle(inputs, grad)
    naive = run(naive_low_precision, inputs, grad)
    for name, a, b, c in zip(NAMES, got, want, naive):
        assert a.dtype == (dtype if name in ("out", "grad_y") else torch.float32), name
        err, err_naive = (a.double() - b).abs().max().item(), (c.double() - b).abs().max().item()
        # The interpreter truncates fp32 -> bf16 (GPUs round to nearest): one more bf16 ulp on stored values.
        stored = dtype == torch.bfloat16 and name in ("out", "grad_y") and INTERPRETING
        ulp = torch.finfo(dtype).eps if stored else 1e-4
        assert err <= 2 * err_naive + ulp * b.abs().max().item(), f"{name}: {err:.3g} vs plain {err_naive:.3g}"


@gpu_path
def test_triton_deterministic_and_empty(triton_er):
    inputs, grad = make_inputs(4, N=3, C=3, H=5, W=5, seed=9)
    for name, a, b in zip(NAMES, run_triton(inputs, grad), run_triton(inputs, grad)):
        assert torch.equal(a, b), name
    empty, egrad = make_inputs(3, N=0, H=1)
    out, gy, gw, gm, gr = run_triton(empty, egrad)
    assert out.shape == (0, 5, 1, 1) and gy.shape == empty[0].shape
    assert not gw.any() and not gm.any() and not gr.any()


@gpu_path
def test_triton_opcheck(triton_er):
    """Schema, autograd registration and the fake kernels (AOT dispatch needs a GPU: the interpreter
    cannot run under functionalization)."""
    inputs, grad = make_inputs(3, N=2, C=3, H=3, W=5)
    inputs, grad = on_dev(*inputs), grad.to(TRITON_DEV)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.milenas_fast.edge_reduce_triton.default,
                          split([t.clone().requires_grad_() for t in inputs]), test_utils=utils)
    for mask in ([True, True, True, True], [False, True, False, True], [False] * 4):
        torch.library.opcheck(torch.ops.milenas_fast.edge_reduce_triton_backward.default,
                              [grad, *split(inputs), mask, False], test_utils=utils)


@gpu_path
def test_triton_registers_as_triton_ops_as_on_the_gpu(triton_er, monkeypatch):
    """The GPU's registration (triton_op: its schema inferred from the annotations, as torch 2.11 ignores an
    explicit one) and launches (wrap_triton), here too. torch < 2.12's wrap_triton rejects interpreted
    kernels: there only the registration and schemas are checked."""
    import uuid

    from triton.runtime.jit import JITFunction

    from milenas_fast.ops import triton_launch

    monkeypatch.setattr(triton_launch, "INTERPRET", False)
    ns = f"milenas_fast_test_{uuid.uuid4().hex[:8]}"
    fwd = triton_launch.register(f"{ns}::fwd")(triton_er.edge_reduce_triton._init_fn)
    bwd = triton_launch.register(f"{ns}::bwd")(triton_er.edge_reduce_triton_backward._init_fn)
    assert str(fwd._opoverload._schema) == (
        f"{ns}::fwd(Tensor[] ys, Tensor w, Tensor mean, Tensor rstd, Tensor? acc=None) -> Tensor")
    assert str(bwd._opoverload._schema) == (
        f"{ns}::bwd(Tensor grad_out, Tensor[] ys, Tensor w, Tensor mean, Tensor rstd, bool[] output_mask, "
        "bool partials) -> (Tensor, Tensor, Tensor, Tensor)")
    try:
        torch.library.wrap_triton(triton_er.K.edge_reduce_fwd_kernel)
    except RuntimeError:
        assert not isinstance(triton_er.K.edge_reduce_fwd_kernel, JITFunction)  # refused only when interpreted
        return
    inputs, grad = make_inputs(3, N=2, C=3, H=5, W=3, seed=6)
    want = oracle(inputs, grad)
    args = split(on_dev(*inputs))
    got = to_cpu([fwd(*args), *bwd(grad.to(TRITON_DEV), *args, [True, False, True, True], False)])
    for name, a, b in zip(("out", "grad_y", "grad_mean", "grad_rstd"), got[:2] + got[3:], want[:2] + want[3:]):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert got[2] is None


@gpu_path
def test_select_falls_back_to_triton_with_one_warning(monkeypatch):
    from milenas_fast.ops import backends, select

    def fresh():  # the resolution is made once per process: undo it for the test
        monkeypatch.setattr(backends, "_RESOLVED", {})

    monkeypatch.setattr(backends, "extension_problem", lambda dt: "C++ extension has no CUDA kernels (no nvcc)")
    fresh()
    notice = r"edge_reduce on cuda: Triton kernels, because .*no nvcc.*info --rebuild"
    try:
        with pytest.warns(RuntimeWarning, match=notice) as rec:
            assert select.edge_reduce_impl("cuda")[0] == "triton"
            assert backends.Kernels.for_device("cuda").edge_reduce == "triton"
        assert len([w for w in rec if "Triton kernels, because" in str(w.message)]) == 1
        assert backends.Kernels.for_device("cuda").notice() == str(rec[0].message)
        monkeypatch.setattr(backends, "triton_edge_reduce_problem", lambda: "Triton edge_reduce unavailable (no triton)")
        fresh()
        impl, why = select.edge_reduce_impl("cuda")
        assert impl == "" and "no nvcc" in why and "no triton" in why
        monkeypatch.setattr(backends, "triton_edge_reduce_problem", lambda: "")
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors and no interpreter: the Triton edge_reduce cannot stand in
        fresh()
        impl, why = select.edge_reduce_impl("cpu")
        assert impl == "" and "no nvcc" in why and "through the interpreter" in why
    finally:
        monkeypatch.undo()
    assert backends.Kernels.for_device("cpu").notice() == ""
    with pytest.raises(RuntimeError, match="cannot run on cpu: no kernels at all"):
        edge_reduce(*split(make_inputs(2)[0]), kernels=backends.Kernels("cpu", "", "no kernels at all"))


def test_triton_kernels():
    """Kernels.with_triton: the C++ op's kernels with the Triton edge_reduce instead (a new value), None where not in use."""
    from milenas_fast.ops.backends import Kernels

    cpp = Kernels("cuda", "cpp", "C++/CUDA kernels")
    other = cpp.with_triton("C++ edge_reduce failed")
    assert other == Kernels("cuda", "triton", "Triton kernels, because the C++ edge_reduce failed") and cpp.edge_reduce == "cpp"
    assert other.with_triton("again") is None and Kernels("cpu", "", "none").with_triton("x") is None
    assert "edge_reduce on cuda: Triton kernels, because" in other.notice() and cpp.notice() == ""


# The launcher's configurations at the supernet's planes (32², 16², 8², and 4² after the last reduction).
_SM90 = r"""
import importlib.util, json, os, sys, time
os.environ["TRITON_INTERPRET"] = "0"  # the interpreter's patched triton.language cannot compile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("_er", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
res = {}
for case in json.loads(sys.argv[2]):
    name, dt, consts, warps = case["kernel"], case["dtype"], case["consts"], case["warps"]
    fn = getattr(mod, name)
    fp32 = ("w_ptr", "mean_ptr", "rstd_ptr", "part_gy_ptr", "part_g_ptr")
    sig = {p.name: "constexpr" if p.is_constexpr else ("*fp32" if p.name in fp32 else "*" + dt)
           if p.name.endswith("_ptr") else "i32" for p in fn.params}
    t = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps})
        res[json.dumps(case)] = "ok" if k.asm.get("cubin") else "no cubin"
    except Exception as e:
        res[json.dumps(case)] = repr(e)[-2000:]
print(json.dumps(res))
"""


def _sm90_cases():
    cases = []
    for hw in (1024, 256, 64, 16):
        bp, bhw, _, warps = tiles.plane_config(64 * 16, hw, 1024)
        blocks = dict(K=7, BLOCK_P=bp, BLOCK_HW=bhw)  # the DARTS list without `none`
        dtypes = ("fp32", "bf16", "fp16") if hw == 1024 else ("bf16",)
        for dt in dtypes:
            cases.append(dict(kernel="edge_reduce_fwd_kernel", dtype=dt, consts=blocks, warps=warps))
            cases.append(dict(kernel="edge_reduce_bwd_kernel", dtype=dt, consts=dict(GY=True, SUMS=True, **blocks),
                              warps=warps))
        if hw == 256:
            cases.append(dict(kernel="edge_reduce_fwd_kernel", dtype="bf16", consts=dict(blocks, K=8), warps=warps))
            for gy, sums in ((True, False), (False, True)):
                cases.append(dict(kernel="edge_reduce_bwd_kernel", dtype="bf16",
                                  consts=dict(GY=gy, SUMS=sums, **blocks), warps=warps))
    return cases


@pytest.mark.stack  # compiled against this stack's torch/Triton
@pytest.mark.slow  # ptxas for sm_90
@gpu_path
def test_triton_compiles_for_sm90():
    """Every kernel lowers to sm_90 cubin at the configurations the launcher picks on a GPU."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "kernels" / "edge_reduce.py"
    cases = _sm90_cases()
    p = subprocess.run([sys.executable, "-c", _SM90, str(src), json.dumps(cases)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(res) == len(cases) and {k: v for k, v in res.items() if v != "ok"} == {}


@cuda
@needs_gpu
def test_cuda_triton_opcheck_compile_and_determinism():
    fn = importlib.import_module("milenas_fast.ops.edge_reduce_triton").edge_reduce_triton
    inputs, grad = make_inputs(3, N=4, C=6, H=8, device="cuda")
    torch.library.opcheck(torch.ops.milenas_fast.edge_reduce_triton.default,
                          split([t.clone().requires_grad_() for t in inputs]))
    for mask in ([True] * 4, [False, True, False, True]):
        torch.library.opcheck(torch.ops.milenas_fast.edge_reduce_triton_backward.default,
                              [grad, *split(inputs), mask, False])
    big, bgrad = make_inputs(8, N=64, C=16, H=16, dtype=torch.bfloat16, device="cuda", seed=5)
    first, second = run(fn, big, bgrad), run(fn, big, bgrad)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name

    def f(ys, w, mean, rstd):
        return torch.relu(fn(ys, w, mean, rstd)) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for name, a, b in zip(NAMES, run(compiled, inputs, grad), run(f, inputs, grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
