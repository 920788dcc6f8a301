"""Mixed precision policy: bf16 autocast where supported, fp16 with loss scaling otherwise.

α, its softmax and all optimiser state stay fp32 (the model computes softmax outside autocast).
α gradients (autograd.grad in the α passes, or α's .grad after a shared training pass) are never seen by
GradScaler.unscale_, so `unscaled` unscales them by hand and reports non-finite values so the caller can
skip the step.
"""
from __future__ import annotations

import contextlib

import torch


class Precision:
    def __init__(self, device: torch.device, amp: bool):
        self.device = device
        self.dtype = None
        self.note = "fp32"
        self.scaler = None
        if not amp:
            return
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                self.dtype, self.note = torch.bfloat16, "AMP: bf16 autocast"
            else:
                self.dtype, self.note = torch.float16, "AMP: fp16 autocast with loss scaling (no bf16 on this GPU)"
                self.scaler = torch.amp.GradScaler("cuda")
        elif device.type == "cpu":
            self.dtype, self.note = torch.bfloat16, "AMP: bf16 autocast on CPU"
        else:
            self.note = f"AMP is not supported on {device.type}; running in fp32"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        # no weight-cast cache: it must not outlive a CUDA-graph capture, and each weight is cast once per
        # pass anyway
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def alpha_grads(self, loss: torch.Tensor, alphas) -> tuple[list[torch.Tensor], bool]:
        """∇α loss, unscaled; and whether all of it is finite."""
        return self.unscaled(torch.autograd.grad(self.scale(loss), alphas))

    def unscaled(self, grads) -> tuple[list[torch.Tensor], bool]:
        """Gradients of a scaled loss, unscaled; and whether all are finite (a host sync, fp16 only)."""
        if self.scaler is None:
            return list(grads), True
        inv = 1.0 / self.scaler.get_scale()
        grads = [g.float() * inv for g in grads]
        return grads, all(bool(torch.isfinite(g).all()) for g in grads)

    def step(self, optimizer, params, grad_clip: float) -> None:
        """Unscale (fp16), clip the gradient norm of `params` (0 disables), step; skips on inf/NaN (fp16)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
