"""The DARTS evaluation networks: a fixed genotype stacked into cells and trained from scratch (SPEC §6),
for CIFAR (20 cells, a stride-1 stem) and for ImageNet (14 cells, a stride-8 stem); their mult-adds.

Differences from the search supernet: one op per selected edge, affine BatchNorm, no BatchNorm after
pools, drop path on every non-identity op (ramped by the caller through `drop_path_prob`), and an
auxiliary head at 2/3 depth. Module names follow DARTS `model.py` so its state_dicts load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .genotype import Genotype, GenotypeError, quote
from .primitives import FactorizedReduce, Identity, ReLUConvBN, make_op


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability drop_prob and rescale the survivors (DARTS drop path)."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


def check_cell(cell, concat, field: str) -> None:
    """What the network needs beyond genotype.py's checks: concat indices that name states of this cell, and
    in a reduction cell none of its two inputs (they keep the input resolution, its nodes halve it)."""
    states = 2 + len(cell) // 2
    first = 2 if field == "reduce" else 0
    if len(concat) > states or any(not first <= i < states for i in concat):  # the length first: no huge loop
        raise GenotypeError(f"{field}_concat {quote(concat)} names states outside {first}..{states - 1}: this cell "
                            f"has states 0..{states - 1}" + (", its inputs 0 and 1 at another resolution than its "
                                                              "nodes" if first else ""))


class EvalCell(nn.Module):
    def __init__(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=True)
        cell, concat = (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
        self.reduction = reduction
        self._steps = len(cell) // 2
        self._concat = list(concat)
        self.multiplier = len(self._concat)
        self._indices = [int(i) for _, i in cell]
        self._ops = nn.ModuleList(
            make_op(name, C, 2 if reduction and index < 2 else 1, affine=True, search=False) for name, index in cell)

    def forward(self, s0, s1, drop_prob: float = 0.0):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        drop = self.training and drop_prob > 0.0
        for i in range(self._steps):
            s = None
            for k in (2 * i, 2 * i + 1):
                op = self._ops[k]
                h = op(states[self._indices[k]])
                if drop and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                s = h if s is None else s + h
            states.append(s)
        return torch.cat([states[i] for i in self._concat], dim=1)


def aux_pool(kernel: int, stride: int, size: int) -> nn.Module:
    """The head's pooling down to the 2×2 its 2×2 conv needs: DARTS' fixed pool where it gives exactly that
    (8×8 maps in the CIFAR head, 7×7 in the ImageNet head: 32 and 224 pixel inputs), an adaptive 2×2 pool at
    other input sizes (--image_size), where the fixed pool would give the wrong shape or none."""
    if size >= kernel and (size - kernel) // stride + 1 == 2:
        return nn.AvgPool2d(kernel, stride=stride, padding=0, count_include_pad=False)
    return nn.AdaptiveAvgPool2d(2)


class AuxiliaryHead(nn.Module):
    """Classifier on the features after the second reduction (DARTS layout, both heads): pool to 2×2,
    1×1 conv to 128, 2×2 conv to 768, linear."""

    def __init__(self, C: int, num_classes: int, pool: nn.Module, bn_768: bool = True):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),  # DARTS uses inplace here, which silently rewrites the cell output
            pool,
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            *([nn.BatchNorm2d(768)] if bn_768 else []),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class AuxiliaryHeadCIFAR(AuxiliaryHead):
    """8×8 features (32×32 inputs) → 2×2 by a 5/3 average pool."""

    def __init__(self, C: int, num_classes: int, size: int = 8):
        super().__init__(C, num_classes, aux_pool(5, 3, size))


class AuxiliaryHeadImageNet(AuxiliaryHead):
    """7×7 features (224×224 inputs) → 2×2 by a 5/2 average pool. No BatchNorm after the 768 conv: DARTS'
    ImageNet head omits it (its published ImageNet results were trained without), so its state_dicts load."""

    def __init__(self, C: int, num_classes: int, size: int = 7):
        super().__init__(C, num_classes, aux_pool(5, 2, size), bn_768=False)


class EvalNetwork(nn.Module):
    """The cell stack both evaluation networks share: `layers` cells, reductions at 1/3 and 2/3 depth, the
    auxiliary head after the 2/3 cell, global average pool and linear classifier. Subclasses build the stem
    and give `stems(x) → (s0, s1)`. forward(x) → (logits, logits_aux); logits_aux is None unless training
    with the auxiliary head."""

    def _build_cells(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int, layers: int,
                     reduction_prev: bool, num_classes: int, auxiliary: bool, head) -> None:
        check_cell(genotype.normal, genotype.normal_concat, "normal")
        check_cell(genotype.reduce, genotype.reduce_concat, "reduce")
        self._layers, self._auxiliary = layers, auxiliary
        self.drop_path_prob = 0.0
        self.cells = nn.ModuleList()
        self.aux_index = 2 * layers // 3
        C_curr, C_aux = C, None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = EvalCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_prev
        if auxiliary:
            self.auxiliary_head = head(C_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)  # = DARTS' AvgPool2d(7) on ImageNet's final 7×7
        self.classifier = nn.Linear(C_prev, num_classes)

    def stems(self, x):
        raise NotImplementedError

    def forward(self, x):
        logits_aux = None
        s0, s1 = self.stems(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1)), logits_aux


class NetworkCIFAR(EvalNetwork):
    """One 3×3 conv stem at full resolution (stride 1); `image_size` only sizes the auxiliary head's pool."""

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 stem_multiplier: int = 3, image_size: int = 32):
        super().__init__()
        C_stem = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
        head = lambda C_aux, n: AuxiliaryHeadCIFAR(C_aux, n, image_size // 4)  # noqa: E731
        self._build_cells(genotype, C_stem, C_stem, C, layers, False, num_classes, auxiliary, head)

    def stems(self, x):
        s = self.stem(x)
        return s, s


class NetworkImageNet(EvalNetwork):
    """DARTS' ImageNet network: three stride-2 convs (stride 8 overall, 224 → 28) in two stems; the first
    cell reads stem0's 56×56 output through a FactorizedReduce (reduction_prev), so reductions then halve
    28 → 14 → 7. `image_size` only sizes the auxiliary head's pool (must be a multiple of 32)."""

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 image_size: int = 224):
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            # not in place: stem0's output is also the first cell's s0 (DARTS' in-place ReLU changes nothing
            # there, the cell's FactorizedReduce starts with a ReLU)
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        head = lambda C_aux, n: AuxiliaryHeadImageNet(C_aux, n, image_size // 32)  # noqa: E731
        self._build_cells(genotype, C, C, C, layers, True, num_classes, auxiliary, head)

    def stems(self, x):
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


def param_count(model: nn.Module) -> int:
    """Weights without the auxiliary head: DARTS' `param size` (the papers' parameter counts)."""
    return sum(p.numel() for name, p in model.named_parameters() if "auxiliary" not in name)


MOBILE_MULT_ADDS = 600_000_000  # the ImageNet mobile setting's limit (DARTS, NASNet)


def mult_adds(model: nn.Module, image_size: int) -> int:
    """Multiply-adds of one image's inference (eval mode: no auxiliary head), counted by forward hooks on
    every nn.Conv2d (dense, depthwise, dilated: output elements × in_channels/groups × kernel area) and
    nn.Linear (in × out). BatchNorm, ReLU, pooling, the cells' sums and biases are not counted. Run it on a
    model built on the meta device to count a large network without computing anything."""
    total = 0

    def conv(m, inputs, out):
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inputs, out):
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
