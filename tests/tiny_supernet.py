"""A tiny smooth supernet with the model API the search step calls (parameters, arch_parameters, _loss,
_criterion): fast, and without ReLU kinks, so finite differences behave."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Tiny(nn.Module):
    """Two edges of 3 and 2 candidates (tanh/softplus/sigmoid, train-mode BatchNorm), α of shapes [3] and [2];
    float32 (`.double()` and fresh float64 α for float64 tests)."""

    ACTS = (torch.tanh, F.softplus, torch.sigmoid)

    def __init__(self):
        super().__init__()
        self.first = nn.ModuleList(nn.Linear(5, 6) for _ in self.ACTS)
        self.bn = nn.BatchNorm1d(6, affine=False)
        self.second = nn.ModuleList(nn.Linear(6, 3) for _ in range(2))
        self._alphas = [torch.randn(3).requires_grad_(), torch.randn(2).requires_grad_()]
        self._criterion = nn.CrossEntropyLoss()

    def arch_parameters(self):
        return self._alphas

    def forward(self, x):
        w0, w1 = (F.softmax(a, dim=-1) for a in self._alphas)
        h = self.bn(sum(w * act(lin(x)) for w, act, lin in zip(w0, self.ACTS, self.first)))
        return w1[0] * self.second[0](torch.tanh(h)) + w1[1] * self.second[1](h)

    def _loss(self, x, y):
        return self._criterion(self(x), y)
