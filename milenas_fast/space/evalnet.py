"""The DARTS evaluation network: a fixed genotype stacked into 20 cells and trained from scratch (SPEC §6).

Differences from the search supernet: one op per selected edge, affine BatchNorm, no BatchNorm after
pools, drop path on every non-identity op (ramped by the caller through `drop_path_prob`), and an
auxiliary head at 2/3 depth. Module names follow DARTS `model.py` so its state_dicts load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .genotype import Genotype, GenotypeError
from .primitives import FactorizedReduce, Identity, ReLUConvBN, make_op


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability drop_prob and rescale the survivors (DARTS drop path)."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


def check_cell(cell, concat, field: str) -> None:
    """What the network needs beyond genotype.py's checks: concat indices that name existing states."""
    states = 2 + len(cell) // 2
    bad = [i for i in concat if not 0 <= i < states]
    if bad:
        raise GenotypeError(f"{field}_concat {list(concat)} names state(s) {bad}; this cell has states 0..{states - 1}")


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


class AuxiliaryHeadCIFAR(nn.Module):
    """Classifier on the 8×8 features after the second reduction (DARTS layout)."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),  # DARTS uses inplace here, which silently rewrites the cell output
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),  # 8×8 → 2×2
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class NetworkCIFAR(nn.Module):
    """forward(x) → (logits, logits_aux); logits_aux is None unless training with the auxiliary head."""

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 stem_multiplier: int = 3):
        super().__init__()
        check_cell(genotype.normal, genotype.normal_concat, "normal")
        check_cell(genotype.reduce, genotype.reduce_concat, "reduce")
        self._layers, self._auxiliary = layers, auxiliary
        self.drop_path_prob = 0.0
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        self.aux_index = 2 * layers // 3
        C_aux = None
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
            self.auxiliary_head = AuxiliaryHeadCIFAR(C_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x):
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1)), logits_aux


def param_count(model: nn.Module) -> int:
    """Weights without the auxiliary head: DARTS' `param size` (the papers' parameter counts)."""
    return sum(p.numel() for name, p in model.named_parameters() if "auxiliary" not in name)
