"""Loaders: every pass over a split follows a Plan (order, crop offsets, flips) drawn from a generator
seeded by (seed, stream, pass). Loaders differ only in where the augmentation runs, so the same plan
gives the same batches from any loader, and resuming needs only (pass, position).

- `torch`: a torch DataLoader; each image is cropped/flipped/normalised by torchvision in workers.
- `gpu`:   the whole uint8 split resident on the device, augmentation as batched tensor ops
           (works on CPU tensors too, which is how CI tests it).

Under DDP every rank draws the same plan and takes its own disjoint share of it (`Plan.shard`): together
the ranks' i-th batches are the i-th batch of the whole plan at world × the per-rank batch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .datasets import CIFAR_MEAN, CIFAR_STD, Split

LOADERS = ("auto", "torch", "gpu", "dali")
PAD = 4
STREAMS = {"train": 0, "valid": 1, "infer": 2}


@dataclass
class Plan:
    order: torch.Tensor    # int64 [N]  image index per position
    offsets: torch.Tensor  # int64 [N, 2] crop (top, left) in the 4-padded 40×40 image, each uniform on 0..8
    flips: torch.Tensor    # bool  [N]

    @staticmethod
    def draw(n: int, seed: int, stream: str, pass_index: int) -> "Plan":
        g = torch.Generator().manual_seed(((seed * 1_000_003 + STREAMS[stream]) * 1_000_003 + pass_index) % (2**63))
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g).bool()
        return Plan(order, offsets, flips)

    def __len__(self) -> int:
        return len(self.order)

    def shard(self, rank: int, world: int) -> "Plan":
        """Every world-th position from `rank`, the tail cut to a multiple of `world` (at most world − 1
        images a pass) so that every rank runs as many iterations: a rank with one more would wait forever
        in a collective the others never join."""
        if world <= 1:
            return self
        keep = slice(rank, len(self) // world * world, world)
        return Plan(self.order[keep], self.offsets[keep], self.flips[keep])


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without stalling the host: through pinned memory, non_blocking (a
    pageable copy is synchronous and waits for the whole stream). On the CPU: the tensor itself."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device, mean: tuple = CIFAR_MEAN,
              std: tuple = CIFAR_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation constants, copied to each device once per process and statistics (not once per
    batch)."""
    return (torch.tensor(mean, device=device).view(-1, 1, 1),
            torch.tensor(std, device=device).view(-1, 1, 1))


def normalize(x_uint8: torch.Tensor, mean: tuple = CIFAR_MEAN, std: tuple = CIFAR_STD) -> torch.Tensor:
    """uint8 → float32, then (x/255 − mean)/std, op for op as torchvision's to_tensor + normalize; `mean`,
    `std`: the split's (Split.mean/std)."""
    mean_t, std_t = _mean_std(x_uint8.device, tuple(mean), tuple(std))
    return x_uint8.float().div(255).sub(mean_t).div(std_t)


def augment_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, mean: tuple = CIFAR_MEAN,
                  std: tuple = CIFAR_STD) -> torch.Tensor:
    """Batched DARTS augmentation of uint8 [B, 3, H, W]: zero-pad 4, crop H×W at `offsets`, flip, normalise.
    All index tensors are made on the device (arange), so a batch needs no host-to-device copy."""
    B, C, H, W = images.shape
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    ar_h = torch.arange(H, device=images.device)
    ar_w = torch.arange(W, device=images.device)
    rows = offsets[:, 0:1] + ar_h                                           # [B, H]
    cols = torch.where(flips[:, None], offsets[:, 1:2] + (W - 1) - ar_w, offsets[:, 1:2] + ar_w)  # [B, W]
    b = torch.arange(B, device=images.device)[:, None, None, None]
    c = torch.arange(C, device=images.device)[None, :, None, None]
    return normalize(padded[b, c, rows[:, None, :, None], cols[:, None, None, :]], mean, std)


class Loader:
    def __init__(self, split: Split, batch_size: int, device: torch.device, drop_last: bool = False):
        self.split, self.batch_size, self.device, self.drop_last = split, batch_size, device, drop_last
        self.rank, self.world = 0, 1  # this process's share of every plan (make_loader's `shard`)

    def __len__(self) -> int:
        return self.batch_count(len(self.split) // self.world)

    def batch_count(self, n: int) -> int:
        """Batches in a pass over `n` planned positions."""
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def plan(self, seed: int, stream: str, pass_index: int) -> Plan:
        """This rank's share of pass `pass_index` of `stream`."""
        return Plan.draw(len(self.split), seed, stream, pass_index).shard(self.rank, self.world)

    def batches(self, plan: Plan, start: int = 0):
        raise NotImplementedError


class ResidentLoader(Loader):
    name = "gpu"

    def __init__(self, split, batch_size, device, drop_last=False):
        super().__init__(split, batch_size, device, drop_last)
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)

    def batches(self, plan: Plan, start: int = 0):
        # the plan goes to the device once per pass; each batch then only slices device tensors
        order, offsets, flips = (to_device(t, self.device) for t in (plan.order, plan.offsets, plan.flips))
        for i in range(start, self.batch_count(len(plan))):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl]
            yield augment_batch(self.images[idx], offsets[sl], flips[sl], self.split.mean, self.split.std), \
                self.labels[idx]


class _PlannedImages(torch.utils.data.Dataset):
    """Position i of a plan → (augmented image, label), through torchvision's functional transforms."""

    def __init__(self, split: Split, plan: Plan):
        self.split, self.plan = split, plan

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, i):
        from torchvision.transforms.v2 import functional as TF

        j = int(self.plan.order[i])
        top, left = (int(v) for v in self.plan.offsets[i])
        img = TF.pad(self.split.images[j], [PAD])
        img = TF.crop(img, top, left, self.split.images.shape[-2], self.split.images.shape[-1])
        if self.plan.flips[i]:
            img = TF.horizontal_flip(img)
        img = TF.normalize(TF.to_dtype(img, torch.float32, scale=True), self.split.mean, self.split.std)
        return img, self.split.labels[j]


class TorchLoader(Loader):
    name = "torch"

    def __init__(self, split, batch_size, device, drop_last=False, workers: int = 0):
        super().__init__(split, batch_size, device, drop_last)
        self.workers = workers

    def batches(self, plan: Plan, start: int = 0):
        ds = _PlannedImages(self.split, plan)
        first = start * self.batch_size
        sampler = range(first, len(ds))
        dl = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=self.drop_last,
                                         num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                         persistent_workers=False)
        for x, y in dl:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class BatchStream:
    """An endless stream of batches over one split, reshuffled (new plan) at each pass. Persistent: never
    rebuilt per step. Its state is (pass, position) — enough to resume exactly."""

    def __init__(self, loader: Loader, seed: int, stream: str):
        self.loader, self.seed, self.stream = loader, seed, stream
        self.pass_index, self.position = 0, 0
        self._it = None

    def state_dict(self) -> dict:
        return {"pass_index": self.pass_index, "position": self.position}

    def load_state_dict(self, state: dict, world: int = 1) -> None:
        """`world`: how many ranks the saved run had. The position counts this rank's batches; under another
        world size it is rescaled to the same point of the whole plan (rounded down: at most one global
        batch is seen again)."""
        position = int(state["position"]) * world // self.loader.world
        self.pass_index, self.position, self._it = int(state["pass_index"]), position, None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                plan = self.loader.plan(self.seed, self.stream, self.pass_index)
                self._it = self.loader.batches(plan, self.position)
            batch = next(self._it, None)
            if batch is not None:
                self.position += 1
                return batch
            self.pass_index, self.position, self._it = self.pass_index + 1, 0, None


def epoch_batches(loader: Loader, seed: int, stream: str, epoch: int):
    """One full pass (one epoch) of `stream`, with its own plan."""
    return loader.batches(loader.plan(seed, stream, epoch))
