"""Datasets: the synthetic set is deterministic, balanced and learnable; the DARTS split."""
import pytest
import torch
import torch.nn as nn

from milenas_fast.data import DataError, load_dataset, split_train_val
from milenas_fast.data.datasets import load_cifar10, make_synthetic
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
