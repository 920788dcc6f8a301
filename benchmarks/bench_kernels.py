"""Kernel benchmarks: the fused ops and the fused MixedOp against the best eager PyTorch configuration.

    python benchmarks/bench_kernels.py [--quick] [--dtype fp32|bf16|fp16] [--csv benchmarks/kernels.csv]

For each shape of the default supernet (N=64; C=16 at 32², 32 at 16², 64 at 8²; stride 1 and 2):
- stencil         fused `stencil` vs `stencil_reference` (NCHW and channels_last)
- stencil_group   a fused cell's group of 8 edges from two states: `stencil_group` (one launch each way) vs the
                  per-edge `stencil` ("fused per edge") vs `stencil_reference` per edge
- relu_depthwise  `relu_depthwise` (the stencil kernels, one 3×3 branch: the sep convs' second stage) vs
                  F.relu + F.conv2d (`relu_depthwise_reference`, NCHW and channels_last)
- relu_depthwise_pair  both sep convs' second stages in one launch each way vs two reference calls
- pointwise       the four first 1×1 convolutions of the conv candidates in one grouped launch each way vs
                  four F.conv2d (NCHW and channels_last)
- edge_reduce     the C++/CUDA op ("fused") and its Triton kernels vs `edge_reduce_reference` (K=7 candidates,
                  the stride's output size)
- mixed_op        FusedMixedOp vs ReferenceMixedOp (NCHW and channels_last), train mode, full backward
                  and the α-only backward of the search's α passes
Phases fwd, bwd (the backward alone, graph retained) and fwd+bwd. Timing: CUDA events around each call
after warm-up, L2 flushed (a 256 MiB write) before every timed call so no call reads a warm cache;
median with p20/p80. GB/s = bytes the op must move (inputs read + outputs written once) / median time.
Peak memory = max allocated during one fwd+bwd above what was allocated before it.
The baselines are the library's own reference twins (the same ones the tests compare against).
Every row is printed and appended to the CSV (with the GPU name and torch/Triton/CUDA versions) as soon as
its op and shape are measured; an op that fails is recorded as an error row and the others go on. `--quick`
(stride 1 only, shorter timing) is what gpu_check.sh runs. No GPU: says so, exits 0.
`--cpu-smoke` runs every code path once at toy sizes through the Triton interpreter (development check only;
its timings mean nothing and nothing is written unless --csv is given).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(16, 32), (32, 16), (64, 8)]  # (C, H) of the three stages at 32×32 input
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
K_EDGE = 7  # non-`none` candidates of one edge


# --- timing ------------------------------------------------------------------------------------------

class CudaTimer:
    def __init__(self, warmup_ms: float, rep_ms: float):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def __call__(self, fn):
        fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(3):
            fn()
        e.record()
        torch.cuda.synchronize()
        est = max(s.elapsed_time(e) / 3, 1e-3)
        for _ in range(max(2, int(self.warmup_ms / est))):
            fn()
        n = min(1000, max(10, int(self.rep_ms / est)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            self.flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return quantiles([a.elapsed_time(b) for a, b in zip(starts, ends)])

    @staticmethod
    def peak_mib(fn) -> float:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


class CpuTimer:
    """--cpu-smoke: each path runs once (through the Triton interpreter); the time means nothing."""

    def __call__(self, fn):
        t = time.perf_counter()
        fn()
        return quantiles([(time.perf_counter() - t) * 1e3])

    @staticmethod
    def peak_mib(fn) -> float:
        return float("nan")


def quantiles(times):
    t = sorted(times)

    def q(p):
        return t[min(len(t) - 1, int(round(p * (len(t) - 1))))]

    return q(0.5), q(0.2), q(0.8)


# --- cases -------------------------------------------------------------------------------------------
# A case builds (forward closure, tensors whose gradients the backward computes). Each call of the
# closure runs one training-mode forward with a fresh autograd graph.

def out_size(n, s):
    return (n - 1) // s + 1


def stencil_cases(N, C, H, s, dtype, dev):
    from milenas_fast.ops.stencil import stencil, stencil_reference

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, C, H, H, device=dev, generator=g).to(dtype)
    ws = [(0.2 * torch.randn(C, 1, k, k, device=dev, generator=g)) for k in (3, 5, 3, 5)]
    cases = {}
    for layout, fmt in (("eager NCHW", torch.contiguous_format), ("eager channels_last", torch.channels_last)):
        xl = x.contiguous(memory_format=fmt).requires_grad_()
        wl = [w.clone().requires_grad_() for w in ws]
        cases[layout] = (lambda xl=xl, wl=wl: stencil_reference(xl, *wl, s), [xl, *wl])
    xf = x.clone().requires_grad_()
    wf = [w.clone().requires_grad_() for w in ws]
    cases["fused"] = (lambda: stencil(xf, *wf, s), [xf, *wf])
    el = torch.finfo(dtype).bits // 8
    i, o = N * C * H * H, N * C * out_size(H, s) ** 2
    nbytes = {"fwd": (i + 6 * o) * el, "bwd": (2 * i + 7 * o) * el}  # bwd: x, ymax, 6 grads in; dx out
    return cases, nbytes


def stencil_group_cases(N, C, H, s, dtype, dev):
    """A fused cell's group: the 8 edges leaving two states (4 each), every branch, pools included: `stencil_group`
    (one launch each way for all 8) vs the per-edge `stencil` (8 each way) vs `stencil_reference` per edge."""
    from milenas_fast.ops.stencil import MAX_EDGES, stencil, stencil_group, stencil_reference

    g = torch.Generator(device=dev).manual_seed(0)
    srcs = [torch.randn(N, C, H, H, device=dev, generator=g).to(dtype) for _ in range(2)]
    filters = [[0.2 * torch.randn(C, 1, k, k, device=dev, generator=g) for k in (3, 5, 3, 5)]
               for _ in range(MAX_EDGES)]

    def per_edge(fn, xs, fs):
        return [y for e, f in enumerate(fs) for y in fn(xs[e % 2], *f, s)]

    def group(_, xs, fs):
        return [y for ys in stencil_group([xs[e % 2] for e in range(len(fs))], fs, s, True, False) for y in ys]

    cases = {}
    for name, fn, how, fmt in (("eager NCHW", stencil_reference, per_edge, torch.contiguous_format),
                               ("eager channels_last", stencil_reference, per_edge, torch.channels_last),
                               ("fused per edge", stencil, per_edge, torch.contiguous_format),
                               ("fused", None, group, torch.contiguous_format)):
        if dev == "cpu" and name in ("eager channels_last", "fused per edge"):
            continue  # the CPU smoke (interpreter): the `stencil` op's case runs those paths already
        xs = [x.contiguous(memory_format=fmt).requires_grad_() for x in srcs]
        fs = [tuple(w.clone().requires_grad_() for w in f) for f in filters]
        cases[name] = (lambda fn=fn, how=how, xs=xs, fs=fs: how(fn, xs, fs), xs + [w for f in fs for w in f])
    el = torch.finfo(dtype).bits // 8
    i, o = N * C * H * H, N * C * out_size(H, s) ** 2
    # per edge as `stencil`: x and 6 outputs forward; x, ymax and 6 grads in, dx out backward
    return cases, {"fwd": MAX_EDGES * (i + 6 * o) * el, "bwd": MAX_EDGES * (2 * i + 7 * o) * el}


def relu_depthwise_cases(N, C, H, s, dtype, dev):
    from milenas_fast.ops.stencil import relu_depthwise, relu_depthwise_reference

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, C, H, H, device=dev, generator=g).to(dtype)
    w = 0.2 * torch.randn(C, 1, 3, 3, device=dev, generator=g)
    cases = {}
    for name, fn, fmt in (("eager NCHW", relu_depthwise_reference, torch.contiguous_format),
                          ("eager channels_last", relu_depthwise_reference, torch.channels_last),
                          ("fused", relu_depthwise, torch.contiguous_format)):
        xl, wl = x.contiguous(memory_format=fmt).requires_grad_(), w.clone().requires_grad_()
        cases[name] = (lambda fn=fn, xl=xl, wl=wl: fn(xl, wl, s), [xl, wl])
    el = torch.finfo(dtype).bits // 8
    i, o = N * C * H * H, N * C * out_size(H, s) ** 2
    return cases, {"fwd": (i + o) * el, "bwd": (2 * i + o) * el}  # bwd: x and the grad read, dx written


def relu_depthwise_pair_cases(N, C, H, s, dtype, dev):
    """Both sep convs' second stages (3×3 of one input, 5×5 of another, stride 1 at the edge's output size): one
    launch each way."""
    from milenas_fast.ops.stencil import relu_depthwise_pair, relu_depthwise_reference

    g = torch.Generator(device=dev).manual_seed(0)
    o = out_size(H, s)  # the second stages run at the edge's output size
    xs = [torch.randn(N, C, o, o, device=dev, generator=g).to(dtype) for _ in range(2)]
    ws = [0.2 * torch.randn(C, 1, k, k, device=dev, generator=g) for k in (3, 5)]

    def twice(x3, w3, x5, w5):
        return relu_depthwise_reference(x3, w3), relu_depthwise_reference(x5, w5)

    cases = {}
    for name, fn, fmt in (("eager NCHW", twice, torch.contiguous_format),
                          ("eager channels_last", twice, torch.channels_last),
                          ("fused", relu_depthwise_pair, torch.contiguous_format)):
        x3, x5 = (x.contiguous(memory_format=fmt).requires_grad_() for x in xs)
        w3, w5 = (w.clone().requires_grad_() for w in ws)
        cases[name] = (lambda fn=fn, lv=(x3, w3, x5, w5): fn(*lv), [x3, w3, x5, w5])
    e = N * C * o * o * (torch.finfo(dtype).bits // 8)
    return cases, {"fwd": 4 * e, "bwd": 6 * e}  # fwd: 2 in, 2 out; bwd: 2 x and 2 grads read, 2 dx written


def pointwise_cases(N, C, H, s, dtype, dev):
    """The conv candidates' four first 1×1 convolutions (C → C, the stride's output size): one grouped launch
    each way vs four convolutions."""
    from milenas_fast.ops.pointwise import pointwise, pointwise_reference

    g = torch.Generator(device=dev).manual_seed(0)
    o = out_size(H, s)
    xs = [torch.randn(N, C, o, o, device=dev, generator=g).to(dtype) for _ in range(4)]
    ws = [0.2 * torch.randn(C, C, 1, 1, device=dev, generator=g) for _ in range(4)]
    cases = {}
    for name, fn, fmt in (("eager NCHW", pointwise_reference, torch.contiguous_format),
                          ("eager channels_last", pointwise_reference, torch.channels_last),
                          ("fused", pointwise, torch.contiguous_format)):
        xl = [x.contiguous(memory_format=fmt).requires_grad_() for x in xs]
        wl = [w.clone().requires_grad_() for w in ws]
        cases[name] = (lambda fn=fn, xl=xl, wl=wl: fn(xl, wl), xl + wl)
    e = N * C * o * o * (torch.finfo(dtype).bits // 8)
    return cases, {"fwd": 8 * e, "bwd": 12 * e}  # fwd: 4 in, 4 out; bwd: 4 grads + 4 x read, 4 dx written


def edge_reduce_cases(N, C, H, s, dtype, dev):
    from milenas_fast.ops import edge_reduce, edge_reduce_reference

    HO = out_size(H, s)
    g = torch.Generator(device=dev).manual_seed(0)
    y = torch.randn(K_EDGE, N, C, HO, HO, device=dev, generator=g).to(dtype)
    var, mean = torch.var_mean(y.float(), dim=(1, 3, 4), unbiased=False)
    rstd = (var + 1e-5).rsqrt()
    w = torch.softmax(torch.randn(K_EDGE, device=dev, generator=g), 0)
    cases = {}
    for name, fn in (("eager NCHW", edge_reduce_reference), ("fused", edge_reduce)):
        cases[name] = _edge_reduce_case(fn, y, w, mean, rstd)
    cases.update(edge_reduce_triton_case(y, w, mean, rstd))
    el = torch.finfo(dtype).bits // 8
    o = N * C * HO * HO
    return cases, {"fwd": (K_EDGE + 1) * o * el, "bwd": (2 * K_EDGE + 1) * o * el}


def edge_reduce_triton_case(y, w, mean, rstd) -> dict:
    """edge_reduce's Triton kernels (what runs on GPUs where the extension has no CUDA kernels), next to the
    C++/CUDA op ("fused"); {} where Triton cannot import it."""
    try:
        from milenas_fast.ops.edge_reduce_triton import edge_reduce_triton
    except Exception as e:  # noqa: BLE001 - a missing/broken Triton just drops the row
        print(f"edge_reduce Triton edge_reduce skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return {}
    return {"Triton edge_reduce": _edge_reduce_case(edge_reduce_triton, y, w, mean, rstd)}


def _edge_reduce_case(fn, y, w, mean, rstd):
    """(call, leaves): fn over the rows of y as K separate candidates (the ops take a list, as the fused
    MixedOp hands them over)."""
    leaves = [*(t.clone().requires_grad_() for t in y), *(t.clone().requires_grad_() for t in (w, mean, rstd))]
    k = y.shape[0]
    return (lambda: fn(leaves[:k], *leaves[k:])), leaves


def mixed_op_cases(N, C, H, s, dtype, dev, alpha_only=False):
    from milenas_fast.space.mixed_op import FusedMixedOp, ReferenceMixedOp

    torch.manual_seed(0)
    ref = ReferenceMixedOp(C, s).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, C, H, H, device=dev, generator=g)
    a = torch.softmax(1e-3 * torch.randn(8, device=dev, generator=g), 0)
    autocast = dtype != torch.float32
    cases = {}
    for name, cls, fmt in (("eager NCHW", ReferenceMixedOp, torch.contiguous_format),
                           ("eager channels_last", ReferenceMixedOp, torch.channels_last),
                           ("fused", FusedMixedOp, torch.contiguous_format)):
        m = cls(C, s).to(dev)
        m.load_state_dict(ref.state_dict())
        m = m.to(memory_format=fmt)
        xi = x.contiguous(memory_format=fmt).requires_grad_(not alpha_only)
        ai = a.clone().requires_grad_()
        leaves = [ai] if alpha_only else [xi, ai, *m.parameters()]

        def fwd(m=m, xi=xi, ai=ai):
            with torch.autocast(dev, dtype=dtype, enabled=autocast):
                return m(xi, ai)

        cases[name] = (fwd, leaves)
    return cases, {}


# The benchmark table: one entry per op, name → case builder (N, C, H, stride, dtype, device) → (cases, bytes).
# Each (op, shape, stride) runs on its own: a failure is recorded as an error row and the others go on. The
# whole MixedOp first: a time-limited run (gpu_check.sh) that is cut short still has the target.
OPS = {"mixed_op": mixed_op_cases, "mixed_op(α-only bwd)": lambda *a: mixed_op_cases(*a, alpha_only=True),
       "stencil": stencil_cases, "stencil_group": stencil_group_cases, "pointwise": pointwise_cases, "relu_depthwise_pair": relu_depthwise_pair_cases,
       "relu_depthwise": relu_depthwise_cases, "edge_reduce": edge_reduce_cases}


def as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def measure(timer, fwd, leaves):
    outs = as_list(fwd())
    grads = [torch.randn_like(o) for o in outs]

    def bwd():
        torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True)

    def fwd_bwd():
        torch.autograd.grad(as_list(fwd()), leaves, grads, allow_unused=True)

    res = {"fwd": timer(fwd), "bwd": timer(bwd), "fwd+bwd": timer(fwd_bwd)}
    del outs
    return res, timer.peak_mib(fwd_bwd)


# --- main --------------------------------------------------------------------------------------------

def environment(dev):
    import triton

    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda or "none"}


FIELDS = ["date", "gpu", "torch", "triton", "cuda", "op", "N", "C", "H", "stride", "dtype", "phase", "config",
          "median_ms", "p20_ms", "p80_ms", "gbps", "peak_mib", "speedup_vs_best_eager", "error"]


def bench_case(op, N, C, H, s, dtype, dev, timer) -> list[dict]:
    """All phases × configurations of one op at one shape: rows without the common columns."""
    cases, nbytes = OPS[op](N, C, H, s, dtype, dev)
    results = {name: measure(timer, *case) for name, case in cases.items()}
    rows = []
    for phase in ("fwd", "bwd", "fwd+bwd"):
        eager = {k: v for k, v in results.items() if k.startswith("eager")}
        best = min(eager, key=lambda k: eager[k][0][phase][0])
        for name, (times, peak) in results.items():
            med, p20, p80 = times[phase]
            b = sum(nbytes.values()) if phase == "fwd+bwd" else nbytes.get(phase)
            gbps = b / (med * 1e-3) / 1e9 if b else None
            speedup = results[best][0][phase][0] / med if not name.startswith("eager") else None
            rows.append(dict(phase=phase, config=name, best=name == best, median_ms=f"{med:.5f}",
                             p20_ms=f"{p20:.5f}", p80_ms=f"{p80:.5f}", gbps=f"{gbps:.1f}" if gbps else "",
                             peak_mib=f"{peak:.1f}", speedup_vs_best_eager=f"{speedup:.3f}" if speedup else ""))
    return rows


def print_row(r: dict) -> None:
    if r.get("error"):
        print(f"{r['op']:<21}{r['C']:>4}{r['H']:>4}{r['stride']:>3} ERROR {r['error']}", flush=True)
        return
    sp = f"{float(r['speedup_vs_best_eager']):.2f}x" if r["speedup_vs_best_eager"] else ""
    label = r["config"] + (" *" if r["best"] else "")
    print(f"{r['op']:<21}{r['C']:>4}{r['H']:>4}{r['stride']:>3} {r['phase']:<8}{label:<21}"
          f"{float(r['median_ms']):>10.4f}{r['p20_ms'][:8] + '-' + r['p80_ms'][:8]:>22}{r['gbps'] or '-':>8}"
          f"{r['peak_mib']:>10}{sp:>9}", flush=True)


def append_csv(path: Path | None, rows: list[dict]) -> None:
    if path is None:
        return
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run: fewer repetitions, stride 1 shapes only")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32",
                    help="kernel input dtype; for mixed_op the autocast dtype (fp32 = no autocast)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of: {', '.join(OPS)}")
    ap.add_argument("--csv", default=None, help="append rows here (default benchmarks/kernels.csv on a GPU)")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported
        dev, shapes, N, timer = "cpu", [(4, 8)], 2, CpuTimer()
    elif not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU present; nothing to benchmark.")
        return 0
    else:
        dev, shapes, N = "cuda", SHAPES, 64
        timer = CudaTimer(*((5, 20) if args.quick else (25, 200)))
        torch.backends.cudnn.benchmark = True  # the eager baseline at its best
    csv_path = Path(args.csv) if args.csv else (None if args.cpu_smoke else ROOT / "benchmarks" / "kernels.csv")
    strides = (1,) if args.quick else (1, 2)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        ap.error(f"unknown --ops {unknown}; known: {', '.join(OPS)}")
    env = environment(dev)
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
          f"dtype {args.dtype} | N={N}")
    common = dict(date=dt.datetime.now().isoformat(timespec="seconds"), **env, N=N, dtype=args.dtype)
    hdr = f"{'op':<21}{'C':>4}{'H':>4}{'s':>3} {'phase':<8}{'config':<21}{'median ms':>10}{'p20-p80 ms':>22}" \
          f"{'GB/s':>8}{'peak MiB':>10}{'vs eager':>9}"
    print(hdr)
    print("-" * len(hdr), flush=True)
    n_rows = n_errors = 0
    for op in ops:
        for C, H in shapes:
            for s in strides:
                where = dict(common, op=op, C=C, H=H, stride=s)
                try:
                    rows = [dict(where, **r) for r in bench_case(op, N, C, H, s, DTYPES[args.dtype], dev, timer)]
                except Exception as e:  # one failing op must not hide the others
                    traceback.print_exc()
                    n_errors += 1
                    rows = [dict(where, error=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")]
                for r in rows:
                    print_row(r)
                append_csv(csv_path, rows)
                n_rows += len(rows)
                if dev == "cuda":
                    torch.cuda.empty_cache()
    print("(* = best eager configuration, the baseline of 'vs eager'; peak MiB is per fwd+bwd)")
    if csv_path:
        print(f"appended {n_rows} rows to {csv_path}" + (f" ({n_errors} errors)" if n_errors else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
