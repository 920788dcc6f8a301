"""Running loss/accuracy sums and the per-epoch progress bar, shared by search and train."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("milenas_fast")


class Totals:
    """Loss and top-1/top-5 sums kept on the device; read (one sync) only when reported."""

    def __init__(self, device):
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)
        self.n = 0

    def add(self, loss, logits, y):
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == y[:, None]
        self.sums += torch.stack([loss.double() * y.numel(), hit[:, 0].sum().double(), hit.any(1).sum().double()])
        self.n += y.numel()

    def read(self) -> tuple[float, float, float]:
        loss, top1, top5 = (self.sums / max(self.n, 1)).tolist()
        return loss, 100.0 * top1, 100.0 * top5

    def log_line(self, kind: str, step: int) -> tuple[float, float]:
        """The DARTS `train|valid NNN loss top1 top5` line (log file; console only without a bar)."""
        obj, top1, top5 = self.read()
        log.info("%s %03d %e %f %f", kind, step, obj, top1, top5, extra={"step_line": True})
        return obj, top1


class Progress:
    """A tqdm bar per epoch on a terminal; nothing otherwise (the log lines carry the numbers)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def start(self, epoch: int, total: int):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}", unit="it", leave=False, dynamic_ncols=True)

    def update(self, done, loss, acc, ips):
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}", img_s=f"{ips:.0f}", refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
