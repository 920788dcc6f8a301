"""`milenas-fast info`: what this installation can use and what `auto` picks."""
from __future__ import annotations

import json
import os


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, GPU, usable fast paths and the auto choices",
                       description="Print versions (Python, torch, CUDA, cuDNN, Triton, DALI), the GPU, whether the "
                                   "C++ extension and the Triton kernels are usable, and which MixedOp "
                                   "implementation and loader `auto` picks, and why.")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.add_argument("--rebuild", action="store_true",
                   help="retry a just-in-time build of the C++ extension that failed before (by default a failed "
                        "build is remembered and not retried until csrc/, torch or the compilers change)")


def run(args, argv) -> int:
    from ..info import collect, format_report
    from ..ops.extension import REBUILD_ENV

    saved = os.environ.get(REBUILD_ENV)
    if args.rebuild:
        os.environ[REBUILD_ENV] = "1"  # read by the build, which runs inside collect()
    try:
        info = collect()
    finally:
        if args.rebuild:
            os.environ.pop(REBUILD_ENV) if saved is None else os.environ.__setitem__(REBUILD_ENV, saved)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_report(info))
    return 0
