"""Datasets: the synthetic set is deterministic, balanced and learnable; the DARTS split."""
import pytest
import torch
import torch.nn as nn

from milenas_fast.data import DataError, load_dataset, split_train_val
from milenas_fast.data.datasets import load_cifar10, make_synthetic
from milenas_fast.data.eval_data import cutout, cutout_generator
from milenas_fast.data.loaders import ResidentLoader, epoch_batches


def test_synthetic_is_deterministic_and_balanced():
    a, b = make_synthetic(300), make_synthetic(300)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.dtype == torch.uint8 and a.images.shape == (300, 3, 32, 32)
    assert torch.bincount(a.labels, minlength=10).tolist() == [30] * 10
    train, valid = split_train_val(a, 0.5)
    assert len(train) == len(valid) == 150
    assert torch.bincount(train.labels, minlength=10).min() >= 8  # shuffled classes: both halves hold all


def test_split_is_the_darts_floor_split():
    data = make_synthetic(101)
    train, valid = split_train_val(data, 0.5)
    assert (len(train), len(valid)) == (50, 51)
    assert torch.equal(train.images, data.images[:50])
    with pytest.raises(DataError):
        split_train_val(make_synthetic(3), 0.2)


@pytest.mark.slow  # trains a classifier
def test_synthetic_is_learnable_far_above_chance():
    """A small CNN trained briefly on augmented batches must beat chance (10%) by a wide margin."""
    torch.manual_seed(0)
    train, test = split_train_val(make_synthetic(1200), 5 / 6)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(16, 32, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loader = ResidentLoader(train, 50, torch.device("cpu"))
    for epoch in range(4):
        for x, y in epoch_batches(loader, 0, "train", epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        x, y = next(epoch_batches(ResidentLoader(test, len(test), torch.device("cpu")), 0, "infer", 0))
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc


def test_unknown_dataset_and_missing_cifar(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path, download=False)


def cutout_reference(x, length, cy, cx):
    """DARTS' Cutout, one image at a time: zero rows [cy − l//2, cy + l//2) × columns alike, clipped."""
    out = x.clone()
    half = length // 2
    for i in range(x.shape[0]):
        y0, y1 = max(0, int(cy[i]) - half), min(x.shape[2], int(cy[i]) + half)
        x0, x1 = max(0, int(cx[i]) - half), min(x.shape[3], int(cx[i]) + half)
        out[i, :, y0:y1, x0:x1] = 0
    return out


@pytest.mark.parametrize("length", [3, 4, 16])
def test_cutout_matches_the_per_image_reference(length):
    B, H, W = 37, 7, 9
    x = torch.randn(B, 3, H, W) + 5  # no natural zeros
    got = cutout(x, length, cutout_generator(2, 3, 4))
    g = cutout_generator(2, 3, 4)  # the centres: B rows, then B columns, from the same generator
    cy, cx = torch.randint(0, H, (B,), generator=g), torch.randint(0, W, (B,), generator=g)
    assert torch.equal(got, cutout_reference(x, length, cy, cx))
    holes = (got == 0).all(1).sum((1, 2))
    side = 2 * (length // 2)  # DARTS' square is [c − l//2, c + l//2): even-sided
    assert int(holes.max()) == min(side, H) * min(side, W)  # some square lies wholly inside
    assert int(holes.min()) > 0
