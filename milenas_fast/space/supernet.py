"""The search supernet: Cell and Network with the model API DARTS-family code calls.

α (two [14, 8] tensors) is deliberately NOT registered as a parameter: `model.parameters()` are the
weights only (what SGD updates and what `param size` counts), `model.arch_parameters()` are α.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.fanout import fanout
from . import genotype as gt
from .mixed_op import MixedOp
from .mixing_weights import candidate_rows
from .running_stats import batched_running_stats
from .weight_cast import cast_once, conv_modules
from .primitives import PRIMITIVES, FactorizedReduce, ReLUConvBN


def num_edges(steps: int) -> int:
    return sum(2 + i for i in range(steps))


class Cell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, mixed_op=MixedOp):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        # Resident constants of the fused cells' fan-outs (ops/fanout.py), moved with the module, not in state_dict.
        self.register_buffer("_fan_ones", torch.ones(min(steps, 8), C), persistent=False)
        self.register_buffer("_fan_zeros", torch.zeros(min(steps, 8), C), persistent=False)
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(mixed_op(C, stride))

    def forward(self, s0, s1, weights, indices=None, relus=None):
        """`indices`: host indices of the sampled candidates (HardSampledMixedOp), or None. `relus`: (ReLU(s0),
        ReLU(s1)) when the caller has them: both preprocessing ops start with that ReLU."""
        if relus is None:
            states = [self.preprocess0(s0), self.preprocess1(s1)]
        else:
            states = [self.preprocess0.from_relu(relus[0]), self.preprocess1.from_relu(relus[1])]
        # One unbind for all edges: its backward is one stack per cell, where indexing weights[k] per edge
        # costs a select_backward and a gradient-accumulation add per edge.
        rows = weights.unbind(0)
        # Fused MixedOps: their candidates' weights sliced for all edges at once (one cat per cell in backward).
        mixing = candidate_rows(weights, self._ops) if indices is None else None
        feeds = [self._feed(h, j, mixing) for j, h in enumerate(states)]
        # Fused cells take the edges leaving the states that are ready (s0 and s1, then each new node) as one group:
        # one launch per stage for all of them (space/fused_mixed_op.py's `run`), each edge's last kernel later.
        group = mixing is not None and not torch.compiler.is_compiling()
        views, ready = {}, {}  # edge -> its input (a fan-out view); edge -> its last stage (grouped fused edges)
        self._leave((0, 1), feeds, views, ready, rows, mixing, group)
        offset = 0
        for i in range(self._steps):
            s = None
            for j in range(len(states)):
                k = offset + j
                if k in ready:  # the node's running sum added by the edge's last kernel
                    s = ready.pop(k)(s)
                    continue
                h = views.pop(k)
                if indices is not None:
                    y = self._ops[k](h, rows[k], indices[k])
                elif mixing is not None and s is not None and not _hooked(self._ops[k]):
                    # the node's running sum added by the edge's last kernel (a hook would see the sum: not there)
                    s = self._ops[k](h, rows[k], mixing=mixing[k], acc=s)
                    continue
                else:
                    y = self._ops[k](h, rows[k], mixing=mixing[k]) if mixing is not None else self._ops[k](h, rows[k])
                s = y if s is None else s + y
            offset += len(states)
            feeds.append(self._feed(s, len(states), mixing))
            states.append(s)
            self._leave((len(states) - 1,), feeds, views, ready, rows, mixing, group)
        # The last node feeds only the cat, whose backward hands it a channel slice: made contiguous once
        # here, not once per incoming edge (every op's backward would copy it).
        states[-1] = _ContiguousGrad.apply(states[-1])
        return torch.cat(states[-self._multiplier:], dim=1)

    def _feed(self, h, j: int, mixing):
        """State j as each MixedOp reading it gets it: fused cells hand out views whose gradients one launch sums
        (ops/fanout.py) where three or more edges read it; else h itself."""
        n = self._steps - max(0, j - 1)  # the nodes i >= j - 1 read state j
        if mixing is None or n < 3:
            return iter((h,) * n)
        return iter(fanout(h, n, self._fan_ones, self._fan_zeros, kernels=self._ops[0].kernels))

    def _leave(self, js, feeds, views, ready, rows, mixing, group: bool) -> None:
        """Hands the states `js` to the edges that read them (`views`); with `group`, the fused ones among those
        edges run all their stages but the last together, and `ready` gets each one's last stage (acc -> output)."""
        edges, keys = [], []
        for j in js:
            for i in range(max(0, j - 1), self._steps):  # nodes i >= j - 1 read state j, in node order
                k = sum(2 + n for n in range(i)) + j
                views[k] = next(feeds[j])
                op = self._ops[k]
                if group and type(op).forward is MixedOp.forward and not _hooked(op):
                    from . import fused_mixed_op  # fused cells only: it imports the Triton kernels
                    edge = fused_mixed_op.grouped(op, views[k], rows[k], mixing[k])
                    if edge is not None:
                        edges.append(edge)
                        keys.append(k)
        if edges:
            from .fused_mixed_op import run

            run(edges)
            for k, edge in zip(keys, edges):
                ready[k] = edge.finish
                del views[k]


def _hooked(m: nn.Module) -> bool:
    """Whether forward hooks watch `m`'s output (then it must be the edge's own, not a node's running sum)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose incoming gradient is made contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class Network(nn.Module):
    # None: every cell mixes with softmax(α). Else a callable(network) -> (per-cell weights, per-cell host
    # indices), called once per forward (search/sampler.py's GumbelSampler; the ops must then take an index).
    sampler = None

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, criterion: nn.Module | None = None,
                 steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3, mixed_op=MixedOp):
        super().__init__()
        self._C, self._num_classes, self._layers = C, num_classes, layers
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._steps, self._multiplier, self._stem_multiplier = steps, multiplier, stem_multiplier
        self._mixed_op = mixed_op

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, mixed_op)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self._initialize_alphas()

    # --- α -------------------------------------------------------------------------------------------
    def _initialize_alphas(self):
        k, n = num_edges(self._steps), len(PRIMITIVES)
        self.alphas_normal = (1e-3 * torch.randn(k, n)).requires_grad_()
        self.alphas_reduce = (1e-3 * torch.randn(k, n)).requires_grad_()
        self._arch_parameters = [self.alphas_normal, self.alphas_reduce]

    def arch_parameters(self) -> list[torch.Tensor]:
        return self._arch_parameters

    def load_alphas(self, alphas) -> None:
        with torch.no_grad():
            for a, b in zip(self._arch_parameters, alphas):
                a.copy_(b)

    def _apply(self, fn, recurse=True):
        # Keep α on the weights' device (a leaf, fp32) when the module is moved; dtype casts skip it.
        super()._apply(fn, recurse)
        device = self.classifier.weight.device
        if self.alphas_normal.device != device:
            self.alphas_normal = self.alphas_normal.detach().to(device).requires_grad_()
            self.alphas_reduce = self.alphas_reduce.detach().to(device).requires_grad_()
            self._arch_parameters = [self.alphas_normal, self.alphas_reduce]
        return self

    # --- forward -------------------------------------------------------------------------------------
    def mixing_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(α) per edge, always in fp32 (also under autocast)."""
        with torch.autocast(device_type=self.alphas_normal.device.type, enabled=False):
            return F.softmax(self.alphas_normal.float(), dim=-1), F.softmax(self.alphas_reduce.float(), dim=-1)

    def forward(self, x):
        if self.sampler is not None:
            weights, indices = self.sampler(self)
        else:
            w_normal, w_reduce = self.mixing_weights()
            weights, indices = [w_reduce if c.reduction else w_normal for c in self.cells], [None] * len(self.cells)
        s0 = s1 = self.stem(x)
        # Every state feeds two cells' preprocessing, which both start with its ReLU: computed once per state
        # (forward and backward), not once per reader.
        relus = [F.relu(s0)] * 2
        # The fused MixedOps' BN updates in a few foreach launches per forward, their cuDNN 1×1 weights cast by one.
        dev = x.device.type
        with batched_running_stats(), cast_once(self._fused_convs() if torch.is_autocast_enabled(dev) else [], dev):
            for n, (cell, w, i) in enumerate(zip(self.cells, weights, indices)):
                s0, s1 = s1, cell(s0, s1, w, i, relus)
                if n + 1 < len(self.cells):
                    relus = [relus[1], F.relu(s1)]
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    def _fused_convs(self) -> list[nn.Conv2d]:
        """The 1×1 convolutions that the fused MixedOps run through cuDNN (space/weight_cast.py)."""
        return [c for cell in self.cells for op in cell._ops if getattr(op, "_fused_index", None) is not None
                for c in conv_modules(op._ops)]

    def _loss(self, x, target):
        return self._criterion(self(x).float(), target)

    # --- DARTS API -----------------------------------------------------------------------------------
    def new(self) -> "Network":
        model_new = Network(self._C, self._num_classes, self._layers, self._criterion, self._steps,
                            self._multiplier, self._stem_multiplier, self._mixed_op)
        model_new.to(self.classifier.weight.device)
        model_new.load_alphas(self._arch_parameters)
        model_new.sampler = self.sampler
        return model_new

    def genotype(self) -> gt.Genotype:
        return gt.derive(self.alphas_normal, self.alphas_reduce, self._steps, self._multiplier)
