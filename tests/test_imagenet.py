"""ImageNet transfer: DARTS' ImageNet network (parameter counts, mult-adds, stem strides, heads), the
protocol defaults of `train --dataset imagenet`, a 1-epoch run on a generated JPEG folder with resume,
and bad input."""
import csv
import json
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from image_folders import corrupt_jpeg, jpeg_imagenet, make_folder
from milenas_fast.cli import main
from milenas_fast.space.evalnet import (MOBILE_MULT_ADDS, NetworkCIFAR, NetworkImageNet, mult_adds,
                                        param_count)
from milenas_fast.space.known_genotypes import DARTS_V2, KNOWN, MILENAS
from milenas_fast.train import loop
from milenas_fast.train.config import TrainConfig

# C=48, 14 cells, 1000 classes, auxiliary head excluded. DARTS_V2's parameters are DARTS' published
# `param size = 4.718752MB`; the mult-adds are conv + linear layers at 224×224 (see test below for what
# is counted; the DARTS paper reports 574M for DARTS_V2 and MiLeNAS 584M for its cell).
IMAGENET = {"DARTS_V2": (4_718_752, 529_911_552), "MILENAS": (5_380_000, 602_353_152)}


def imagenet_on_meta(genotype, auxiliary=True, image_size=224):
    with torch.device("meta"):
        return NetworkImageNet(48, 1000, 14, auxiliary, genotype, image_size)


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_parameter_count_and_mult_adds(name):
    params, macs = IMAGENET[name]
    model = imagenet_on_meta(KNOWN[name])
    assert param_count(model) == params
    assert mult_adds(model, 224) == macs
    assert model.training  # the count runs in eval mode and puts the mode back
    # the mobile setting: DARTS_V2 is within 600M, MILENAS (by this count) just above
    assert (macs <= MOBILE_MULT_ADDS) == (name == "DARTS_V2")
    if name == "DARTS_V2":
        assert f"param size = {param_count(model) / 1e6:f}MB" == "param size = 4.718752MB"


def test_mult_adds_match_torch_flop_counter():
    """The hook counter against torch's FLOP counter (2 FLOPs per multiply-add; it also counts conv and
    matmul only) on a small ImageNet network, real tensors, odd class count; and by hand on a toy net."""
    torch.manual_seed(0)
    model = NetworkImageNet(8, 7, 5, True, MILENAS, image_size=64)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    assert mult_adds(model, 64) == counter.get_total_flops() // 2 > 0

    toy = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Conv2d(6, 6, 5, padding=4, dilation=2, groups=6),
                        nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    # 9×9 input → 5×5 maps: dense 3×3 (6 · 27 per pixel), depthwise dilated 5×5 (6 · 25), 1×1 (4 · 6); BN and
    # pooling not counted; linear 4 · 5
    assert mult_adds(toy, 9) == 25 * (6 * 27 + 6 * 25 + 4 * 6) + 4 * 5


def test_imagenet_stem_is_stride_8_and_cells_read_stem0_through_a_reduction():
    torch.manual_seed(0)
    model = NetworkImageNet(8, 10, 5, True, DARTS_V2, image_size=64)
    shapes = {}
    for name in ("stem0", "stem1", "cells.0", "cells.1", "cells.3", "auxiliary_head.features.1"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    x = torch.randn(2, 3, 64, 64)
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 10)
    assert shapes["stem0"] == (2, 8, 16, 16) and shapes["stem1"] == (2, 8, 8, 8)  # 64 / 4, 64 / 8
    assert shapes["cells.0"] == (2, 32, 8, 8)  # its s0 (16×16) went through a FactorizedReduce
    assert shapes["cells.1"] == (2, 64, 4, 4) and shapes["cells.3"] == (2, 128, 2, 2)  # reductions at 5//3, 2·5//3
    assert shapes["auxiliary_head.features.1"] == (2, 128, 2, 2)  # adaptive 2×2 pool at this size
    assert model.cells[0].preprocess0.__class__.__name__ == "FactorizedReduce"
    model.eval()
    assert model(x)[1] is None


def test_imagenet_heads_keep_darts_layout_at_224():
    model = imagenet_on_meta(DARTS_V2)
    pool = model.auxiliary_head.features[1]
    assert isinstance(pool, nn.AvgPool2d) and (pool.kernel_size, pool.stride) == (5, 2)  # DARTS' on 7×7
    # DARTS' ImageNet head has no BatchNorm after the 768 conv (unlike its CIFAR head): the same keys
    assert [type(m).__name__ for m in model.auxiliary_head.features] == [
        "ReLU", "AvgPool2d", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "ReLU"]
    keys = model.state_dict().keys()
    assert {"stem0.0.weight", "stem0.1.running_mean", "stem0.3.weight", "stem1.1.weight", "stem1.2.bias",
            "classifier.weight", "auxiliary_head.features.5.weight"} <= keys
    cifar = NetworkCIFAR(4, 10, 3, True, DARTS_V2)  # unchanged CIFAR head: DARTS' 5/3 pool on 8×8
    assert isinstance(cifar.auxiliary_head.features[1], nn.AvgPool2d)
    assert type(cifar.auxiliary_head.features[6]).__name__ == "BatchNorm2d"


def test_protocol_defaults_only_for_unset_flags():
    cfg = TrainConfig(dataset="imagenet").with_dataset_defaults({"dataset": "imagenet", "layers": 20})
    assert (cfg.layers, cfg.init_channels, cfg.auxiliary, cfg.label_smooth) == (20, 48, True, 0.1)
    assert (cfg.learning_rate, cfg.lr_schedule, cfg.gamma, cfg.weight_decay) == (0.1, "exponential", 0.97, 3e-5)
    assert (cfg.batch_size, cfg.epochs, cfg.grad_clip, cfg.image_size, cfg.drop_path_prob) == (128, 250, 5.0, 224, 0.0)
    assert TrainConfig().with_dataset_defaults({}) == TrainConfig()  # CIFAR keeps DARTS' CIFAR defaults
    api = TrainConfig(dataset="imagenet", epochs=3).with_dataset_defaults()  # Python API: changed fields win
    assert (api.epochs, api.layers) == (3, 14)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


SMOKE = ["train", "--dataset", "imagenet", "--image_size", "64", "--layers", "3", "--init_channels", "8",
         "--batch_size", "4", "--workers", "0", "--device", "cpu", "--quiet", "--report_freq", "1",
         "--deterministic", "--epochs", "2"]


@pytest.mark.slow  # a training run and its resume
@pytest.mark.gpu_path
def test_train_imagenet_one_epoch_then_resume(tmp_path, ctrl_c_in_second_epoch):
    """The protocol's defaults at a trial size; an interrupted run resumed equals an uninterrupted one."""
    data = str(jpeg_imagenet(tmp_path / "imagenet"))
    assert main([*SMOKE, "--data", data, "--save_dir", "straight"]) == 0
    with ctrl_c_in_second_epoch(loop.Trainer):
        assert main([*SMOKE, "--data", data, "--save_dir", "split"]) == 130
    assert main(["train", "--resume", "split", "--quiet", "--workers", "0"]) == 0

    a, b = (torch.load(f"{run}/weights_last.pt", weights_only=True) for run in ("straight", "split"))
    assert a["classifier.weight"].shape == (3, 128)  # 3 classes from the folder
    for k in a:
        assert torch.equal(a[k], b[k]), k
    args = json.loads(open("straight/args.json").read())
    assert (args["label_smooth"], args["lr_schedule"], args["auxiliary"], args["weight_decay"]) == (
        0.1, "exponential", True, 3e-5)
    rows = list(csv.DictReader(open("split/metrics.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.1, 0.097])
    assert all(0 <= float(r["test_acc"]) <= float(r["test_top5"]) == 100 for r in rows)  # 3 classes: top-5 = all
    log = open("straight/log.txt").read()
    assert "param size = " in log and "valid_acc_top5 100.000000" in log
    assert "mult-adds = 5.086976M at 224x224 (conv and linear layers, auxiliary head excluded; within the mobile" in log
    assert "resuming split at epoch 1" in open("split/log.txt").read()


def expect_user_error(capsys, *args, match: str):
    before = set(os.listdir("."))
    assert main([*SMOKE, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("milenas-fast train: error: ") and "\n" not in err and match in err, err
    assert set(os.listdir(".")) == before  # no run folder left behind
    return err


def test_imagenet_bad_input_exits_2_before_writing(tmp_path, capsys):
    expect_user_error(capsys, "--data", "nowhere", match="nowhere/train does not exist")
    root = jpeg_imagenet(tmp_path / "imagenet")
    data = ["--data", str(root)]
    expect_user_error(capsys, *data, "--image_size", "48", match="multiple of 32")
    expect_user_error(capsys, *data, "--loader", "gpu", match="--loader gpu does not read image files")
    (root / "val" / "cat").rename(root / "val" / "dog")
    expect_user_error(capsys, *data, match="only in train cat, only in val dog")
    (root / "val" / "dog").rename(root / "val" / "cat")
    corrupt_jpeg(root / "train" / "bee" / "img1.jpg")
    expect_user_error(capsys, *data, match="corrupt image")
    for f in (root / "train" / "bee").iterdir():
        f.unlink()
    expect_user_error(capsys, *data, match="holds no images")
