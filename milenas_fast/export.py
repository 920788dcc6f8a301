"""A trained cell for deployment: the evaluation network of a `train` run folder (its best weights; no
auxiliary head, no drop path: what inference runs) as a TorchScript or ONNX file, written atomically."""
from __future__ import annotations

import importlib.util
import io
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from . import runs
from .errors import ConfigError
from .space import genotype as gt
from .space.evalnet import NetworkCIFAR, NetworkImageNet, mult_adds, param_count

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
WEIGHTS = "weights_best.pt"


class ExportError(ConfigError):
    """A run folder, format or size that cannot be exported (one line, exit 2)."""


class Logits(nn.Module):
    """The evaluation network's logits alone (its forward also returns the auxiliary head's, None in eval)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[0]


def load_network(run_dir: Path) -> tuple[nn.Module, dict]:
    """(the evaluation network with the run's best weights, in eval mode; the run's settings)."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: not a folder")
    try:
        args = json.loads((run_dir / "args.json").read_text())
    except (OSError, ValueError):
        raise ExportError(f"{run_dir}: no readable args.json (not a train run folder?)") from None
    if not isinstance(args, dict) or "arch_learning_rate" in args:  # a search's own setting
        raise ExportError(f"{run_dir} is a search run folder: train its genotype first (milenas-fast train "
                          f"--genotype {run_dir}), then export that run")
    if not (run_dir / WEIGHTS).is_file():
        raise ExportError(f"{run_dir}: no {WEIGHTS} (the run has not finished an epoch yet)")
    try:
        state = torch.load(run_dir / WEIGHTS, weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("auxiliary_head.")}
        genotype = gt.load(run_dir)
        net_class = NetworkImageNet if args["dataset"] == "imagenet" else NetworkCIFAR
        net = net_class(args["init_channels"], state["classifier.weight"].shape[0], args["layers"], False, genotype,
                        image_size=args["image_size"])
        net.load_state_dict(state)
    except gt.GenotypeError:
        raise
    except Exception as e:  # noqa: BLE001 — any unreadable or mismatched file is the same one-line refusal
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"{run_dir / WEIGHTS} does not load into the run's network ({type(e).__name__}: "
                          f"{first})") from None
    net.drop_path_prob = 0.0
    return net.eval(), args


def check_request(fmt: str, args: dict, image_size: int) -> None:
    step = 32 if args["dataset"] == "imagenet" else 4  # the network's stride
    if image_size <= 0 or image_size % step:
        raise ExportError(f"--image_size must be a positive multiple of {step} for this network, got {image_size}")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"--format onnx needs {' and '.join(missing)}: pip install 'milenas-fast[export]'")


def serialise(model: nn.Module, example: torch.Tensor, fmt: str) -> bytes:
    """The file's bytes; the batch dimension stays free (ONNX: a named dynamic axis)."""
    if fmt == "torchscript":
        buf = io.BytesIO()
        with warnings.catch_warnings():
            # jit's deprecation notices, and the tracer noting that FactorizedReduce's odd-size test becomes a
            # constant: right here, where the file's input side is fixed
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.jit.save(torch.jit.trace(model, example), buf)
        return buf.getvalue()
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes={"x": {0: batch}}, verbose=False)
    return program.model_proto.SerializeToString()


def export(run_dir, fmt: str, output=None, image_size: int | None = None) -> dict:
    """Write the run's network as `fmt` (to RUN_DIR/model.pt|.onnx unless `output`); returns what was written:
    path, format, image_size, params (DARTS' count, no auxiliary head) and mult_adds at that size."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    run_dir = Path(run_dir)
    net, args = load_network(run_dir)
    size = image_size or args["image_size"]
    check_request(fmt, args, size)
    out = Path(output) if output else run_dir / f"model{FORMATS[fmt]}"
    if out.is_dir():
        raise ExportError(f"--output {out} is a folder; name the file")
    model = Logits(net).eval()
    example = torch.randn(2, 3, size, size)  # batch 2: a batch of 1 could be specialised away
    with torch.no_grad():
        data = serialise(model, example, fmt)
    runs.atomic_write_bytes(out, data)
    return {"path": out, "format": fmt, "image_size": size, "params": param_count(net),
            "mult_adds": mult_adds(net, size)}
