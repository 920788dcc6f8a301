"""Divergence: a loss, α or weight that became NaN or infinite stops the run with one line instead of
carrying NaN into the genotype, the weights files and model_sizes.json.

Every training step folds the finiteness of its loss (and of α) into a 0-d flag on the device — tensor ops
only, no host synchronisation, so the CUDA-graph body folds it as the eager step does. The loop reads the
flag where it synchronises anyway (its report lines, the end of each epoch) and checks every weight and
BatchNorm statistic once per epoch, before anything of that epoch is recorded or saved.

Under fp16 loss scaling a non-finite loss is an overflow the scaler answers by skipping the step: not
divergence, so the losses are not watched there (the weights and α, which a skipped step leaves finite, are).
"""
from __future__ import annotations

import torch

from . import distributed


class Diverged(RuntimeError):
    """A non-finite loss, α or weight; the message says where, `hint` what to change."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


class FiniteWatch:
    def __init__(self, device: torch.device, watch_losses: bool, hint: str):
        """`watch_losses`: False under fp16 loss scaling (see the module docstring). `hint`: what the stop
        line suggests changing."""
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.watch_losses, self.hint = watch_losses, hint
        self.last_good = "the start"

    def fold(self, loss: torch.Tensor | None = None, tensors=()) -> None:
        """Note whether `loss` and `tensors` are finite, on the device (in place: a captured graph keeps
        writing to this flag)."""
        if loss is not None and self.watch_losses:
            self.bad.logical_or_(~torch.isfinite(loss).all())
        for t in tensors:
            self.bad.logical_or_(~torch.isfinite(t).all())

    def check(self, where: str) -> None:
        """Raise Diverged if anything folded in so far was not finite on any rank (one host sync)."""
        if distributed.any_rank(self.bad):
            raise Diverged(f"training diverged: a loss, α or weight became NaN or infinite between {self.last_good} "
                           f"and {where}", self.hint)
        self.last_good = where


def floating_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's weights and floating buffers (BatchNorm statistics): what a checkpoint saves of it."""
    return [t for t in module.state_dict().values() if t.is_floating_point()]
