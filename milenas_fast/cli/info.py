"""`milenas-fast info`: what this installation can use and what `auto` picks."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, GPU, usable fast paths and the auto choices",
                       description="Print versions (Python, torch, CUDA, cuDNN, Triton, DALI), the GPU, whether the "
                                   "C++ extension and the Triton kernels are usable, and which MixedOp "
                                   "implementation and loader `auto` picks, and why.")
    p.add_argument("--json", action="store_true", help="print the same as JSON")


def run(args, argv) -> int:
    from ..info import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0
