"""ImageNet-style loaders over image files (an ImageFolder scan's samples): DALI (dali_imagenet.py, GPU
JPEG decoding) and its torchvision twin, with DARTS's ImageNet transforms.

    loader = make_image_loader(name, samples, train=True, batch_size=128, image_size=224, device=device,
                               rank=rank, world=world, workers=4, seed=seed)
    for x, y in loader.epoch(epoch): ...     # x float32 [B, 3, S, S] on `device`, y int64 [B]
    len(loader)                               # batches per epoch on this rank
    loader.skipped                            # corrupt files skipped so far (torchvision loader)

`workers` is the torchvision loader's worker processes and DALI's CPU threads.

`name` comes from `resolve_image_loader(--loader, device)`: `auto|dali|torch` as for CIFAR (loaders.py):
auto picks DALI on a CUDA device when it is installed, and dali_loader's Guard turns a DALI failure into
one warning and the torchvision loader from the same batch on; an explicit `dali` that fails is a
one-line DataError. `gpu` (a resident dataset) does not apply to image files.

Order and sharding, the same for both loaders: each epoch has one order of the whole set, seeded by
(seed, epoch) and the same on every rank (training: shuffled, then cut to a multiple of `world` so every
rank runs the same number of steps; validation: the scan's order, all of it). Rank r reads the contiguous
slice [n·r/world, n·(r+1)/world) of it, which is how DALI's file reader shards. Training drops the last
partial batch; validation keeps it.

Corrupt files met mid-epoch: the torchvision loader skips each with a warning naming it and counts it in
`skipped` (the batch is one image short); DALI: see dali_imagenet.py.
"""
from __future__ import annotations

import warnings

import torch

from .dali_imagenet import IMAGENET_MEAN, IMAGENET_STD, HUE, JITTER, val_resize
from ..errors import DataError
from .imagefolder import Sample, corrupt
from .select import LoaderName, resolve_loader

IMAGE_LOADERS = ("auto", "dali", "torch")


def resolve_image_loader(requested: str, device: torch.device) -> tuple[str, str]:
    """(loader name, why) for `--loader` with image files."""
    if requested not in IMAGE_LOADERS:
        raise DataError(f"--loader {requested} does not read image files (it keeps a decoded dataset in "
                        f"memory); use --loader {', '.join(IMAGE_LOADERS)}")
    name, why = resolve_loader(requested, device)
    if name == "gpu":
        return LoaderName("torch"), "auto: CUDA device, DALI not installed → torchvision workers"
    if name == "dali" and not name.strict:
        why = "auto: DALI is installed and the device is CUDA (the torchvision loader if DALI fails)"
    return name, why


def epoch_order(n: int, seed: int, epoch: int, train: bool, world: int = 1) -> torch.Tensor:
    """This epoch's order of all n samples, identical on every rank (see the module docstring)."""
    if not train:
        return torch.arange(n)
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=g)[: n - n % world]


def shard(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous slice of an epoch order of length n (DALI's file-reader sharding)."""
    return slice(n * rank // world, n * (rank + 1) // world)


class _ImageLoader:
    def __init__(self, samples: list[Sample], train: bool, batch_size: int, image_size: int,
                 device: torch.device, rank: int = 0, world: int = 1, seed: int = 0):
        if not samples:
            raise DataError("no images to load")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is outside a world of {world}")
        self.samples, self.train, self.batch_size, self.image_size = samples, train, batch_size, image_size
        self.device, self.rank, self.world, self.seed = device, rank, world, seed
        self.skipped = 0
        self.shard_size = len(self.shard_indices(0))  # the same every epoch
        if len(self) == 0:
            raise DataError(f"rank {rank} gets {self.shard_size} training images, fewer than one batch of "
                            f"{batch_size}")

    def __len__(self) -> int:
        n, b = self.shard_size, self.batch_size
        return n // b if self.train else -(-n // b)

    def shard_indices(self, epoch: int) -> torch.Tensor:
        """Indices into `samples` that this rank reads in `epoch`, in order."""
        order = epoch_order(len(self.samples), self.seed, epoch, self.train, self.world)
        return order[shard(len(order), self.rank, self.world)]

    def epoch(self, epoch: int, start: int = 0):
        raise NotImplementedError


def transform(train: bool, image_size: int):
    """DARTS's ImageNet transforms (torchvision, on PIL images)."""
    import torchvision.transforms as T

    if train:
        steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                 T.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER, hue=HUE)]
    else:
        steps = [T.Resize(val_resize(image_size)), T.CenterCrop(image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _Files(torch.utils.data.Dataset):
    """Position i of this rank's epoch → (image, label, None) or, for a file that cannot be read,
    (None, label, "path: why"). Each image's random draws come from a generator seeded by (seed, epoch,
    image index): the same batches whatever the worker count, a resumed epoch repeats them, and ranks
    draw independently."""

    def __init__(self, samples: list[Sample], indices: torch.Tensor, train: bool, image_size: int, seed: int,
                 epoch: int):
        self.samples, self.indices, self.seed, self.epoch = samples, indices.tolist(), seed, epoch
        self.tf = transform(train, image_size)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from PIL import Image

        j = self.indices[i]
        path, label = self.samples[j]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + j) % 2**63)
            try:
                with Image.open(path) as img:
                    rgb = img.convert("RGB")  # decodes
            except Exception:  # noqa: BLE001 - PIL raises many types for bad files; each is skipped, and named
                return None, label, f"{path}: {corrupt(path, 'decode') or 'unreadable'}"
            return self.tf(rgb), label, None


def _collate(items):
    good = [(x, y) for x, y, bad in items if bad is None]
    bad = [bad for _, _, bad in items if bad is not None]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), bad


class TorchImageLoader(_ImageLoader):
    name = "torch"

    def __init__(self, *args, workers: int = 4, **kw):
        super().__init__(*args, **kw)
        self.workers = workers

    def epoch(self, epoch: int, start: int = 0):
        ds = _Files(self.samples, self.shard_indices(epoch), self.train, self.image_size, self.seed, epoch)
        sampler = range(start * self.batch_size, len(ds))
        dl = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=self.train,
                                         num_workers=self.workers, collate_fn=_collate,
                                         pin_memory=self.device.type == "cuda")
        for x, y, bad in dl:
            for what in bad:
                self.skipped += 1
                warnings.warn(f"milenas_fast: skipped unreadable image {what} ({self.skipped} skipped so far)",
                              RuntimeWarning, stacklevel=2)
            if x is not None:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class DaliImageLoader(_ImageLoader):
    name = "dali"

    def __init__(self, *args, num_threads: int = 4, **kw):
        from . import dali_loader

        if not dali_loader.available():
            raise RuntimeError("NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 "
                               "(or nvidia-dali-cuda120 for a CUDA 12 driver)")
        super().__init__(*args, **kw)
        self.num_threads, self.pipe = num_threads, None
        self.device_id = None if self.device.type == "cpu" else (self.device.index if self.device.index is not None
                                                                 else torch.cuda.current_device())
        self._build(0)  # fail here, not at the first batch, when DALI cannot run

    def _build(self, epoch: int) -> None:
        from .dali_imagenet import build_pipeline

        self.pipe = None  # free the previous epoch's pipeline (threads, device memory) first
        order = epoch_order(len(self.samples), self.seed, epoch, self.train, self.world).tolist()
        self.pipe = build_pipeline([self.samples[i][0] for i in order], [self.samples[i][1] for i in order],
                                   train=self.train, batch_size=self.batch_size, image_size=self.image_size,
                                   device_id=self.device_id, shard_id=self.rank, num_shards=self.world,
                                   seed=((self.seed * 1_000_003 + epoch) * 1009 + self.rank) % 2**31,
                                   num_threads=self.num_threads)
        self.built_for = epoch

    def epoch(self, epoch: int, start: int = 0):
        from .dali_loader import to_torch

        if self.built_for != epoch:
            self._build(epoch)
        self.built_for = None  # a pass consumes the pipeline: the next one builds afresh
        for i in range(len(self)):
            images, labels = self.pipe.run()
            if i < start:
                continue  # the file reader cannot seek: resuming mid-epoch reads and drops
            x, y = to_torch(images, self.device), to_torch(labels, self.device).view(-1).long()
            keep = min(self.batch_size, self.shard_size - i * self.batch_size)  # the padded last batch
            yield x[:keep], y[:keep]


class GuardedImageLoader:
    """DALI with dali_loader's failure policy; the fallback is the torchvision loader."""

    def __init__(self, strict: bool, args: tuple, kw: dict, workers: int):
        from . import dali_loader

        # DaliImageLoader looked up at call time: tests replace it with injected faults
        self.guard = dali_loader.Guard(lambda: DaliImageLoader(*args, num_threads=max(1, workers), **kw),
                                       lambda: TorchImageLoader(*args, workers=workers, **kw), strict,
                                       "the torchvision loader instead", "torch or auto")

    @property
    def name(self) -> str:
        return self.guard.inner.name

    @property
    def skipped(self) -> int:
        return self.guard.inner.skipped

    def __len__(self) -> int:
        return len(self.guard.inner)

    def epoch(self, epoch: int, start: int = 0):
        return self.guard.run(lambda loader, s: loader.epoch(epoch, s), start)


def make_image_loader(name: str, samples: list[Sample], *, train: bool, batch_size: int, image_size: int,
                      device: torch.device, rank: int = 0, world: int = 1, workers: int = 4, seed: int = 0):
    """The loader `name` (from `resolve_image_loader`) over `samples` [(path, class index)]."""
    args = (samples, train, batch_size, image_size, device)
    kw = {"rank": rank, "world": world, "seed": seed}
    if name == "torch":
        return TorchImageLoader(*args, workers=workers, **kw)
    if name == "dali":
        return GuardedImageLoader(getattr(name, "strict", True), args, kw, workers)
    raise ValueError(f"unknown image loader {name!r}")
