"""Data for training a genotype from scratch: the training and held-out test sets, the test set's plain
(unaugmented) batches, and cutout applied to already-augmented training batches."""
from __future__ import annotations

from pathlib import Path

import torch

from .datasets import CIFARS, Split, load_cifar, load_image_folder, make_synthetic, with_stats_of

from ..errors import DataError
from .loaders import normalize, to_device

SYNTHETIC_TEST_SEED = 1  # the training set uses seed 0: a different draw of the same classes


def synthetic_test_size(synthetic_images: int) -> int:
    return max(10, synthetic_images // 5)


TRAIN_DATASETS = ("cifar10", "cifar100", "synthetic", "imagefolder")  # in memory; imagenet streams


def load_train_test(name: str, root: str | Path, synthetic_images: int = 5000,
                    image_size: int = 32) -> tuple[Split, Split]:
    """(training set, test set): a CIFAR's two sets; the synthetic set and a second draw of it with another
    seed (a fifth of the training size); or ROOT/train and ROOT/val of an image folder (the same classes).
    The test set is normalised with the training set's statistics."""
    if name in CIFARS:
        return load_cifar(name, root, train=True), load_cifar(name, root, train=False)
    if name == "synthetic":
        return (make_synthetic(synthetic_images),
                make_synthetic(synthetic_test_size(synthetic_images), seed=SYNTHETIC_TEST_SEED))
    if name == "imagefolder":
        from .imagefolder import scan_pair

        root = Path(root)
        classes, train, test = scan_pair(root / "train", root / "val")
        train_split = load_image_folder(root, image_size, train, len(classes))
        return train_split, with_stats_of(load_image_folder(root, image_size, test, len(classes)), train_split)
    raise DataError(f"unknown dataset {name!r}; choose {', '.join(TRAIN_DATASETS)}")


class TestBatches:
    """The test split resident on the device, in order, normalised only (DARTS' valid_transform) with the
    split's statistics (the training set's: `load_train_test`)."""

    def __init__(self, split: Split, batch_size: int, device: torch.device):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.mean, self.std = split.mean, split.std
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.labels.numel() // self.batch_size)

    def __iter__(self):
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield normalize(self.images[sl], self.mean, self.std), self.labels[sl]


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


class LoaderPass:
    """The validation pass of an image loader (imagenet.py) as a re-iterable like TestBatches: its order
    never changes, so every pass is the same."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return self.loader.epoch(0)


def imagenet_loaders(root: str | Path, loader: str, batch_size: int, image_size: int, device: torch.device,
                     workers: int, seed: int, shard: tuple[int, int] = (0, 1)):
    """(training loader, test batches, number of classes, loader name, why) over ROOT/train and ROOT/val.
    Both folders are scanned and every file's header checked first (imagefolder.scan_pair, check="verify"),
    so a missing folder, an empty class, mismatched classes or an unreadable file stop the run before it
    writes anything; a file that fails later is skipped by the loader (counted, with a warning). Training reads
    this rank's `shard` (rank, world) of each epoch's order; every rank evaluates the whole validation set."""
    from .imagefolder import scan_pair
    from .imagenet import make_image_loader, resolve_image_loader

    root = Path(root)
    classes, train, val = scan_pair(root / "train", root / "val", check="verify")
    name, why = resolve_image_loader(loader, device)
    kw = dict(batch_size=batch_size, image_size=image_size, device=device, workers=workers, seed=seed)
    train_loader = make_image_loader(name, train, train=True, rank=shard[0], world=shard[1], **kw)
    test_batches = LoaderPass(make_image_loader(name, val, train=False, **kw))
    return train_loader, test_batches, len(classes), name, why
