"""Per-dataset normalisation: CIFAR-100 by CIFAR-100's constants, an image folder by its own training
images' statistics (its test set and the search's validation half too), CIFAR-10 and synthetic as before;
every loader and the test batches apply the split's statistics, checked against hand computations."""
import numpy as np
import pytest
import torch

from image_folders import make_folder
from milenas_fast.data import dali_loader, eval_data, load_dataset, split_train_val
from milenas_fast.data.datasets import CIFAR_MEAN, CIFAR_STD, Split, image_stats, load_cifar, make_synthetic
from milenas_fast.data.eval_data import load_train_test
from milenas_fast.data import make_loader
from milenas_fast.data.loaders import PAD, Plan, normalize

CPU = torch.device("cpu")
C100_MEAN, C100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)  # DARTS-family CIFAR-100 code
LOADERS = ["gpu", "torch"] + (["dali"] if dali_loader.available() else [])


class FakeCIFAR:
    """torchvision's CIFAR face (data NHWC uint8, targets): 7 training / 5 test images."""

    def __init__(self, root, train=True, download=False):
        rng = np.random.default_rng(int(train))
        self.data = rng.integers(0, 256, (7 if train else 5, 32, 32, 3), dtype=np.uint8)
        self.targets = [int(t) for t in rng.integers(0, 10, len(self.data))]


@pytest.fixture
def fake_cifars(monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR)


def by_hand(images: torch.Tensor, mean, std) -> np.ndarray:
    """(x/255 − mean)/std in float64 numpy."""
    x = images.numpy().astype(np.float64) / 255
    return (x - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]


def unaugmented(split: Split, kind: str) -> torch.Tensor:
    """Every image of `split` through loader `kind` in order, uncropped (offset PAD) and unflipped."""
    n = len(split)
    plan = Plan(torch.arange(n), torch.full((n, 2), PAD), torch.zeros(n, dtype=torch.bool))
    loader = make_loader(kind, split, 4, CPU)
    return torch.cat([x for x, _ in loader.batches(plan)])


def stats_by_hand(images: torch.Tensor):
    x = images.numpy().astype(np.float64) / 255
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


@pytest.mark.gpu_path
@pytest.mark.parametrize("kind", LOADERS)
def test_cifar100_batches_are_normalised_with_cifar100_constants(fake_cifars, kind):
    train, test = load_train_test("cifar100", "unused")
    assert train.mean == test.mean == C100_MEAN and train.std == test.std == C100_STD
    x = unaugmented(train, kind)
    want = by_hand(train.images, C100_MEAN, C100_STD)
    np.testing.assert_allclose(x.numpy(), want, rtol=0, atol=2e-6)
    assert np.abs(want - by_hand(train.images, CIFAR_MEAN, CIFAR_STD)).max() > 0.05  # the check can fail
    got = torch.cat([x for x, _ in eval_data.TestBatches(test, 2, CPU)])
    np.testing.assert_allclose(got.numpy(), by_hand(test.images, C100_MEAN, C100_STD), rtol=0, atol=2e-6)


@pytest.mark.gpu_path
def test_image_folder_is_normalised_by_its_training_images(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", per_class=3)
    make_folder(root / "val", per_class=2, seed=7)
    train, test = load_train_test("imagefolder", root, image_size=12)
    mean, std = stats_by_hand(train.images)
    np.testing.assert_allclose(train.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(train.std, std, rtol=1e-12)
    assert test.mean == train.mean and test.std == train.std
    assert np.abs(np.asarray(stats_by_hand(test.images)[0]) - mean).max() > 1e-3  # the test set's own differ
    for kind in LOADERS:
        np.testing.assert_allclose(unaugmented(train, kind).numpy(), by_hand(train.images, mean, std), atol=2e-6)
    got = torch.cat([x for x, _ in eval_data.TestBatches(test, 4, CPU)])
    np.testing.assert_allclose(got.numpy(), by_hand(test.images, mean, std), rtol=0, atol=2e-6)


@pytest.mark.gpu_path
def test_search_split_of_an_image_folder_uses_its_train_half_only(tmp_path):
    make_folder(tmp_path / "train", per_class=4)
    data = load_dataset("imagefolder", tmp_path, image_size=10)
    train, valid = split_train_val(data, 0.5)
    mean, std = stats_by_hand(data.images[: len(train)])
    np.testing.assert_allclose(train.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(train.std, std, rtol=1e-12)
    assert valid.mean == train.mean and valid.std == train.std
    assert np.abs(np.asarray(data.mean) - mean).max() > 1e-4  # the whole set's statistics differ
    x = unaugmented(valid, "gpu")
    np.testing.assert_allclose(x.numpy(), by_hand(valid.images, mean, std), rtol=0, atol=2e-6)


def test_cifar10_and_synthetic_keep_cifar10_constants(fake_cifars):
    assert CIFAR_MEAN == (0.49139968, 0.48215827, 0.44653124) and CIFAR_STD == (0.24703233, 0.24348505, 0.26158768)
    splits = [*load_train_test("cifar10", "unused"), *split_train_val(make_synthetic(20), 0.5),
              *load_train_test("synthetic", "unused", synthetic_images=20)]
    for split in splits:
        assert split.mean == CIFAR_MEAN and split.std == CIFAR_STD and not split.fitted
    x = load_cifar("cifar10", "unused").images
    assert torch.equal(normalize(x, splits[0].mean, splits[0].std), normalize(x))


def test_a_constant_channel_gets_a_finite_normalisation():
    images = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    images[:, 1] = 128
    mean, std = image_stats(images)
    assert mean[1] == 128 / 255 and std[1] == 1 / 255 and std[0] > 0.1
    assert torch.isfinite(normalize(images, mean, std)).all()
