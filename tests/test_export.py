"""`milenas-fast export`: the TorchScript file loaded back and the ONNX file run by onnxruntime give the PyTorch
evaluation network's outputs, for a CIFAR and an ImageNet network; bad input is one line and exit 2."""
import importlib.util
import json
import os

import pytest
import torch

from milenas_fast.cli import main
from milenas_fast.export import Logits, load_network
from milenas_fast.space.evalnet import NetworkImageNet, mult_adds, param_count
from milenas_fast.space.genotype import to_dict
from milenas_fast.space.known_genotypes import MILENAS

def needs(module: str) -> None:
    """Skip without the optional extra, except under CI, which installs it."""
    if importlib.util.find_spec(module) is None:
        if "CI" in os.environ:
            pytest.fail(f"CI installs {module} (the export extra)")
        pytest.skip(f"{module} not installed")


TRAIN = ["train", "--dataset", "synthetic", "--synthetic_images", "48", "--init_channels", "4", "--layers", "3",
         "--batch_size", "16", "--workers", "0", "--device", "cpu", "--quiet", "--epochs", "1"]


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """A real train run folder, auxiliary head included (the export leaves it out)."""
    run_dir = tmp_path_factory.mktemp("export") / "eval-cifar"
    assert main(TRAIN + ["--arch", "MILENAS", "--auxiliary", "--save_dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
    """A train run folder as `train --dataset imagenet` leaves it, its network small (3 cells, C=8, 64×64) and its
    weights and BatchNorm statistics moved off their initial values."""
    run_dir = tmp_path_factory.mktemp("export") / "eval-imagenet"
    run_dir.mkdir()
    torch.manual_seed(0)
    net = NetworkImageNet(8, 7, 3, True, MILENAS, image_size=64)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 64, 64))
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(net.state_dict(), run_dir / "weights_best.pt")
    (run_dir / "genotype.json").write_text(json.dumps(to_dict(MILENAS)))
    (run_dir / "args.json").write_text(json.dumps({"dataset": "imagenet", "init_channels": 8, "layers": 3,
                                                   "image_size": 64, "auxiliary": True}))
    return run_dir


def outputs(path, fmt, x):
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def check_export(run_dir, fmt, size, tmp_path, capsys):
    out = tmp_path / f"net.{fmt}"
    assert main(["export", str(run_dir), "--format", fmt, "--output", str(out)]) == 0
    net, _ = load_network(run_dir)
    printed = capsys.readouterr().out
    assert f"param size = {param_count(net) / 1e6:f}MB" in printed
    assert f"mult-adds = {mult_adds(net, size) / 1e6:f}M at {size}x{size}" in printed
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))  # not the traced batch of 2
    with torch.no_grad():
        want = Logits(net)(x)
        got = outputs(out, fmt, x)
    assert want.shape == got.shape and want.std() > 1e-3  # outputs that differ per image and class
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_cifar_export_reproduces_pytorch(cifar_run, fmt, tmp_path, capsys):
    if fmt == "onnx":
        needs("onnxruntime")
    check_export(cifar_run, fmt, 32, tmp_path, capsys)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_imagenet_export_reproduces_pytorch(imagenet_run, fmt, tmp_path, capsys):
    if fmt == "onnx":
        needs("onnxruntime")
    check_export(imagenet_run, fmt, 64, tmp_path, capsys)


def test_the_default_output_is_in_the_run_folder_at_another_size(cifar_run, capsys):
    assert main(["export", str(cifar_run), "--format", "torchscript", "--image_size", "48"]) == 0
    assert "at 48x48" in capsys.readouterr().out
    assert torch.jit.load(str(cifar_run / "model.pt"))(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_bad_input_is_one_line_and_exit_2(cifar_run, tmp_path, capsys):
    search = tmp_path / "search-x"
    search.mkdir()
    (search / "args.json").write_text(json.dumps({"arch_learning_rate": 3e-4, "dataset": "cifar10"}))
    unfinished = tmp_path / "eval-x"
    unfinished.mkdir()
    (unfinished / "args.json").write_text((cifar_run / "args.json").read_text())
    cases = [([str(search), "--format", "onnx"], "is a search run folder"),
             ([str(unfinished), "--format", "onnx"], "no weights_best.pt"),
             ([str(cifar_run), "--format", "tflite"], "--format must be one of torchscript, onnx"),
             ([str(tmp_path / "missing"), "--format", "onnx"], "not a folder"),
             ([str(cifar_run), "--format", "onnx", "--image_size", "30"], "multiple of 4")]
    for argv, says in cases:
        assert main(["export", *argv, "--output", str(tmp_path / "out.bin")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and says in err, err
    assert not (tmp_path / "out.bin").exists()
