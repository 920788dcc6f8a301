"""Which loader a run uses (`--loader`), and building it: the one place that knows every loader, DALI's included."""
from __future__ import annotations

import torch

from .datasets import Split
from .loaders import Loader, ResidentLoader, TorchLoader


class LoaderName(str):
    """A loader name as `resolve_loader` gives it: compares and prints as the name, and carries whether a
    failure of that loader may fall back (`auto`) or must stop the run (an explicit `--loader`)."""

    def __new__(cls, name: str, strict: bool = True):
        self = super().__new__(cls, name)
        self.strict = strict
        return self


def resolve_loader(requested: str, device: torch.device) -> tuple[str, str]:
    """(loader name, why) for `--loader`."""
    if requested != "auto":
        return LoaderName(requested), "requested"
    if device.type == "cuda":
        from . import dali_loader  # imported late: it imports nvidia.dali

        if dali_loader.available():
            return (LoaderName("dali", strict=False),
                    "auto: DALI is installed and the device is CUDA (the GPU-resident loader if DALI fails)")
        return LoaderName("gpu"), "auto: CUDA device, DALI not installed → dataset resident on the GPU"
    return LoaderName("torch"), "auto: CPU device → torch DataLoader"


def make_loader(name: str, split: Split, batch_size: int, device: torch.device, workers: int = 0,
                drop_last: bool = False, shard: tuple[int, int] = (0, 1)) -> Loader:
    """The loader `name` (from `resolve_loader`), reading share `shard` = (rank, world) of every plan. DALI is
    guarded: an explicit `dali` that fails stops the run with a DataError; an `auto` one falls back to the
    GPU-resident loader with one warning."""
    if name == "gpu":
        loader = ResidentLoader(split, batch_size, device, drop_last)
    elif name == "torch":
        loader = TorchLoader(split, batch_size, device, drop_last, workers)
    elif name == "dali":
        from .dali_loader import GuardedDali

        loader = GuardedDali(split, batch_size, device, drop_last, strict=getattr(name, "strict", True))
    else:
        raise ValueError(f"unknown loader {name!r}")
    loader.rank, loader.world = shard
    return loader
