"""A whole MiLeNAS iteration — the α passes, the α (Adam) step, the weight pass, gradient clipping and the
weight (SGD) step — captured once in a CUDA graph and replayed every iteration (`--cuda_graphs`, on by
default when the device is CUDA). Eager PyTorch issues ~40,000 ATen ops per iteration and is launch-bound;
one replay removes that CPU cost (PERF.md, "What to fuse" 1).

How:
- The first WARMUP iterations run eagerly (`search_step` / `fused_search_step`) on a side stream: they
  are real iterations on real batches, and they initialise what capture must not (cuDNN autotuning,
  autograd's and the optimisers' lazy state, SGD's momentum buffers).
- The next iteration copies its batches into static input buffers, runs the graph body once eagerly (a
  real iteration; it warms the body's own code paths), then captures the body (capture executes nothing).
  From then on: copy the batches into the static buffers, replay.
- Gradients are written into fixed `.grad` buffers (autograd.grad results copied in), so the captured
  optimiser kernels always read the same memory.
- α: torch's Adam with `capturable=True` (its step counter lives on the GPU). The flag is switched on only
  while warming up and capturing, and back off afterwards, so checkpoints stay loadable on a CPU.
- Weights: the SGD update (weight decay, momentum, dampening, nesterov) as foreach ops inside the graph,
  reading the learning rate from a 0-d GPU tensor that `begin_epoch` refills from the optimiser's
  param_group (which the cosine scheduler keeps updating as usual). torch's SGD itself is not used in the
  graph because its foreach step turns a tensor lr into a host scalar. Its momentum buffers ARE the
  optimiser's state (`w_optimizer.state[p]["momentum_buffer"]`), so checkpoints are unchanged.
- Gradient clipping: `clip_grad_norm_(foreach=True)` — no host sync, capturable.
- BatchNorm running statistics are updated in place by the replayed kernels (train mode in all passes).
- Shapes are static: a partial batch cannot replay the graph. The search drops the partial last training
  batch of each epoch on this path (the train loader is built with drop_last: 390 instead of 391 steps at
  batch 64 over 25,000 images), and the validation stream skips the partial last batch of each of its
  passes. Documented in the README; the eager path keeps every batch.
- Not used with fp16 loss scaling (GradScaler's step needs host syncs) or with `--compile`; see `decide`.
- After `load_state_dict` (resume) the optimiser state tensors are new objects: `invalidate()` forces a
  new warm-up and capture.

GPU-only; written against torch's documented whole-network capture pattern (torch.cuda.graphs), checked
by tests/test_graphs.py on a CUDA machine. On a CPU device the search never builds it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..precision import Precision
from .step import StepRule, fused_search_step, search_step

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


class GraphedStep:
    def __init__(self, model, w_optimizer, a_optimizer, rule: StepRule, precision: Precision,
                 batch_size: int, fused_train_step: bool = False, warmup: int = WARMUP):
        if precision.scaler is not None:
            raise ValueError("CUDA graphs do not support fp16 loss scaling")
        if len(w_optimizer.param_groups) != 1 or len(a_optimizer.param_groups) != 1:
            raise ValueError("CUDA graph step expects one param group per optimiser")
        group = w_optimizer.param_groups[0]
        if group.get("maximize") or group.get("momentum", 0) == 0 and group.get("nesterov"):
            raise ValueError("unsupported SGD settings for the CUDA graph step")
        self.model, self.w_optimizer, self.a_optimizer = model, w_optimizer, a_optimizer
        self.rule, self.precision, self.batch_size = rule, precision, batch_size
        self.fused_train_step, self.warmup = fused_train_step, max(1, warmup)
        self.device = next(model.parameters()).device
        self.weights = [p for p in model.parameters() if p.requires_grad]
        self.neg_lr = torch.full((), -float(group["lr"]), device=self.device)
        self.invalidate()

    # --- bookkeeping ---------------------------------------------------------------------------------------
    def invalidate(self) -> None:
        """Forget the graph (after the optimisers' or the model's tensors were replaced, e.g. on resume)."""
        self.graph, self.static, self.outputs, self.calls = None, None, None, 0

    def begin_epoch(self, lr: float) -> None:
        """The cosine schedule: refill the graph's learning rate in place (outside any replay)."""
        self.neg_lr.fill_(-float(lr))

    def full(self, batch) -> bool:
        return batch is not None and batch[1].shape[0] == self.batch_size

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _set_adam_capturable(self, on: bool) -> None:
        for g in self.a_optimizer.param_groups:
            g["capturable"] = on
        if on:  # a resumed (or fresh-from-CPU) state keeps `step` on the CPU; capturable wants it on the GPU
            for a in self.model.arch_parameters():
                st = self.a_optimizer.state.get(a)
                if st and "step" in st and st["step"].device != a.device:
                    st["step"] = st["step"].to(a.device, torch.float32)

    def _autocast(self):
        # cache_enabled=False: autocast's weight-cast cache must not outlive a capture
        return torch.autocast("cuda", dtype=self.precision.dtype or torch.float32,
                              enabled=self.precision.dtype is not None, cache_enabled=False)

    # --- one iteration -----------------------------------------------------------------------------------
    def __call__(self, train_batch, next_valid=None):
        """One iteration. `next_valid` (a callable giving the next validation batch) is called only when the
        rule needs validation; partial validation batches are skipped. Returns (loss, logits); on the graph
        path they are the graph's static outputs (read them before the next call)."""
        valid_batch = None
        if next_valid is not None and any(w == "valid" for w, _ in self.rule.alpha_terms()):
            valid_batch = next_valid()
            while not self.full(valid_batch):
                valid_batch = next_valid()
        if not self.full(train_batch):
            raise ValueError(f"the CUDA graph step needs full batches of {self.batch_size} "
                             f"(got {train_batch[1].shape[0]}); build the train loader with drop_last")
        if self.graph is not None:
            self._copy_in(train_batch, valid_batch)
            self.graph.replay()
            return self.outputs
        if self.calls == 0:
            self._set_adam_capturable(True)
        self.calls += 1
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        if self.calls <= self.warmup:
            step = fused_search_step if self.fused_train_step else search_step
            with torch.cuda.stream(side):
                out = step(self.model, train_batch, valid_batch, self.w_optimizer, self.a_optimizer, self.rule,
                           self.precision)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        self._make_static(train_batch, valid_batch)
        with torch.cuda.stream(side):  # the real iteration for this batch, through the graph body
            self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        result = tuple(t.clone() for t in self.outputs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self._body()
        self.graph = graph
        self._set_adam_capturable(False)  # the captured kernels keep the GPU step counter; checkpoints stay portable
        return result

    def _make_static(self, train_batch, valid_batch) -> None:
        x, y = train_batch
        self.static = {"train": (x.clone(), y.clone())}
        if valid_batch is not None:
            self.static["valid"] = (valid_batch[0].clone(), valid_batch[1].clone())
        for p in self.weights:
            p.grad = torch.zeros_like(p)
        for a in self.model.arch_parameters():
            a.grad = torch.zeros_like(a)
        group = self.w_optimizer.param_groups[0]
        if group["momentum"] != 0:
            for p in self.weights:  # the eager warm-up steps created them; a fresh zero buffer is not the same
                st = self.w_optimizer.state[p]
                if st.get("momentum_buffer") is None:
                    raise RuntimeError("SGD momentum buffers missing after warm-up")
        self.outputs = None

    def _copy_in(self, train_batch, valid_batch) -> None:
        self.static["train"][0].copy_(train_batch[0], non_blocking=True)
        self.static["train"][1].copy_(train_batch[1], non_blocking=True)
        if valid_batch is not None:
            self.static["valid"][0].copy_(valid_batch[0], non_blocking=True)
            self.static["valid"][1].copy_(valid_batch[1], non_blocking=True)

    def _body(self):
        """The iteration as graph-safe ops on the static buffers (no host syncs, no allocation-dependent
        semantics). Returns (loss, logits) as tensors that persist in the graph's pool."""
        model, rule = self.model, self.rule
        alphas = model.arch_parameters()
        terms = dict(rule.alpha_terms())
        a_grads = [a.grad for a in alphas]
        for g in a_grads:
            g.zero_()
        x, y = self.static["train"]
        w_grads = None
        if self.fused_train_step:
            # one pass over the training batch gives ∇w and (if used) ∇α at the current α
            with self._autocast():
                logits = model(x)
            loss = model._criterion(logits.float(), y)
            inputs = self.weights + (list(alphas) if "train" in terms else [])
            grads = torch.autograd.grad(loss, inputs)
            w_grads = grads[:len(self.weights)]
            if "train" in terms:
                torch._foreach_add_(a_grads, list(grads[len(self.weights):]), alpha=terms["train"])
        for which, weight in rule.alpha_terms():
            if self.fused_train_step and which == "train":
                continue
            xs, ys = self.static[which]
            with self._autocast():
                loss_a = model._criterion(model(xs).float(), ys)
            torch._foreach_add_(a_grads, list(torch.autograd.grad(loss_a, alphas)), alpha=weight)
        self.a_optimizer.step()  # Adam, capturable: reads a.grad (the buffers above)
        if not self.fused_train_step:
            with self._autocast():
                logits = model(x)  # the updated α
            loss = model._criterion(logits.float(), y)
            w_grads = torch.autograd.grad(loss, self.weights)
        torch._foreach_copy_([p.grad for p in self.weights], list(w_grads))
        if rule.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.weights, rule.grad_clip, foreach=True)
        self._sgd()
        return loss.detach(), logits.detach()

    def _sgd(self) -> None:
        """torch.optim.SGD's update (one group) with the lr read from a GPU tensor."""
        group = self.w_optimizer.param_groups[0]
        params = self.weights
        grads = [p.grad for p in params]
        wd, mom, damp = group["weight_decay"], group["momentum"], group["dampening"]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if mom != 0:
            bufs = [self.w_optimizer.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, grads, alpha=1 - damp)
            grads = torch._foreach_add(grads, bufs, alpha=mom) if group["nesterov"] else bufs
        torch._foreach_add_(params, torch._foreach_mul(grads, self.neg_lr))
