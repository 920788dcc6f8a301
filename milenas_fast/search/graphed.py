"""A whole MiLeNAS iteration — α passes, α (Adam) step, weight pass, clipping, weight (SGD) step — captured
once in a CUDA graph and replayed every iteration (`--cuda_graphs`, on by default on a CUDA device). Eager
PyTorch issues ~40,000 ATen ops per iteration and is launch-bound; a replay removes that CPU cost (PERF.md,
"What to fuse" 1).

The graph body is `step.search_step` itself over static input buffers — no second copy of the algorithm.
- The first `warmup` iterations run `search_step` eagerly on a side stream: real iterations that initialise
  what capture must not (cuDNN autotuning, Triton autotuning, the optimisers' lazy state, SGD's momentum).
- The next iteration copies its batches into static buffers, runs the body once eagerly (the real
  iteration for that batch), then captures the body (capture executes nothing). From then on: copy the
  batches in, replay.
- While the body runs or is captured the optimisers are in *graph mode*: SGD fused, reading its learning
  rate from a 0-d device tensor (refilled from the param group, i.e. the scheduler, before every call);
  Adam capturable (its step counter on the device). Outside it they are untouched, so checkpoints and the
  eager loop never see a tensor lr or a capturable flag.
- `.grad` tensors and the outputs are allocated inside the capture (torch's whole-network pattern), so they
  live in the graph's pool at fixed addresses; BatchNorm running statistics update in place.
- Shapes are static: the train loader drops its partial last batch on this path, and at most one partial
  validation batch (the end of a pass) is skipped per call.
- Not used with fp16 loss scaling (host syncs) or with `--compile`; see `decide`.
- After the optimisers' or the model's tensors are replaced (resume, a guard restore) `invalidate()` forces
  a new warm-up and capture.

The capture mechanism is injectable: `CudaGraphs` is the real one; `EagerGraphs` "captures" by keeping the
body and "replays" by calling it, so CPU tests run every line of this path over the same static buffers.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch

from ..errors import ConfigError
from ..precision import Precision
from .step import StepRule, search_step

WARMUP = 3


def decide(cuda_graphs: bool, compile: bool, amp: bool, device: torch.device) -> tuple[bool, str]:
    """(whether the graphed iteration is used, why) — for the run log."""
    if not cuda_graphs:
        return False, "off (--no-cuda_graphs)"
    if device.type != "cuda":
        return False, f"ignored on {device.type}: CUDA graphs need a CUDA device (eager loop)"
    if compile:
        return False, "off: --compile is used instead"
    if amp and not torch.cuda.is_bf16_supported():
        return False, "off: fp16 loss scaling (GradScaler) needs host synchronisation every step"
    return True, f"on: whole iteration captured after {WARMUP} eager warm-up iterations; partial batches dropped"


class CudaGraphs:
    """The real mechanism: warm-up on a side stream, torch.cuda.graph capture, replay."""

    adam_capturable = True

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def side_stream(self):
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                yield
        finally:
            main.wait_stream(side)

    def capture(self, body):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()

        def replay():
            graph.replay()
            return out
        return replay


class EagerGraphs:
    """CPU stand-in: the "graph" is the body itself, called eagerly over the same static buffers. Adam's
    capturable mode is left off (torch supports it on accelerators only)."""

    adam_capturable = False

    def side_stream(self):
        return contextlib.nullcontext()

    def capture(self, body):
        return body


class GraphedStep:
    def __init__(self, model, w_optimizer, a_optimizer, rule: StepRule, precision: Precision,
                 batch_size: int, shared_train_pass: bool = False, warmup: int = WARMUP, graphs=None, watch=None):
        if precision.scaler is not None:
            raise ValueError("CUDA graphs do not support fp16 loss scaling")
        if len(w_optimizer.param_groups) != 1 or len(a_optimizer.param_groups) != 1:
            raise ValueError("CUDA graph step expects one param group per optimiser")
        self.model, self.w_optimizer, self.a_optimizer = model, w_optimizer, a_optimizer
        self.rule, self.precision, self.batch_size = rule, precision, batch_size
        self.shared_train_pass, self.warmup = shared_train_pass, max(1, warmup)
        self.watch = watch  # divergence.FiniteWatch: its flag is folded inside the graph too
        self.device = next(model.parameters()).device
        self.graphs = graphs if graphs is not None else CudaGraphs(self.device)
        self.lr = torch.zeros((), dtype=torch.float32, device=self.device)  # fused SGD's kernels read fp32
        self._lr_value = None
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the graph (after the optimisers' or the model's tensors were replaced)."""
        self.replay, self.static, self.calls = None, None, 0

    @property
    def captured(self) -> bool:
        return self.replay is not None

    @property
    def phase(self) -> str:
        """What the next call does: warmup | capture | replay."""
        return "replay" if self.captured else "warmup" if self.calls < self.warmup else "capture"

    def full(self, batch) -> bool:
        return batch[1].shape[0] == self.batch_size

    # --- one iteration -----------------------------------------------------------------------------------
    def __call__(self, train_batch, next_valid=None):
        """One iteration. `next_valid` (a callable giving the next validation batch) is called only when the
        rule needs validation. Returns (loss, logits); after capture they are the graph's static outputs
        (read them before the next call)."""
        if not self.full(train_batch):
            raise ValueError(f"the CUDA graph step needs full batches of {self.batch_size} "
                             f"(got {train_batch[1].shape[0]}); build the train loader with drop_last")
        valid_batch = self._full_valid(next_valid) if self.rule.uses("valid") else None
        lr = float(self.w_optimizer.param_groups[0]["lr"])
        if lr != self._lr_value:  # the scheduler moved: refill the tensor the graph reads (no host sync)
            self.lr.fill_(lr)
            self._lr_value = lr
        if self.replay is not None:
            self._copy_in(train_batch, valid_batch)
            return self.replay()
        self.calls += 1
        if self.calls <= self.warmup:
            with self.graphs.side_stream():
                return self._step(train_batch, valid_batch)
        x, y = train_batch
        self.static = {"train": (x.clone(), y.clone())}
        if valid_batch is not None:
            self.static["valid"] = (valid_batch[0].clone(), valid_batch[1].clone())
        with self.graphs.side_stream(), warnings.catch_warnings():
            # Adam warns when a capturable step runs uncaptured; this one eager run is meant
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            result = self._body()  # the real iteration for this batch; warms the graph-mode code paths
        self.replay = self.graphs.capture(self._body)
        return result

    def _full_valid(self, next_valid):
        batch = next_valid()
        if self.full(batch):
            return batch
        batch = next_valid()  # the partial end of a pass; the next pass starts with a full batch ...
        if not self.full(batch):  # ... unless the whole split is smaller than one batch
            raise ConfigError(f"the validation split ({batch[1].shape[0]} images) is smaller than one batch "
                              f"({self.batch_size}); the CUDA-graph step needs full batches")
        return batch

    def _copy_in(self, train_batch, valid_batch) -> None:
        for which, batch in (("train", train_batch), ("valid", valid_batch)):
            if batch is not None:
                for dst, src in zip(self.static[which], batch):
                    dst.copy_(src, non_blocking=True)

    def _step(self, train_batch, valid_batch):
        return search_step(self.model, train_batch, valid_batch, self.w_optimizer, self.a_optimizer, self.rule,
                           self.precision, self.shared_train_pass, self.watch)

    def _body(self):
        with self._graph_mode():
            return self._step(self.static["train"], self.static.get("valid"))

    @contextlib.contextmanager
    def _graph_mode(self):
        """The optimisers as capture needs them, restored afterwards (checkpoints stay portable): torch's
        foreach SGD turns a tensor lr into a host scalar, its fused SGD reads it on the device."""
        w, a = self.w_optimizer.param_groups[0], self.a_optimizer.param_groups[0]
        saved_w = {k: w[k] for k in ("lr", "fused", "foreach")}
        saved_capturable = a["capturable"]
        w.update(lr=self.lr, fused=True, foreach=False)
        if self.graphs.adam_capturable:
            a["capturable"] = True
            for p in a["params"]:  # a fresh or resumed state keeps `step` on the CPU; capturable wants it here
                st = self.a_optimizer.state.get(p)
                if st and st["step"].device != p.device:
                    st["step"] = st["step"].to(p.device, torch.float32)
        try:
            yield
        finally:
            w.update(saved_w)
            a["capturable"] = saved_capturable


def self_test(device: torch.device, graphs=None) -> str:
    """Capture and replay a tiny search iteration on `device` and compare it with the eager step: '' when
    they agree, else why not (one line). Leaves the global RNG untouched."""
    from ..space.mixed_op import ReferenceMixedOp
    from ..space.supernet import Network

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            model = Network(2, 10, 3, mixed_op=ReferenceMixedOp).to(device)  # 3 cells: normal and reduction α used
            ref = copy.deepcopy(model)
            batches = [(torch.randn(2, 3, 8, 8, device=device), torch.randint(0, 10, (2,), device=device))
                       for _ in range(6)]

            def optimisers(m):
                return (torch.optim.SGD(m.parameters(), 0.1, momentum=0.9, weight_decay=3e-4),
                        torch.optim.Adam(m.arch_parameters(), lr=0.01, betas=(0.5, 0.999), weight_decay=1e-3))

            rule, precision = StepRule(), Precision(device, False)
            graphed = GraphedStep(model, *optimisers(model), rule, precision, 2, warmup=1, graphs=graphs)
            w, a = optimisers(ref)
            for i in range(3):  # warm-up, capture, replay
                tr, va = batches[2 * i], batches[2 * i + 1]
                graphed(tr, lambda: va)
                search_step(ref, tr, va, w, a, rule, precision)
            got = list(model.parameters()) + model.arch_parameters() + list(model.buffers())
            want = list(ref.parameters()) + ref.arch_parameters() + list(ref.buffers())
            worst = max(float((g.detach().double() - e.detach().double()).abs().max()) for g, e in zip(got, want))
    except Exception as e:  # noqa: BLE001 — any failure means "do not use graphs here"
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    if not worst <= 1e-4:
        return f"replayed iteration differs from the eager one by {worst:.3g}"
    return ""
