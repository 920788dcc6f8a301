"""Image sets as uint8 NCHW tensors in memory: CIFAR-10 and CIFAR-100 (through torchvision), a user's image
folder (decoded and resized once), and a learnable synthetic set."""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import DataError

CIFAR_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR_STD = (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)  # as DARTS-family CIFAR-100 code normalises it
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
NUM_CLASSES = 10


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, H, W] (32×32 but for image folders)
    labels: torch.Tensor  # int64 [N]
    num_classes: int = NUM_CLASSES  # of the whole set (a split may lack some)
    mean: tuple[float, ...] = CIFAR_MEAN  # per-channel normalisation, of the set's TRAINING images
    std: tuple[float, ...] = CIFAR_STD
    fitted: bool = False  # mean/std measured on these images (an image folder): a split refits them

    def __len__(self) -> int:
        return self.labels.numel()

    def stats_note(self) -> str:
        """The normalisation, as the run log records it."""
        mean, std = (", ".join(f"{x:.6g}" for x in v) for v in (self.mean, self.std))
        return f"mean ({mean}), std ({std})" + (" (measured on the training images)" if self.fitted else "")


def image_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 [N, C, H, W] images on the 0..1 scale. Sums of
    integers in float64 are exact here, and chunks bound the memory. A constant channel gets std 1/255
    (one grey level) rather than a division by zero."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(1024):
        x = chunk.to(torch.float64)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = images.numel() // images.shape[1]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt().clamp_min(1.0)
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def fit_stats(split: Split) -> Split:
    """`split` normalised by its own images' statistics."""
    mean, std = image_stats(split.images)
    return replace(split, mean=mean, std=std, fitted=True)


def with_stats_of(split: Split, train: Split) -> Split:
    """`split` (a validation or test set) normalised as `train` is."""
    return replace(split, mean=train.mean, std=train.std, fitted=train.fitted)


# (mean, std) each CIFAR is normalised with.
CIFAR_STATS = {"cifar10": (CIFAR_MEAN, CIFAR_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
# torchvision class, folder, archive and files of each CIFAR, and its number of classes.
CIFARS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "data_batch_1..5 and test_batch", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz", "train, test and meta", 100),
}


def load_cifar(name: str, root: str | Path, train: bool = True, download: bool = True) -> Split:
    """CIFAR-10 or CIFAR-100 (fine labels) through torchvision, downloaded into `root` when missing."""
    import torchvision

    cls_name, *_, classes = CIFARS[name]
    cls = getattr(torchvision.datasets, cls_name)
    root = Path(root)
    try:
        ds = cls(root=str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(_missing_cifar(name, root)) from None
        try:
            ds = cls(root=str(root), train=train, download=True)
        except Exception as e:  # offline, proxy, disk full: all end the same way for the user
            raise DataError(_missing_cifar(name, root, reason=f"{type(e).__name__}: {e}")) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(ds.targets, dtype=torch.int64), classes, *CIFAR_STATS[name])


def load_cifar10(root: str | Path, train: bool = True, download: bool = True) -> Split:
    return load_cifar("cifar10", root, train, download)


def _missing_cifar(name: str, root: Path, reason: str = "") -> str:
    _, folder, archive, files, _ = CIFARS[name]
    title = name.upper().replace("CIFAR", "CIFAR-")
    why = f" (download failed: {reason.splitlines()[0][:200]})" if reason else ""
    return (
        f"{title} is not in {root.resolve()} and could not be downloaded{why}. "
        f"Put the python version of {title} there, i.e. the folder {root / folder} with "
        f"{files}, by downloading "
        f"https://www.cs.toronto.edu/~kriz/{archive} on a machine with internet access and "
        f"unpacking it into {root} (tar -xzf {archive} -C {root}); or pass --data DIR where it "
        f"already is; or try the pipeline offline with --dataset synthetic."
    )


def load_image_folder(root: str | Path, image_size: int, samples=None, num_classes: int | None = None) -> Split:
    """ROOT/<class>/<image> decoded into memory: each image's shorter side resized to `image_size`
    (bilinear, antialiased), then the central image_size² square; grayscale and RGBA become RGB. For
    small sets (the whole set is held as uint8); `samples`/`num_classes` from an earlier scan. A file
    that does not decode is a DataError naming it. The images are ordered with the classes interleaved
    in proportion (the scan lists them class by class), so the DARTS split's first floor(portion·N)
    images hold every class in its share. Normalised by its own images' statistics (`fit_stats`): give a
    test set the training set's with `with_stats_of`."""
    from .imagefolder import scan

    if samples is None:
        classes, samples = scan(root)
        num_classes = len(classes)
    samples = interleave(samples)
    images = torch.empty(len(samples), 3, image_size, image_size, dtype=torch.uint8)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        for i, image in enumerate(pool.map(lambda s: _decode(s[0], image_size), samples)):
            images[i] = image
    return fit_stats(Split(images, torch.tensor([c for _, c in samples], dtype=torch.int64), num_classes))


def interleave(samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Sort by (position within its class / class size, class): a prefix of any length is stratified."""
    sizes = torch.bincount(torch.tensor([c for _, c in samples])).tolist()
    seen = [0] * len(sizes)
    keyed = []
    for path, c in samples:
        keyed.append(((seen[c] + 0.5) / sizes[c], c, path))
        seen[c] += 1
    return [(path, c) for _, c, path in sorted(keyed)]


def _decode(path: str, size: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad files
        first = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
        raise DataError(f"corrupt image {path}: {type(e).__name__}: {first}; remove or replace it") from None
    img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
    return TF.pil_to_tensor(img)


def source_folder(root: str | Path) -> Path:
    """Where a search's image folder is: ROOT/train when it exists (the layout `train` needs), else ROOT."""
    root = Path(root)
    return root / "train" if (root / "train").is_dir() else root


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


SEARCH_DATASETS = ("cifar10", "cifar100", "synthetic", "imagefolder")


def load_dataset(name: str, root: str | Path, synthetic_images: int = 5000, image_size: int = 32) -> Split:
    """The search's source set: a CIFAR training set, the synthetic set, or an image folder (see
    `source_folder`) at `image_size`."""
    if name in CIFARS:
        return load_cifar(name, root, train=True)
    if name == "synthetic":
        return make_synthetic(synthetic_images)
    if name == "imagefolder":
        return load_image_folder(source_folder(root), image_size)
    raise DataError(f"unknown dataset {name!r}; choose {', '.join(SEARCH_DATASETS)}")


def split_train_val(data: Split, train_portion: float) -> tuple[Split, Split]:
    """DARTS split: the first floor(portion·N) images train the weights, the rest drive α. Both halves are
    normalised as the set is, or, where its statistics were measured (`fitted`), by the train half's alone."""
    cut = int(math.floor(train_portion * len(data)))
    if cut < 1 or cut >= len(data):
        raise DataError(f"--train_portion {train_portion} leaves an empty train or validation half of {len(data)} images")
    train = replace(data, images=data.images[:cut], labels=data.labels[:cut])
    if data.fitted:
        train = fit_stats(train)
    return train, with_stats_of(replace(data, images=data.images[cut:], labels=data.labels[cut:]), train)
