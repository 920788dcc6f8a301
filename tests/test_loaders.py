"""Loaders: exact DARTS augmentation (uniform integer offsets, flips, zero padding, torchvision values),
identical batches across loaders for one plan, BatchStream resume, no per-batch host-to-device copies, and
DALI's failure handling. CPU only; DALI tests run DALI's CPU pipeline (device_id=None) and skip when DALI is
not installed, except in CI (env CI set; CI installs the extra), where they fail; the failure tests inject
failures and need no DALI."""
import os
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from milenas_fast.data import DataError, dali_loader, loaders
from milenas_fast.data.datasets import CIFAR_MEAN, CIFAR_STD, Split
from milenas_fast.data.loaders import PAD, BatchStream, Plan, ResidentLoader, TorchLoader, augment_batch, normalize
from milenas_fast.data.select import LoaderName, make_loader, resolve_loader

CPU = torch.device("cpu")
NO_DALI = not dali_loader.available() and not os.environ.get("CI")  # in CI a missing DALI fails the DALI tests
needs_dali = pytest.mark.skipif(NO_DALI, reason="NVIDIA DALI not installed (extra `dali`)")


def random_split(n, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=g))


def make(kind, split, batch_size):
    if kind == "gpu":
        return ResidentLoader(split, batch_size, CPU)
    if kind == "torch":
        return TorchLoader(split, batch_size, CPU, workers=0)
    if kind == "dali":
        if NO_DALI:
            pytest.skip("NVIDIA DALI not installed (extra `dali`)")
        return dali_loader.DaliLoader(split, batch_size, CPU, num_threads=1)
    raise ValueError(kind)


# --- offsets and flips, recovered from the loader's output ------------------------------------------------

def coordinate_image(size=32):
    """Channel 0 = row + 1, channel 1 = column + 1, channel 2 = 0: every output pixel says where it came from
    (0 in channels 0/1 means padding)."""
    r = torch.arange(size).view(-1, 1).expand(size, size)
    c = torch.arange(size).view(1, -1).expand(size, size)
    return torch.stack([r + 1, c + 1, torch.zeros_like(r)]).to(torch.uint8)


def recover(x: torch.Tensor):
    """From normalised outputs [B, 3, H, W] of coordinate images: plan offsets (top, left) in 0..8 and flips."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    v = (x * std + mean).mul(255).round().long()  # back to uint8 values
    B, _, H, W = x.shape
    # the centre pixel always comes from the image (|offset − PAD| ≤ 4 < 16)
    i, j = H // 2, W // 2
    row_src, col_src = v[:, 0, i, j] - 1, v[:, 1, i, j] - 1
    flips = v[:, 1, i, j + 1] < v[:, 1, i, j]
    top = row_src - i + PAD
    left = torch.where(flips, col_src - (W - 1 - j) + PAD, col_src - j + PAD)
    return torch.stack([top, left], 1), flips


@pytest.mark.parametrize("kind", ["gpu", "dali"])
def test_offsets_uniform_over_81_positions_and_flip_rate(kind):
    n, batch = 81 * 250, 2025
    split = Split(coordinate_image().expand(n, 3, 32, 32).contiguous(), torch.zeros(n, dtype=torch.int64))
    loader = make(kind, split, batch)
    plan = Plan.draw(n, seed=7, stream="train", pass_index=0)
    offs, flips = [], []
    for x, _ in loader.batches(plan):
        o, f = recover(x)
        offs.append(o)
        flips.append(f)
    offs, flips = torch.cat(offs), torch.cat(flips)
    # the loader applied exactly what the plan says (position i of the pass ↔ plan entry i)
    assert torch.equal(offs, plan.offsets) and torch.equal(flips, plan.flips)
    dy, dx = offs[:, 0] - PAD, offs[:, 1] - PAD
    assert int(dy.min()) == -4 and int(dy.max()) == 4 and int(dx.min()) == -4 and int(dx.max()) == 4
    counts = torch.bincount(offs[:, 0] * 9 + offs[:, 1], minlength=81).double()
    expected = n / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 80 degrees of freedom: mean 80, sd 12.6; 140 is p ≈ 1e-4. A continuous-uniform crop (edge offsets at
    # half probability, corners at a quarter) gives chi2 in the thousands here.
    assert chi2 < 140, (chi2, counts.view(9, 9))
    # each edge row/column of the 9×9 grid has its full share (the failure mode of a continuous range)
    grid = counts.view(9, 9)
    assert float(grid[0].sum() / grid[4].sum()) > 0.85 and float(grid[:, 8].sum() / grid[:, 4].sum()) > 0.85
    rate = float(flips.double().mean())
    assert abs(rate - 0.5) < 0.02, rate  # sd 0.0035 at this n


@pytest.mark.parametrize("kind", ["gpu", "torch", "dali"])
def test_zero_padding_is_exact(kind):
    """An all-255 image cropped at offset (0, 0) shows a 4-pixel border of exactly normalize(0) top and left;
    at offset (8, 8) bottom and right; flipped, the border moves to the other side."""
    split = Split(torch.full((3, 3, 32, 32), 255, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    plan = Plan(torch.arange(3), torch.tensor([[0, 0], [8, 8], [0, 0]]), torch.tensor([False, False, True]))
    (x, _), = list(make(kind, split, 3).batches(plan))
    zero = normalize(torch.zeros(3, 1, 1, dtype=torch.uint8)).view(3, 1, 1)
    full = normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8)).view(3, 1, 1)
    pad = torch.zeros(3, 32, 32, dtype=torch.bool)
    pad[:, :4, :] = True
    pad[:, :, :4] = True
    expect0 = torch.where(pad, zero, full)
    expect1 = torch.where(pad.flip(1).flip(2), zero, full)
    expect2 = torch.where(pad.flip(2), zero, full)
    for got, want in zip(x, [expect0, expect1, expect2]):
        assert torch.equal(got, want.expand_as(got))


def torchvision_reference(img_uint8: torch.Tensor, top: int, left: int, flip: bool, pil: bool) -> torch.Tensor:
    """The DARTS transform through torchvision's v1 functional API, on a PIL image or a tensor."""
    import torchvision.transforms.functional as F

    img = F.to_pil_image(img_uint8) if pil else img_uint8
    img = F.pad(img, [PAD], fill=0)
    img = F.crop(img, top, left, 32, 32)
    if flip:
        img = F.hflip(img)
    t = F.to_tensor(img) if pil else img.float().div(255)
    return F.normalize(t, CIFAR_MEAN, CIFAR_STD)


@pytest.mark.parametrize("kind", ["gpu", "torch", "dali"])
def test_same_values_as_torchvision(kind):
    n = 12
    split = random_split(n, seed=3)
    plan = Plan.draw(n, seed=1, stream="train", pass_index=5)
    plan.offsets[:4] = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0]])  # the extreme windows, for sure
    x, y = next(make(kind, split, n).batches(plan))
    for k in range(n):
        j = int(plan.order[k])
        top, left = (int(v) for v in plan.offsets[k])
        for pil in (True, False):
            ref = torchvision_reference(split.images[j], top, left, bool(plan.flips[k]), pil)
            torch.testing.assert_close(x[k], ref, atol=1e-6, rtol=0)
        assert int(y[k]) == int(split.labels[j])


@pytest.mark.parametrize("other", ["torch", "dali"])
def test_loaders_give_the_same_batches_for_one_plan(other):
    n, batch = 50, 16  # 4 batches, the last one partial (2 images)
    split = random_split(n, seed=11)
    plan = Plan.draw(n, seed=2, stream="valid", pass_index=3)
    ref = list(make("gpu", split, batch).batches(plan, start=1))
    got = list(make(other, split, batch).batches(plan, start=1))
    assert len(ref) == len(got) == 3 and ref[-1][0].shape[0] == 2
    for (xr, yr), (xg, yg) in zip(ref, got):
        assert torch.equal(yr, yg)
        torch.testing.assert_close(xg, xr, atol=1e-6, rtol=0)


def test_resident_matches_augment_batch_exactly():
    split = random_split(20, seed=5)
    plan = Plan.draw(20, seed=9, stream="train", pass_index=0)
    x, y = next(ResidentLoader(split, 20, CPU).batches(plan))
    assert torch.equal(x, augment_batch(split.images[plan.order], plan.offsets, plan.flips))
    assert torch.equal(y, split.labels[plan.order])


@needs_dali
def test_dali_matches_resident_bit_for_bit():
    split = random_split(40, seed=6)
    plan = Plan.draw(40, seed=4, stream="train", pass_index=1)
    for (xr, yr), (xd, yd) in zip(make("gpu", split, 16).batches(plan), make("dali", split, 16).batches(plan)):
        assert torch.equal(xr, xd) and torch.equal(yr, yd)


def test_plan_offsets_are_integers_on_0_to_8():
    plan = Plan.draw(81 * 200, seed=2, stream="train", pass_index=0)
    assert plan.offsets.dtype == torch.int64
    counts = torch.bincount(plan.offsets[:, 0] * 9 + plan.offsets[:, 1], minlength=81)
    assert counts.numel() == 81 and int(counts.min()) > 0


@pytest.mark.parametrize("kind", ["gpu", "torch"])
def test_batch_stream_state_round_trip(kind):
    split = random_split(30, seed=8)
    loader = make(kind, split, 8)  # 4 batches per pass (last has 6)
    a = BatchStream(loader, seed=2, stream="valid")
    for _ in range(6):  # into the second pass
        next(a)
    state = a.state_dict()
    assert state == {"pass_index": 1, "position": 2}
    expect = [next(a) for _ in range(5)]  # crosses into the third pass
    b = BatchStream(make(kind, split, 8), seed=2, stream="valid")
    b.load_state_dict(state)
    for (xe, ye), (xg, yg) in zip(expect, [next(b) for _ in range(5)]):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)
    # passes are reshuffled: pass 0 and pass 1 use different plans
    p0, p1 = (Plan.draw(30, 2, "valid", k) for k in (0, 1))
    assert not torch.equal(p0.order, p1.order)


def test_dali_absent_is_reported_cleanly(monkeypatch):
    monkeypatch.setattr(dali_loader, "available", lambda: False)
    with pytest.raises(RuntimeError, match="nvidia-dali-cuda130"):
        dali_loader.DaliLoader(random_split(4), 2, CPU)


# --- no per-batch host-to-device copies (fact 7 of issue 8) --------------------------------------------------
# A pageable host-to-device copy is synchronous: it waits for the whole stream, once per batch. These tests run
# the loaders' per-batch code on the `meta` device (a non-CPU device available everywhere) and record every
# host-to-device copy; `pin_memory` is stubbed (it needs a CUDA driver) and recorded instead.

class HostToDevice(TorchDispatchMode):
    """Records host → device copies as (op, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and out.device.type != "cpu":
            self.copies.append(("to", bool(kwargs.get("non_blocking", False))))
        if func is torch.ops.aten.copy_.default and args[1].device.type == "cpu" and args[0].device.type != "cpu":
            self.copies.append(("copy_", bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))))
        return out


META = torch.device("meta")


@pytest.fixture
def host_copies(monkeypatch):
    """Stubs pin_memory and counts torch.tensor calls (whose internal copy a dispatch mode cannot see)."""
    counts = {"pin_memory": 0, "torch.tensor": 0}

    def pin(self, *a, **k):
        counts["pin_memory"] += 1
        return self

    real_tensor = torch.tensor

    def tensor(*a, **k):
        counts["torch.tensor"] += 1
        return real_tensor(*a, **k)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch, "tensor", tensor)
    return counts


@pytest.mark.gpu_path
def test_normalize_builds_its_constants_once_per_device(host_copies):
    a, b = loaders._mean_std(META), loaders._mean_std(META)
    assert a[0] is b[0] and a[1] is b[1] and a[0].device == META
    x = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    normalize(x)  # the CPU constants may be built here, once
    before = host_copies["torch.tensor"]
    for _ in range(3):
        y = normalize(x)
    assert host_copies["torch.tensor"] == before
    mean, std = torch.as_tensor(CIFAR_MEAN).view(3, 1, 1), torch.as_tensor(CIFAR_STD).view(3, 1, 1)
    assert torch.equal(y, x.float().div(255).sub(mean).div(std))  # the same op sequence as before the cache


@pytest.mark.gpu_path
def test_to_device_pins_and_copies_without_blocking(host_copies):
    t = torch.arange(5)
    assert loaders.to_device(t, CPU) is t
    with HostToDevice() as rec:
        out = loaders.to_device(t, META)
    assert out.device == META and rec.copies == [("to", True)] and host_copies["pin_memory"] == 1


@pytest.mark.gpu_path
def test_resident_loader_copies_the_plan_once_per_pass_and_nothing_per_batch(host_copies):
    split = random_split(21, seed=12, size=9)
    loader = ResidentLoader(split, 8, META)
    loader.batches(Plan.draw(21, 0, "train", 0))  # a generator: nothing runs yet
    normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=META))  # constants for META exist
    tensors = host_copies["torch.tensor"]
    it = loader.batches(Plan.draw(21, 0, "train", 1))
    per_batch = []
    for _ in range(len(loader)):
        with HostToDevice() as rec:
            x, y = next(it)
        per_batch.append(rec.copies)
        assert x.device == META and x.shape[1:] == (3, 9, 9) and y.device == META
    # the plan's order, offsets and flips: pinned, non-blocking, at the start of the pass; then nothing
    assert per_batch == [[("to", True)] * 3, [], []], per_batch
    assert host_copies["pin_memory"] == 3 and host_copies["torch.tensor"] == tensors


@pytest.mark.gpu_path
def test_dali_loader_gathers_labels_on_the_device(host_copies):
    """DaliLoader.batches without DALI: the pipeline run is stubbed; the labels path is the real one."""
    split = random_split(20, seed=13, size=4)
    loader = dali_loader.DaliLoader.__new__(dali_loader.DaliLoader)
    loaders.Loader.__init__(loader, split, 8, META)
    loader.labels = split.labels.to(META)
    loader._run = lambda idx, offsets, flips: torch.empty(len(idx), 3, 4, 4, device=META)
    it = loader.batches(Plan.draw(20, 0, "valid", 0))
    per_batch = []
    for _ in range(3):
        with HostToDevice() as rec:
            _, y = next(it)
        per_batch.append(rec.copies)
        assert y.device == META
    assert per_batch == [[("to", True)], [], []], per_batch


# --- DALI failures: auto falls back with one warning, an explicit request stops with one line --------------

class FlakyDali(ResidentLoader):
    """Stands in for DaliLoader: right batches until batch `fail_at` of a pass, then a CUDA-style error."""
    name, fail_at = "dali", 1

    def batches(self, plan, start=0):
        for i, batch in enumerate(super().batches(plan, start), start):
            if i == self.fail_at:
                raise RuntimeError("CUDA error: an illegal memory access was encountered\n(second line)")
            yield batch


class BrokenDali:
    def __init__(self, *a, **k):
        raise RuntimeError("nvml: driver/library version mismatch\n(second line)")


@pytest.fixture
def fresh_dali(monkeypatch):
    monkeypatch.setattr(dali_loader, "_failure", None)  # no failure seen yet in this process


def dali_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "DALI" in str(w.message)]


@pytest.mark.gpu_path
def test_auto_picks_dali_non_strict_and_explicit_is_strict(monkeypatch):
    monkeypatch.setattr(dali_loader, "available", lambda: True)
    name, why = resolve_loader("auto", torch.device("cuda"))  # a device descriptor: no GPU needed
    assert name == "dali" and name.strict is False and "if DALI fails" in why
    name, _ = resolve_loader("dali", CPU)
    assert name == "dali" and name.strict is True
    monkeypatch.setattr(dali_loader, "available", lambda: False)
    assert resolve_loader("auto", torch.device("cuda"))[0] == "gpu"


@pytest.mark.gpu_path
def test_auto_dali_failing_to_build_falls_back_with_one_warning(monkeypatch, fresh_dali):
    monkeypatch.setattr(dali_loader, "DaliLoader", BrokenDali)
    split = random_split(20, seed=14)
    name = LoaderName("dali", strict=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train = make_loader(name, split, 8, CPU, drop_last=True)
        valid = make_loader(name, split, 8, CPU)  # the search builds two: still one warning
    (w,) = dali_warnings(record)
    msg = str(w.message)
    assert "building its pipeline" in msg and "driver/library version mismatch" in msg and "\n" not in msg
    assert train.name == valid.name == "gpu" and len(train) == 2 and len(valid) == 3
    plan = Plan.draw(20, 3, "train", 0)
    for (xa, ya), (xb, yb) in zip(train.batches(plan), ResidentLoader(split, 8, CPU, drop_last=True).batches(plan)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.gpu_path
def test_auto_dali_failing_at_a_batch_continues_there_on_the_resident_loader(monkeypatch, fresh_dali):
    monkeypatch.setattr(dali_loader, "DaliLoader", FlakyDali)
    split = random_split(30, seed=15)
    loader = make_loader(LoaderName("dali", strict=False), split, 8, CPU)
    assert loader.name == "dali"
    plan = Plan.draw(30, 1, "valid", 2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = list(loader.batches(plan))
    (w,) = dali_warnings(record)
    assert "at batch 1" in str(w.message) and "illegal memory access" in str(w.message)
    want = list(ResidentLoader(split, 8, CPU).batches(plan))
    assert len(got) == len(want) == 4 and loader.name == "gpu"
    for (xa, ya), (xb, yb) in zip(got, want):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.gpu_path
@pytest.mark.parametrize("broken", [BrokenDali, FlakyDali])
def test_explicit_dali_failure_is_a_one_line_data_error(monkeypatch, fresh_dali, broken):
    monkeypatch.setattr(dali_loader, "DaliLoader", broken)
    split = random_split(20, seed=16)
    with pytest.raises(DataError) as e:
        loader = make_loader(LoaderName("dali"), split, 8, CPU)
        list(loader.batches(Plan.draw(20, 0, "train", 0)))
    assert str(e.value).startswith("--loader dali failed") and "\n" not in str(e.value)
    assert "--loader gpu, torch or auto" in str(e.value)


def test_explicit_dali_that_cannot_run_exits_2_with_one_line(monkeypatch, fresh_dali, capsys, tmp_path):
    from milenas_fast.cli import main

    monkeypatch.setattr(dali_loader, "DaliLoader", BrokenDali)
    rc = main(["search", "--loader", "dali", "--device", "cpu", "--dataset", "synthetic", "--synthetic_images",
               "40", "--batch_size", "8", "--init_channels", "4", "--layers", "3", "--epochs", "1",
               "--save_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--loader dali failed" in err


@pytest.mark.gpu_path
def test_cutout_and_test_batches_make_no_blocking_copy(host_copies):
    from milenas_fast.data.eval_data import TestBatches, cutout, cutout_generator

    x = torch.empty(6, 3, 8, 8, device=META)
    with HostToDevice() as rec:
        out = cutout(x, 4, cutout_generator(0, 0, 0))
    assert out.device == META and rec.copies == [("to", True)]  # both centre draws in one pinned copy
    batches = TestBatches(random_split(10, seed=17, size=8), 4, META)
    normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=META))
    tensors = host_copies["torch.tensor"]
    with HostToDevice() as rec:
        assert [y.shape[0] for _, y in batches] == [4, 4, 2]
    assert rec.copies == [] and host_copies["torch.tensor"] == tensors
