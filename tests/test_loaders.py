"""Loaders: exact DARTS augmentation (uniform integer offsets, flips, zero padding, torchvision values),
identical batches across loaders for one plan, and BatchStream resume. CPU only; DALI tests run DALI's
CPU pipeline (device_id=None) and skip when DALI is not installed (CI does not install the extra)."""
import pytest
import torch

from milenas_fast.data import dali_loader
from milenas_fast.data.datasets import CIFAR_MEAN, CIFAR_STD, Split
from milenas_fast.data.loaders import (PAD, BatchStream, Plan, ResidentLoader, TorchLoader, augment_batch,
                                       normalize)

CPU = torch.device("cpu")
needs_dali = pytest.mark.skipif(not dali_loader.available(), reason="NVIDIA DALI not installed (extra `dali`)")


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
        if not dali_loader.available():
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
