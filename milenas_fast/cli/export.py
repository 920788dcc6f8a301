"""`milenas-fast export RUN_DIR --format torchscript|onnx`: a trained cell as a deployable file."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a train run's network as TorchScript or ONNX",
                       description="The evaluation network of a `train` run folder (its weights_best.pt; no auxiliary "
                                   "head, no drop path) as a TorchScript or ONNX file with a free batch dimension. "
                                   "Prints the parameter count and the mult-adds.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="an eval-… run folder (milenas-fast train)")
    # checked by the export, not by argparse: a bad value is one line like any other bad input
    p.add_argument("--format", required=True, metavar="F", help="torchscript or onnx")
    p.add_argument("--output", default="", metavar="FILE", help="where to write (default RUN_DIR/model.pt or .onnx)")
    p.add_argument("--image_size", "--image-size", type=int, default=0, metavar="N",
                   help="input side (default: the run's --image_size); the batch dimension stays free")


def run(args, argv) -> int:
    from ..export import export

    done = export(args.run_dir, args.format, args.output or None, args.image_size or None)
    size = done["image_size"]
    print(f"exported {done['path']} ({done['format']}; input N×3×{size}×{size}, output N×classes logits)")
    print(f"param size = {done['params'] / 1e6:f}MB; mult-adds = {done['mult_adds'] / 1e6:f}M at {size}x{size}")
    return 0
