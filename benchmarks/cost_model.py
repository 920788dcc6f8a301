"""A cost model of one GPU search iteration, computed on a CPU: a MODEL, not a measurement.

The real search iteration (milenas_fast.search.step: `search_step`, or `fused_search_step` for
--shared_train_pass) runs on the default supernet under FakeTensorMode: shapes and dtypes only, no memory,
no compute. A TorchDispatchMode records every dispatched op and counts, per iteration:

  kernels      ops that launch device work. Views, allocations and metadata ops launch nothing. One
               launch per ATen op, except: convolution_backward launches one per requested gradient,
               slice_backward, select_backward and constant_pad_nd two (a fill and a copy),
               a foreach op launches as many as CUDA's multi_tensor_apply needs (≤ 110/64/48/36/30
               tensors for 1-5 lists, ≤ 320 blocks of 65536 elements per launch), one of our Triton
               ops is decomposed into its Triton launches (one each, reported by ops/triton_launch.py to this
               dispatch mode) and the ATen ops its body runs (partial sums, casts), and the C++ edge_reduce
               ops count the launches they state (ops/costs.py: csrc/cuda/edge_reduce.cu's).
               cuDNN and ATen's BatchNorm may launch several kernels per op: eager counts are low estimates.
  gflop        torch.utils.flop_counter's formulas (convolutions and matmuls) plus what each custom op states
               (ops/costs.py) and ours for grouped convolutions' backward (flop_counter counts their weight gradient
               `groups` times too high: 628 instead of 258 GFLOP for eager-fp32).
  gbytes       each kernel's inputs + outputs, no credit for caches: an upper estimate of HBM traffic
               (a Triton launch counts each buffer it is passed once).
  saved_gbytes the peak of the live bytes saved for backward (torch.autograd.graph.saved_tensors_hooks;
               storages counted once; weights and buffers, resident anyway, not counted).

The projection (per kernel a roofline, then launch costs; the whole search = 50 epochs × (391 iterations
+ 391 validation forwards), 390 iterations with CUDA graphs, which drop the partial batch):

  kernel time  max(bytes / bandwidth, flops / rate); rate: bf16/fp16 convolutions and matmuls on tensor
               cores, fp32 convolutions as TF32 (cuDNN's default), depthwise convolutions, the stencil
               and fp32 matmuls on the FP32 FMA units. Peak rates, no efficiency factor: optimistic for
               compute, pessimistic for traffic (no cache reuse).
  eager        max(kernels × 5 µs of CPU dispatch + launch, Σ (kernel time + 1.5 µs))
  CUDA graph   Σ (kernel time + 1.5 µs): the CPU launches the graph once, kernels still run back to back.

Rates (dense, SXM boards):
  H100: 3.35 TB/s HBM3; 989.4 TFLOP/s bf16 tensor cores; 494.7 TF32; 66.9 FP32
        (https://glennklockwood.com/garden/processors/h100, NVIDIA's H100 datasheet figures)
  H200: 4.8 TB/s HBM3e; the same GH100 compute (https://lzwjava.github.io/nvidia-h200-gpu-specs-en,
        https://openmetal.io/resources/blog/how-the-h200-is-built-for-memory-bound-ai-workloads/)
Launch costs: ≈5 µs per eager op (PyTorch dispatch + cudaLaunchKernel; PERF.md measures 5-10 µs) and
≈1.5 µs per kernel inside a graph (https://developer.nvidia.com/blog/cuda-graphs/,
https://pytorch.org/blog/accelerating-pytorch-with-cuda-graphs/); assumptions, stated here to be replaced
by measurements.

The fake tensors live on a fake *CPU* device: torch 2.14 cannot run backward through fake CUDA tensors
without a GPU (the autograd engine queries the CUDA context). What would differ on CUDA is put back for
the run (see `_as_on_cuda`): DepthwiseConv2d's CPU-only backward is off, foreach kernels are used as on
CUDA (clipping, and both optimisers, built as search/loop.py builds them plus foreach=True, torch's
default for CUDA tensors), the fused path is selected. Autocast is CPU's bf16 autocast, which casts the
same ops here (convolutions, linear). Optimiser state is pre-filled so the recorded iteration is a
steady-state one. Modes with "fused" use the CUDA graph launch cost; eager modes the eager one.
Not modelled: data loading and augmentation, host syncs, cuDNN algorithm choice, caches.

    python benchmarks/cost_model.py [--C 16 --layers 8 --batch 64 --size 32] [--modes a,b] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from milenas_fast.ops import costs  # noqa: E402
from milenas_fast.precision import Precision  # noqa: E402
from milenas_fast.search.step import StepRule, fused_search_step, search_step  # noqa: E402
from milenas_fast.space import primitives  # noqa: E402
from milenas_fast.space.mixed_op import ReferenceMixedOp, set_impl  # noqa: E402
from milenas_fast.space.supernet import Network  # noqa: E402

EPOCHS, ITERS, VALID_BATCHES = 50, 391, 391
EAGER_LAUNCH_S, GRAPH_GAP_S = 5e-6, 1.5e-6


@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float  # bytes/s
    tensor_core: float  # bf16/fp16 dense FLOP/s
    tf32: float
    fp32: float


GPUS = (Gpu("h100", 3.35e12, 989.4e12, 494.7e12, 66.9e12), Gpu("h200", 4.8e12, 989.4e12, 494.7e12, 66.9e12))

# name: (MixedOp implementation, bf16 autocast, --shared_train_pass, launch)
MODES = {
    "eager-fp32": ("reference", False, False, "eager"),
    "eager-bf16": ("reference", True, False, "eager"),
    "fused-fp32": ("fused", False, False, "graph"),
    "fused-bf16": ("fused", True, False, "graph"),
    "fused-bf16-sharedpass": ("fused", True, True, "graph"),
}
CLASSES = ("depthwise", "pointwise", "batchnorm", "pooling", "elementwise", "reductions", "optimiser",
           "copies", "other")
# issue 9's targets for fused-bf16 with CUDA graphs against eager-fp32
TARGETS = {"kernels": 8.0, "gbytes": 4.0, "saved_gbytes": 2.0}
TARGET_MINUTES_H100 = 10.0

_aten = torch.ops.aten
_prim_device = torch.ops.prim.device.default
NO_KERNEL = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
             _aten.new_empty.default, _aten.new_empty_strided.default, _aten.lift_fresh.default,
             _aten._local_scalar_dense.default,  # .item() of a CPU scalar (Adam's step count lives on the CPU)
             _aten.set_.source_Storage_storage_offset, _aten.resize_.default, _aten._unsafe_view.default}
# ATen ops that launch a fill and a copy on CUDA (zeros, then the gradient or input copied into a slice)
TWO_LAUNCHES = {"aten::slice_backward": 2, "aten::select_backward": 2, "aten::constant_pad_nd": 2}
POOLING = {"max_pool2d_with_indices", "max_pool2d_with_indices_backward", "avg_pool2d", "avg_pool2d_backward",
           "_adaptive_avg_pool2d", "_adaptive_avg_pool2d_backward"}
REDUCTIONS = {"sum", "mean", "var_mean", "var", "std", "norm", "linalg_vector_norm", "amax", "amin", "max",
              "min", "prod", "_foreach_norm"}
COPIES = {"copy_", "_to_copy", "clone", "cat", "stack", "constant_pad_nd", "zeros", "zeros_like", "ones",
          "ones_like", "full", "fill_", "zero_", "new_zeros", "new_ones", "slice_backward", "select_backward",
          "index_select", "index", "scalar_tensor"}
# multi_tensor_apply (ATen's foreach): tensors per launch by the number of tensor lists, blocks per launch
FOREACH_TENSORS, FOREACH_BLOCKS, FOREACH_CHUNK = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}, 320, 65536


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _tensors(t)
    elif isinstance(tree, dict):
        for t in tree.values():
            yield from _tensors(t)


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches in `t`: its elements, at most its storage (expanded tensors repeat)."""
    n = t.numel() * t.element_size()
    try:
        return min(n, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return n


def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


def _aten_flops(func, args, kwargs, out) -> int:
    if func is _aten.convolution_backward.default and args[-2] > 1:
        # flop_counter's weight-gradient formula ignores `groups` (it counts a depthwise weight gradient
        # C times too high); each requested gradient of a grouped convolution costs what its forward does
        grad_out, x, w = args[:3]
        fwd = 2 * grad_out.numel() * w.shape[1] * math.prod(w.shape[2:])
        return fwd * sum(bool(m) for m in args[-1][:2])
    fc = flop_registry.get(func._overloadpacket)
    return fc(*args, **kwargs, out_val=out) if fc is not None else 0


def _foreach_launches(args, out) -> int:
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        lists.append(out)
    if not lists:
        return 1
    n = len(lists[0])
    chunks = sum(-(-t.numel() // FOREACH_CHUNK) for t in lists[0])
    per_launch = FOREACH_TENSORS.get(len(lists), 30)
    return max(1, -(-n // per_launch), -(-chunks // FOREACH_BLOCKS))


# --- one recorded kernel group --------------------------------------------------------------------------
@dataclass
class Tally:
    kernels: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    seconds: dict = field(default_factory=dict)  # gpu name -> Σ roofline seconds

    def add(self, kernels, flops, nbytes, seconds):
        self.kernels += kernels
        self.flops += flops
        self.bytes += nbytes
        for g, s in seconds.items():
            self.seconds[g] = self.seconds.get(g, 0.0) + s


def _roofline(flops: float, nbytes: float, unit: str) -> dict:
    out = {}
    for g in GPUS:
        rate = {"tensor": g.tensor_core, "tf32": g.tf32}.get(unit, g.fp32)
        out[g.name] = max(nbytes / g.bandwidth, flops / rate if flops else 0.0)
    return out


def _is_depthwise(func, args) -> bool:
    w = args[2] if func is _aten.convolution_backward.default else args[1]
    groups = args[8] if func is _aten.convolution.default else args[9]
    return groups > 1 and w.shape[1] == 1


class Recorder(TorchDispatchMode):
    """Counts kernels, FLOPs and bytes by op class; sits above FakeTensorMode."""

    def __init__(self):
        super().__init__()
        self.by_class: dict[str, Tally] = defaultdict(Tally)
        self._scopes: list[str] = []  # profiler record_function names (Optimizer.step#…) and our own
        self._custom: list[str] = []  # the custom op being decomposed
        self._pending_flops = 0

    @contextlib.contextmanager
    def scope(self, name: str):
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def _class_of(self, func, args) -> tuple[str, str]:
        """(op class, compute unit)"""
        if any(s.startswith("Optimizer.") or s == "optimiser" for s in self._scopes):
            return "optimiser", "fp32"
        if self._custom:
            op = self._custom[-1]
            if "pointwise" in op:  # tl.dot: tensor cores for bf16/fp16, TF32 for fp32 (as cuDNN)
                low = any(t.dtype in (torch.bfloat16, torch.float16) for t in _tensors(args))
                return "pointwise", "tensor" if low else "tf32"
            return ("depthwise" if "stencil" in op else "batchnorm"), "fp32"
        name = func._schema.name.split("::")[-1]
        if name in ("convolution", "convolution_backward"):
            ref = args[0] if name == "convolution" else args[1]
            if _is_depthwise(func, args):
                return "depthwise", "fp32"
            w = args[2] if name == "convolution_backward" else args[1]
            unit = "tensor" if ref.dtype in (torch.bfloat16, torch.float16) else "tf32"
            return ("pointwise" if tuple(w.shape[2:]) == (1, 1) else "other"), unit
        if name in ("mm", "addmm", "bmm"):
            return "other", "tensor" if args[-1].dtype in (torch.bfloat16, torch.float16) else "fp32"
        if "batch_norm" in name:
            return "batchnorm", "fp32"
        if name in POOLING:
            return "pooling", "fp32"
        if name in REDUCTIONS:
            return "reductions", "fp32"
        if name in COPIES:
            return "copies", "fp32"
        if torch.Tag.pointwise in func.tags or name.startswith("_foreach_"):
            return "elementwise", "fp32"
        return "other", "fp32"

    def _record(self, func, args, kernels, flops, tensors):
        cls, unit = self._class_of(func, args)
        nbytes = float(sum(_nbytes(t) for t in tensors))
        self.by_class[cls].add(kernels, flops, nbytes, _roofline(flops, nbytes, unit))

    def record_triton_launch(self, kwargs):
        seen, tensors = set(), []
        for t in _tensors(kwargs):  # each buffer once: absent optional inputs are passed as aliases
            if _storage_key(t) not in seen:
                seen.add(_storage_key(t))
                tensors.append(t)
        flops, self._pending_flops = self._pending_flops, 0
        self._record(None, tensors, 1, flops, tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _prim_device:  # asked ~2× per op by the dispatcher: answer without a fake dispatch
            return args[0].device
        kwargs = kwargs or {}
        ns = func.namespace
        if ns == "profiler":
            if func is torch.ops.profiler._record_function_enter_new.default:
                self._scopes.append(args[0])
            elif self._scopes:
                self._scopes.pop()
            return func(*args, **kwargs)
        if ns == "prim" or func in NO_KERNEL or func.is_view:
            return func(*args, **kwargs)
        name = func._schema.name
        if ns == "milenas_fast":
            return self._custom_op(name, func, args, kwargs)
        out = func(*args, **kwargs)
        outs = [*_tensors(out)]
        if not outs and not func._schema.is_mutable:  # dtype/shape queries (promote_types, …)
            return out
        if func is _aten.convolution_backward.default:
            kernels = sum(bool(m) for m in args[-1])
        elif name.startswith("aten::_foreach_"):
            kernels = _foreach_launches(args, out)
        else:
            kernels = TWO_LAUNCHES.get(name, 1)
        flops = _aten_flops(func, args, kwargs, out)
        self._record(func, args, kernels, flops, [*_tensors(args), *_tensors(kwargs), *outs])
        return out

    def _custom_op(self, name, func, args, kwargs):
        from torch._library.custom_ops import OPDEFS

        flops = costs.flops(name, args, kwargs)  # each op states its own
        self._custom.append(name)
        try:
            if name in OPDEFS:
                # one of our Triton ops: run its Python body under this mode, so that its ATen ops and its
                # launches (ops/triton_launch.py reports them to `record_triton_launch`) are counted one by one;
                # the op's FLOPs go with its first launch
                self._pending_flops = flops
                with self:
                    return OPDEFS[name]._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)  # a C++ op: its registered fake kernel gives the output shapes
            self._record(func, args, costs.launches(name, args, kwargs), flops, [*_tensors(args), *_tensors(out)])
            return out
        finally:
            self._custom.pop()


class SavedBytes:
    """Peak of the live bytes saved for backward (each storage once; weights and buffers excluded)."""

    def __init__(self, resident: set):
        self.resident, self.live, self.peak = resident, {}, 0
        self.total = 0

    def _release(self, key):
        n, size = self.live[key]
        if n == 1:
            del self.live[key]
            self.total -= size
        else:
            self.live[key] = (n - 1, size)

    def pack(self, t):
        key = _storage_key(t)
        if key in self.resident:
            return t
        n, size = self.live.get(key, (0, t.untyped_storage().nbytes()))
        if n == 0:
            self.total += size
            self.peak = max(self.peak, self.total)
        self.live[key] = (n + 1, size)
        handle = _Handle(t)
        weakref.finalize(handle, self._release, key)
        return handle

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Handle) else h


class _Handle:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


@contextlib.contextmanager
def _as_on_cuda(recorder: Recorder):
    """Make the fake-CPU iteration take the paths it takes on CUDA (see the module docstring)."""
    import torch.utils._foreach_utils as foreach_utils
    from milenas_fast.ops import bn_fold, stencil  # noqa: F401  (kernels imported before TRITON_INTERPRET is set)

    clip = torch.nn.utils.clip_grad_norm_

    def clip_in_scope(*a, **k):
        with recorder.scope("optimiser"):
            return clip(*a, **k)

    env = {"TRITON_INTERPRET": "1"}  # lets select.py pick the fused path for (fake) CPU tensors
    with mock.patch.object(primitives.DepthwiseConv2d, "forward", nn.Conv2d.forward), \
            mock.patch.object(foreach_utils, "_foreach_supported_types", [torch.Tensor, FakeTensor]), \
            mock.patch.object(torch.nn.utils, "clip_grad_norm_", clip_in_scope), \
            mock.patch.dict(os.environ, env):
        yield


def _steady_state(w_opt: torch.optim.SGD, a_opt: torch.optim.Adam) -> None:
    """Optimiser state as after the first iteration, so the recorded iteration is a steady-state one."""
    for group in w_opt.param_groups:
        for p in group["params"]:
            w_opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    for group in a_opt.param_groups:
        for p in group["params"]:
            a_opt.state[p].update(step=torch.tensor(1.0), exp_avg=torch.zeros_like(p),
                                  exp_avg_sq=torch.zeros_like(p))


def _summary(by_class: dict) -> Tally:
    tot = Tally()
    for t in by_class.values():
        tot.add(t.kernels, t.flops, t.bytes, t.seconds)
    return tot


def run(C=16, layers=8, batch=64, size=32, modes=tuple(MODES), steps=4) -> dict:
    """Records one iteration (and one validation forward) per mode; returns the model's numbers.
    `steps` (nodes per cell, 4 in DARTS) only shrinks the network for tests."""
    t0 = time.perf_counter()
    result = {"note": "a model, not a measurement",
              "config": {"C": C, "layers": layers, "batch": batch, "size": size, "steps": steps},
              "assumptions": {"eager_launch_us": EAGER_LAUNCH_S * 1e6, "graph_gap_us": GRAPH_GAP_S * 1e6,
                              "gpus": {g.name: {"tb_s": g.bandwidth / 1e12, "bf16_tflop_s": g.tensor_core / 1e12,
                                                "tf32_tflop_s": g.tf32 / 1e12, "fp32_tflop_s": g.fp32 / 1e12}
                                       for g in GPUS}},
              "modes": {}}
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = Recorder()
    with fake, _as_on_cuda(recorder):
        torch.manual_seed(0)
        model = Network(C, 10, layers, steps=steps, multiplier=steps, mixed_op=ReferenceMixedOp)
        model.train()
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        xv, yv = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        w_opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4, foreach=True)
        a_opt = torch.optim.Adam(model.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3,
                                 foreach=True)
        _steady_state(w_opt, a_opt)
        resident = {_storage_key(t) for t in [*model.parameters(), *model.buffers(), *model.arch_parameters()]}
        for name in modes:
            impl, amp, train_step, launch = MODES[name]
            set_impl(model, impl)
            prec = Precision(torch.device("cpu"), amp)
            step = fused_search_step if train_step else search_step
            recorder.by_class = defaultdict(Tally)
            saved = SavedBytes(resident)
            with recorder, torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                step(model, (x, y), (xv, yv), w_opt, a_opt, StepRule(), prec)
            it = dict(recorder.by_class)
            recorder.by_class = defaultdict(Tally)
            model.eval()
            with recorder, torch.no_grad(), prec.autocast():
                model(xv)
            model.train()
            result["modes"][name] = _project(name, launch, it, _summary(recorder.by_class), saved.peak)
    result["targets"] = targets(result)
    result["cpu_seconds"] = time.perf_counter() - t0
    return result


def run_jobs(jobs: int, C, layers, batch, size, modes: tuple, steps) -> dict:
    """`run` with the modes shared among `jobs` forked processes (each builds its own fake supernet)."""
    if jobs <= 1 or len(modes) <= 1:
        return run(C, layers, batch, size, modes, steps)
    import concurrent.futures
    import multiprocessing

    t0 = time.perf_counter()
    groups = [modes[i::jobs] for i in range(min(jobs, len(modes)))]
    with concurrent.futures.ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("fork")) as ex:
        parts = list(ex.map(run, *zip(*[(C, layers, batch, size, g, steps) for g in groups])))
    result = parts[0]
    found = {k: v for p in parts for k, v in p["modes"].items()}
    result["modes"] = {m: found[m] for m in modes}
    result["targets"] = targets(result)
    result["cpu_seconds"] = time.perf_counter() - t0
    return result


def _iteration_seconds(tot: Tally, gpu: str, launch: str) -> float:
    gpu_s = tot.seconds.get(gpu, 0.0) + tot.kernels * GRAPH_GAP_S
    return max(tot.kernels * EAGER_LAUNCH_S, gpu_s) if launch == "eager" else gpu_s


def _project(name, launch, by_class, valid: Tally, saved_peak) -> dict:
    tot = _summary(by_class)
    out = {"launch": launch, "kernels": tot.kernels, "gflop": tot.flops / 1e9, "gbytes": tot.bytes / 1e9,
           "saved_gbytes": saved_peak / 1e9, "valid_kernels": valid.kernels, "valid_gbytes": valid.bytes / 1e9}
    iters = ITERS - (launch == "graph")
    for g in GPUS:
        for how in ("eager", "graph"):
            out[f"ms_{g.name}_{how}"] = 1e3 * _iteration_seconds(tot, g.name, how)
        ms = out[f"ms_{g.name}_{launch}"]
        valid_ms = 1e3 * _iteration_seconds(valid, g.name, launch)
        out[f"projected_search_min_{g.name}"] = EPOCHS * (iters * ms + VALID_BATCHES * valid_ms) / 6e4
    out["classes"] = {c: {"kernels": t.kernels, "gflop": t.flops / 1e9, "gbytes": t.bytes / 1e9,
                          "ms_h100": 1e3 * t.seconds.get("h100", 0.0)}
                      for c, t in sorted(by_class.items(), key=lambda kv: CLASSES.index(kv[0]))}
    return out


def targets(result: dict) -> dict | None:
    """fused-bf16 (CUDA graphs) against eager-fp32, next to issue 9's targets."""
    m = result["modes"]
    if "eager-fp32" not in m or "fused-bf16" not in m:
        return None
    base, fast = m["eager-fp32"], m["fused-bf16"]
    out = {k: {"ratio": base[k] / fast[k] if fast[k] else math.inf, "target": f">= {v:g}x fewer"}
           for k, v in (("kernels", TARGETS["kernels"]), ("gbytes", TARGETS["gbytes"]))}
    out["saved_gbytes"] = {"ratio": fast["saved_gbytes"] / base["saved_gbytes"], "target": "<= 0.5 of eager"}
    out["projected_search_min_h100"] = {"value": fast["projected_search_min_h100"],
                                        "target": f"<= {TARGET_MINUTES_H100:g} min"}
    for k, v in out.items():
        if k in ("kernels", "gbytes"):
            v["met"] = v["ratio"] >= TARGETS[k]
        elif k == "saved_gbytes":
            v["met"] = v["ratio"] <= 1 / TARGETS[k]
        else:
            v["met"] = v["value"] <= TARGET_MINUTES_H100
    return out


def print_table(result: dict) -> None:
    cfg = result["config"]
    print(f"COST MODEL (a model, not a measurement): one search iteration, C={cfg['C']}, {cfg['layers']} cells, "
          f"batch {cfg['batch']}, {cfg['size']}x{cfg['size']}; counted on fake tensors, projected with peak "
          f"rates and {EAGER_LAUNCH_S * 1e6:g} us eager / {GRAPH_GAP_S * 1e6:g} us in-graph per kernel")
    print(f"\n{'mode':22} {'launch':6} {'kernels':>8} {'GFLOP':>7} {'GB':>7} {'saved GB':>8} "
          f"{'model ms/it H100':>16} {'H200':>6} {'model 50-ep H100':>16} {'H200':>9}")
    for name, r in result["modes"].items():
        print(f"{name:22} {r['launch']:6} {r['kernels']:8d} {r['gflop']:7.1f} {r['gbytes']:7.1f} "
              f"{r['saved_gbytes']:8.2f} {r['ms_h100_' + r['launch']]:16.1f} {r['ms_h200_' + r['launch']]:6.1f} "
              f"{r['projected_search_min_h100']:12.1f} min {r['projected_search_min_h200']:5.1f} min")
    print("\nper op class, model (kernels / GB / roofline ms on H100, launch costs not included):")
    names = list(result["modes"])
    print(f"{'class':12}" + "".join(f" {n:>22}" for n in names))
    for c in CLASSES:
        cells = []
        for n in names:
            t = result["modes"][n]["classes"].get(c)
            cells.append(f"{t['kernels']:6d} /{t['gbytes']:6.1f} /{t['ms_h100']:5.1f}" if t else "-")
        if any(cell != "-" for cell in cells):
            print(f"{c:12}" + "".join(f" {cell:>22}" for cell in cells))
    t = targets(result)
    if t:
        print("\nfused-bf16 (CUDA graphs) vs eager-fp32, model, against issue 9's targets:")
        for k, v in t.items():
            val = f"{v['ratio']:.2f}x" if "ratio" in v else f"{v['value']:.1f} min"
            print(f"  {k:26} {val:>10}   target {v['target']:18} {'met' if v['met'] else 'NOT met'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="nodes per cell (4 in DARTS; fewer for quick checks)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--jobs", type=int, default=1, help="processes to share the modes among (2 on 2 cores)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        print(f"cost_model: unknown mode(s) {bad or modes}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    if args.C < 2 or args.C % 2 or args.layers < 3 or args.batch < 2 or args.size < 4 or args.steps < 1 \
            or args.jobs < 1:
        print("cost_model: need --C even >= 2, --layers >= 3, --batch >= 2, --size >= 4, --steps >= 1, --jobs >= 1",
              file=sys.stderr)
        return 2
    result = run_jobs(args.jobs, args.C, args.layers, args.batch, args.size, tuple(modes), args.steps)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
        print(f"\n(model computed in {result['cpu_seconds']:.0f} s on this CPU, {args.jobs} process(es))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
