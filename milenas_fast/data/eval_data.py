"""Data for training a genotype from scratch: the held-out test set, its plain (unaugmented) batches,
and cutout applied to already-augmented training batches."""
from __future__ import annotations

from pathlib import Path

import torch

from .datasets import DataError, Split, load_cifar10, make_synthetic
from .loaders import normalize, to_device

SYNTHETIC_TEST_SEED = 1  # the training set uses seed 0: a different draw of the same classes


def synthetic_test_size(synthetic_images: int) -> int:
    return max(10, synthetic_images // 5)


def load_test_set(name: str, root: str | Path, synthetic_images: int = 5000) -> Split:
    """CIFAR-10's test set, or a synthetic set drawn with a different seed (a fifth of the training size)."""
    if name == "cifar10":
        return load_cifar10(root, train=False)
    if name == "synthetic":
        return make_synthetic(synthetic_test_size(synthetic_images), seed=SYNTHETIC_TEST_SEED)
    raise DataError(f"unknown dataset {name!r}; choose cifar10 or synthetic")


class TestBatches:
    """The test split resident on the device, in order, normalised only (DARTS' valid_transform)."""

    def __init__(self, split: Split, batch_size: int, device: torch.device):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.labels.numel() // self.batch_size)

    def __iter__(self):
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield normalize(self.images[sl]), self.labels[sl]


def cutout_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """Cutout centres depend only on (seed, epoch, step), so resuming needs no extra state."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + 7) * 1_000_003 + epoch) * 1_000_003 + step)


def cutout(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """DARTS cutout on a normalised batch [B, C, H, W]: per image, zero a length×length square centred at a
    uniform pixel and clipped at the borders."""
    B, _, H, W = x.shape
    # drawn on the host (resumable generator), moved in one non-blocking copy
    centres = to_device(torch.cat([torch.randint(0, H, (B, 1), generator=generator),
                                   torch.randint(0, W, (B, 1), generator=generator)], 1), x.device)
    cy, cx = centres[:, 0:1], centres[:, 1:2]
    half = length // 2
    rows = torch.arange(H, device=x.device)[None, :]
    cols = torch.arange(W, device=x.device)[None, :]
    in_rows = (rows >= cy - half) & (rows < cy + half)  # [B, H]; DARTS' [y − l//2, y + l//2)
    in_cols = (cols >= cx - half) & (cols < cx + half)  # [B, W]
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(hole[:, None], 0.0)
