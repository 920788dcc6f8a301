"""NVIDIA DALI loader (optional extra `dali`: `pip install -e .[dali]`, i.e. `nvidia-dali-cuda130`; on a
CUDA 12 driver install `nvidia-dali-cuda120` instead).

The pipeline follows the same Plan as the other loaders: order, crop offsets and flips come from the
plan and are fed in through `external_source`, so for a given plan every loader gives the same batches
(checked bit for bit against `augment_batch` on DALI's CPU pipeline). Per batch:

    uint8 HWC images (gathered in plan order on the host)
    → slice 32×32 at anchor (top−4, left−4) with out_of_bounds_policy="pad", fill 0
      (= 4-pixel zero padding then the plan's integer window: each of the 9×9 offsets as likely as the plan
      makes it, no continuous-uniform edge bias)
    → horizontal flip where the plan says so
    → float32, x/255, −mean, /std (the same op sequence as torchvision's to_tensor + normalize)
    → CHW

With a CUDA device the slice/flip/normalise run on the GPU (`device_id` = the torch device's index); with
`device_id=None` (a CPU device) the same pipeline runs on the CPU, which is how CI tests it.
GPU path: written against DALI 2.4's documented API but NOT run yet (no GPU with DALI in this project's
test machines); the CPU pipeline is tested.

`GuardedDali` is what `make_loader("dali")` returns: any DALI failure (building the pipeline, or any batch)
becomes a one-line DataError for an explicit `--loader dali`, and for `--loader auto` one warning and the
GPU-resident loader from the same batch on (every loader gives the same batches for a plan, so the
switch changes nothing the run computes). That policy is `Guard`, shared with the ImageNet loaders
(imagenet.py), whose fallback is the torchvision loader.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .datasets import CIFAR_MEAN, CIFAR_STD, Split

from ..errors import DataError
from .loaders import PAD, Plan, ResidentLoader, Loader, to_device

# Why DALI failed in this process, once it has: later `auto` loaders skip it without a second warning.
_failure: str | None = None


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (missing CUDA libraries) raises more than ImportError
        return False
    return True


def build_pipeline(batch_size: int, device_id: int | None, height: int = 32, width: int = 32, num_threads: int = 2,
                   mean: tuple = CIFAR_MEAN, std: tuple = CIFAR_STD):
    """A DALI pipeline with three external sources (images uint8 HWC, anchors int32 [2] = (top, left) in
    the unpadded image, i.e. plan offset − PAD, flips int32 scalar) and one output: float32 CHW normalised
    by `mean`/`std` (the split's)."""
    from nvidia.dali import fn, pipeline_def, types

    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    shape = np.asarray([height, width], dtype=np.int32)

    # Synchronous, unpipelined execution: every run() consumes exactly the inputs fed just before it,
    # which keeps feed/run pairs trivially in step with the plan (a batch is ~200 KB; DALI's own
    # prefetching buys nothing at this size).
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, exec_async=False,
                  exec_pipelined=False, prefetch_queue_depth=1)
    def pipe():
        images = fn.external_source(name="images", layout="HWC", dtype=types.UINT8)
        anchors = fn.external_source(name="anchors", dtype=types.INT32)
        flips = fn.external_source(name="flips", dtype=types.INT32)
        if device_id is not None:
            images = images.gpu()
        x = fn.slice(images, anchors, shape, axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
        x = fn.flip(x, horizontal=flips)
        x = fn.cast(x, dtype=types.FLOAT)
        x = (x / 255.0 - mean) / std
        return fn.transpose(x, perm=[2, 0, 1])

    p = pipe()
    p.build()
    return p


class DaliLoader(Loader):
    name = "dali"

    def __init__(self, split: Split, batch_size: int, device: torch.device, drop_last: bool = False,
                 num_threads: int = 2):
        if not available():
            raise RuntimeError("--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                               "(or nvidia-dali-cuda120 for a CUDA 12 driver), or use --loader gpu / torch")
        super().__init__(split, batch_size, device, drop_last)
        self.device_id = None if device.type == "cpu" else (device.index if device.index is not None
                                                             else torch.cuda.current_device())
        # Host copy in HWC: DALI's slice/flip work on an HWC layout; gathering a batch is one numpy take.
        self.images_hwc = np.ascontiguousarray(split.images.permute(0, 2, 3, 1).numpy())
        self.labels = split.labels.to(device)
        _, _, self.height, self.width = split.images.shape
        self.pipe = build_pipeline(batch_size, self.device_id, self.height, self.width, num_threads,
                                   split.mean, split.std)

    def _run(self, idx: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        self.pipe.feed_input("images", self.images_hwc[idx])
        self.pipe.feed_input("anchors", list((offsets - PAD).astype(np.int32)))
        self.pipe.feed_input("flips", list(flips.astype(np.int32)))
        (out,) = self.pipe.run()
        return to_torch(out, self.device)

    def batches(self, plan: Plan, start: int = 0):
        order = plan.order.numpy()
        offsets = plan.offsets.numpy()
        flips = plan.flips.numpy()
        order_dev = to_device(plan.order, self.device)  # once per pass: labels are gathered on the device
        for i in range(start, self.batch_count(len(plan))):  # the plan may be one rank's share
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield self._run(order[sl], offsets[sl], flips[sl]), self.labels[order_dev[sl]]


def _first_line(e: BaseException) -> str:
    """One line saying why: for DALI's multi-line pipeline errors, the failing operator and its reason
    (its first line is only "Critical error in pipeline:")."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    op = next((line.rstrip(",") for line in lines if line.startswith("Error in ")), None)
    if op and "encountered:" in lines[:-1]:
        return f"{type(e).__name__}: {op}: {lines[lines.index('encountered:') + 1][:300]}"
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A DALI pipeline output (dense batch) as a torch tensor on `device`: a host copy for the CPU
    pipeline, a device-to-device copy on the current stream for the GPU one."""
    tensor = tensor_list.as_tensor()
    if device.type == "cpu":
        return torch.from_numpy(np.array(tensor)).to(device)
    from nvidia.dali import types
    from nvidia.dali.plugin.pytorch import feed_ndarray  # GPU path: not run in CI

    dtype = {types.FLOAT: torch.float32, types.INT32: torch.int32, types.INT64: torch.int64,
             types.UINT8: torch.uint8}[tensor.dtype]
    x = torch.empty(tensor.shape(), dtype=dtype, device=device)
    feed_ndarray(tensor, x, cuda_stream=torch.cuda.current_stream(device))
    return x


class Guard:
    """The failure policy of a DALI loader, for any loader pair with `batches(start)`-style iteration.

    `build()` makes the DALI loader, `fallback()` the loader that takes over (from the batch DALI failed
    on: both must give the same batches from there). Strict (an explicit `--loader dali`): any failure is
    a one-line DataError suggesting `alternatives`. Not strict (`auto`): one warning per process, then
    the fallback (`instead` says which, in the warning); once DALI failed in this process, later non-strict guards do not try it again."""

    def __init__(self, build, fallback, strict: bool, instead: str, alternatives: str):
        self.fallback, self.strict, self.instead, self.alternatives = fallback, strict, instead, alternatives
        self.inner, self.on_dali = None, False
        if _failure is not None and not strict:
            self.inner = fallback()
            return
        try:
            self.inner, self.on_dali = build(), True
        except Exception as e:  # noqa: BLE001 - DALI raises many types; all mean "DALI cannot run here"
            self._failed(f"building its pipeline ({_first_line(e)})")

    def _failed(self, what: str) -> None:
        global _failure
        if self.strict:
            raise DataError(f"--loader dali failed {what}; use --loader {self.alternatives}") from None
        if _failure is None:
            warnings.warn(f"milenas_fast: the DALI loader failed {what}; using {self.instead}", RuntimeWarning,
                          stacklevel=4)
        _failure = what
        self.inner, self.on_dali = self.fallback(), False

    def run(self, batches, start: int = 0):
        """Yield `batches(loader, start)` of the current loader; on a DALI failure at batch i, continue
        with `batches(fallback, i)`."""
        i, it = start, batches(self.inner, start)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001
                if not self.on_dali:
                    raise
                self._failed(f"at batch {i} of a pass ({_first_line(e)})")
                it = batches(self.inner, i)
                continue
            i += 1
            yield batch


class GuardedDali(Loader):
    """DALI with its failures handled (see Guard); the fallback is the GPU-resident loader."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, drop_last: bool = False,
                 strict: bool = True):
        super().__init__(split, batch_size, device, drop_last)
        # DaliLoader looked up at call time: tests replace it with injected faults
        self.guard = Guard(lambda: DaliLoader(split, batch_size, device, drop_last),
                           lambda: ResidentLoader(split, batch_size, device, drop_last),
                           strict, "the GPU-resident loader instead (same batches)", "gpu, torch or auto")

    @property
    def name(self) -> str:
        return self.guard.inner.name

    def batches(self, plan: Plan, start: int = 0):
        return self.guard.run(lambda loader, s: loader.batches(plan, s), start)
