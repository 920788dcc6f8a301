"""CIFAR-100 and users' image folders for search and train: the class count reaches the networks, image
folders decode and resize exactly as stated, the split holds every class, resume, bad input."""
import json
import os

import numpy as np
import pytest
import torch

from image_folders import corrupt_jpeg, make_folder
from milenas_fast.cli import main
from milenas_fast.data import load_dataset, split_train_val
from milenas_fast.data.datasets import interleave, load_cifar, load_image_folder
from milenas_fast.search import loop as search_loop

SEARCH = ["search", "--layers", "3", "--init_channels", "4", "--batch_size", "8", "--workers", "0",
          "--device", "cpu", "--quiet", "--deterministic", "--epochs", "1"]
TRAIN = ["train", "--layers", "3", "--init_channels", "4", "--batch_size", "8", "--workers", "0",
         "--device", "cpu", "--quiet", "--epochs", "1", "--auxiliary"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(search_loop, "_plot", lambda run_dir: None)  # plots cost seconds; test_plot covers them


class FakeCIFAR100:
    """torchvision.datasets.CIFAR100's face (data NHWC uint8, targets), 16 training / 8 test images."""

    def __init__(self, root, train=True, download=False):
        n = 16 if train else 8
        rng = np.random.default_rng(int(train))
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = [int(t) for t in rng.integers(0, 100, n)]


def test_cifar100_search_and_train_have_100_classes(monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    split = load_cifar("cifar100", "unused")
    assert split.num_classes == 100 and split.images.shape == (16, 3, 32, 32)
    assert torch.equal(split.images[5].permute(1, 2, 0), torch.from_numpy(FakeCIFAR100("x").data[5]))
    assert main([*SEARCH, "--dataset", "cifar100", "--save_dir", "s"]) == 0
    assert torch.load("s/checkpoint.pt", weights_only=True)["model"]["classifier.weight"].shape[0] == 100
    assert main([*TRAIN, "--dataset", "cifar100", "--save_dir", "t"]) == 0
    weights = torch.load("t/weights_last.pt", weights_only=True)
    assert weights["classifier.weight"].shape[0] == weights["auxiliary_head.classifier.weight"].shape[0] == 100
    for run in ("s", "t"):  # CIFAR-100's own statistics, recorded in the log
        log = open(f"{run}/log.txt").read()
        assert "normalisation: mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762)" in log


def test_missing_cifar100_says_where_files_go(monkeypatch, tmp_path, capsys):
    import torchvision

    def offline(*args, download=False, **kwargs):
        raise (OSError("network is unreachable") if download else RuntimeError("Dataset not found or corrupted."))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    assert main([*SEARCH, "--dataset", "cifar100", "--data", "d", "--save_dir", "s"]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-100 is not in" in err and "cifar-100-python.tar.gz" in err and err.count("\n") == 1
    assert not os.path.exists("s")


def test_image_folder_decodes_crops_and_resizes_as_stated(tmp_path):
    """Lossless PNGs: at its own size an image comes back unchanged; a wide one loses its side columns
    (centre square); grayscale becomes three equal channels; downsizing is torchvision's antialiased resize."""
    from PIL import Image

    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (20, 31, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    for cls, name, arr in (("a", "sq.png", square), ("a", "wide.png", wide), ("b", "gray.png", gray)):
        (tmp_path / "f" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "f" / cls / name)
    split = load_image_folder(tmp_path / "f", 20)
    assert split.num_classes == 2 and split.images.dtype == torch.uint8
    by_label = {int(y): split.images[i] for i, y in enumerate(split.labels)}
    assert torch.equal(by_label[1], torch.from_numpy(gray[:, 2:22]).expand(3, 20, 20))  # (24 − 20) / 2 cut each side
    got_a = split.images[split.labels == 0]
    assert torch.equal(got_a[0], torch.from_numpy(square).permute(2, 0, 1))  # sorted by path: sq before wide
    # torchvision's centre crop rounds the left edge: round((31 − 20) / 2) = 6
    assert torch.equal(got_a[1], torch.from_numpy(wide[:, 6:26]).permute(2, 0, 1))

    small = load_image_folder(tmp_path / "f", 8).images.float()
    pooled = torch.nn.functional.interpolate(torch.from_numpy(square).permute(2, 0, 1)[None].float(), size=8,
                                             mode="bilinear", antialias=True)[0]
    assert (small[0] - pooled).abs().max() <= 1.0  # uint8 rounding only


def test_interleave_makes_every_prefix_stratified():
    samples = [(f"{c}/{k}", c) for c, n in enumerate((6, 3, 9)) for k in range(n)]
    mixed = interleave(samples)
    assert sorted(mixed) == sorted(samples)
    for cut in (6, 9, 12):  # a prefix holds each class in proportion to its size (±1)
        counts = np.bincount([c for _, c in mixed[:cut]], minlength=3)
        assert (abs(counts - cut * np.array([6, 3, 9]) / 18) <= 1).all(), (cut, counts)
    assert [k for _, k in mixed if k == 2] and [p for p, c in mixed if c == 0] == [f"0/{k}" for k in range(6)]


@pytest.mark.gpu_path
def test_image_folder_search_split_resume_and_train(tmp_path, ctrl_c_in_second_epoch):
    """A search on DIR/train (the layout train reads) with every class on both sides of the split;
    interrupted and resumed it ends with the α and weights of an uninterrupted one; train on DIR."""
    data = tmp_path / "data"
    make_folder(data / "train", classes=("ant", "bee", "cat", "dog"), per_class=4)
    make_folder(data / "val", classes=("ant", "bee", "cat", "dog"), per_class=2, seed=1)
    train, valid = split_train_val(load_dataset("imagefolder", data, image_size=16), 0.5)
    assert set(train.labels.tolist()) == set(valid.labels.tolist()) == {0, 1, 2, 3}
    assert train.num_classes == 4 and train.images.shape[1:] == (3, 16, 16)

    common = [*SEARCH, "--dataset", "imagefolder", "--data", str(data), "--image_size", "16", "--epochs", "2"]
    assert main([*common, "--save_dir", "straight"]) == 0
    with ctrl_c_in_second_epoch(search_loop.Search):
        assert main([*common, "--save_dir", "split"]) == 130
    assert main(["search", "--resume", "split", "--quiet", "--workers", "0"]) == 0  # --data from the checkpoint
    a, b = (torch.load(f"{run}/checkpoint.pt", weights_only=True) for run in ("straight", "split"))
    assert a["model"]["classifier.weight"].shape[0] == 4
    for x, y in zip(a["alphas"], b["alphas"]):
        assert torch.equal(x, y)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert json.loads(open("split/args.json").read())["image_size"] == 16

    assert main([*TRAIN, "--dataset", "imagefolder", "--data", str(data), "--image_size", "16",
                 "--genotype", "straight", "--save_dir", "t"]) == 0
    assert torch.load("t/weights_last.pt", weights_only=True)["classifier.weight"].shape[0] == 4
    assert "mult-adds = " in open("t/log.txt").read()
    for run in ("straight", "t"):
        assert "(measured on the training images)" in open(f"{run}/log.txt").read()


def user_error(capsys, argv, match):
    before = set(os.listdir("."))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err, err
    assert set(os.listdir(".")) == before
    return err


def test_image_folder_bad_input_exits_2_before_writing(tmp_path, capsys):
    search = [*SEARCH, "--dataset", "imagefolder"]
    train = [*TRAIN, "--dataset", "imagefolder"]
    user_error(capsys, [*search, "--data", "missing"], "image folder missing does not exist")
    root = make_folder(tmp_path / "f", per_class=4)
    user_error(capsys, [*search, "--data", str(root), "--image_size", "30"], "multiple of 4")
    user_error(capsys, [*SEARCH, "--dataset", "synthetic", "--image_size", "64"], "synthetic images are 32×32")
    user_error(capsys, [*train, "--data", str(root)], "does not exist")  # train needs f/train and f/val
    corrupt_jpeg(root / "bee" / "img0.jpg", "truncated")  # passes a header check, fails decoding
    user_error(capsys, [*search, "--data", str(root)], f"corrupt image {root / 'bee' / 'img0.jpg'}")
