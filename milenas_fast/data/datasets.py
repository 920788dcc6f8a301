"""Image sets as uint8 NCHW tensors: CIFAR-10 (through torchvision) and a learnable synthetic set."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

CIFAR_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR_STD = (0.24703233, 0.24348505, 0.26158768)
NUM_CLASSES = 10


class DataError(RuntimeError):
    """The data cannot be had; the message tells the user what to do."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return self.labels.numel()


def load_cifar10(root: str | Path, train: bool = True, download: bool = True) -> Split:
    import torchvision

    root = Path(root)
    try:
        ds = torchvision.datasets.CIFAR10(root=str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(_missing_cifar(root)) from None
        try:
            ds = torchvision.datasets.CIFAR10(root=str(root), train=train, download=True)
        except Exception as e:  # offline, proxy, disk full: all end the same way for the user
            raise DataError(_missing_cifar(root, reason=f"{type(e).__name__}: {e}")) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(ds.targets, dtype=torch.int64))


def _missing_cifar(root: Path, reason: str = "") -> str:
    why = f" (download failed: {reason.splitlines()[0][:200]})" if reason else ""
    return (
        f"CIFAR-10 is not in {root.resolve()} and could not be downloaded{why}. "
        f"Put the python version of CIFAR-10 there, i.e. the folder {root / 'cifar-10-batches-py'} with "
        f"data_batch_1..5 and test_batch, by downloading "
        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on a machine with internet access and "
        f"unpacking it into {root} (tar -xzf cifar-10-python.tar.gz -C {root}); or pass --data DIR where it "
        f"already is; or try the pipeline offline with --dataset synthetic."
    )


def make_synthetic(n: int, seed: int = 0) -> Split:
    """A deterministic, learnable 10-class 32×32 RGB set: each class is a coloured oriented grating with
    a class-specific frequency; images add a random phase, contrast and Gaussian noise. Classes are
    interleaved at random so any contiguous split is balanced."""
    g = torch.Generator().manual_seed(1234 + seed)
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    k = torch.arange(NUM_CLASSES, dtype=torch.float32)
    angle = k * math.pi / NUM_CLASSES
    freq = 0.25 + 0.05 * (k % 4)
    colour = torch.rand(NUM_CLASSES, 3, generator=g) * 0.6 + 0.2
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    a, f = angle[labels][:, None, None], freq[labels][:, None, None]
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    wave = torch.sin(f * (xx * torch.cos(a) + yy * torch.sin(a)) + phase)  # [n, 32, 32]
    contrast = 0.25 + 0.15 * torch.rand(n, 1, 1, 1, generator=g)
    img = colour[labels][:, :, None, None] + contrast * wave[:, None] + 0.12 * torch.randn(n, 3, 32, 32, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return Split(images.contiguous(), labels.to(torch.int64))


def load_dataset(name: str, root: str | Path, synthetic_images: int = 5000) -> Split:
    """The search's source set (CIFAR-10's training set, or the synthetic set)."""
    if name == "cifar10":
        return load_cifar10(root, train=True)
    if name == "synthetic":
        return make_synthetic(synthetic_images)
    raise DataError(f"unknown dataset {name!r}; choose cifar10 or synthetic")


def split_train_val(data: Split, train_portion: float) -> tuple[Split, Split]:
    """DARTS split: the first floor(portion·N) images train the weights, the rest drive α."""
    cut = int(math.floor(train_portion * len(data)))
    if cut < 1 or cut >= len(data):
        raise DataError(f"--train_portion {train_portion} leaves an empty train or validation half of {len(data)} images")
    return Split(data.images[:cut], data.labels[:cut]), Split(data.images[cut:], data.labels[cut:])
