"""The paper's methods side by side: per-iteration time and peak memory of one search iteration of

  milenas         mixed-level, first order (3 passes)
  darts           first-order DARTS (α from the validation batch; 2 passes)
  darts_2nd       second-order DARTS (unrolled, finite-difference Hessian; 5 passes)
  single_level    α from the training batch (2 passes)
  gumbel_milenas  MiLeNAS with hard Gumbel-softmax samples (`--sampler gumbel`): only one candidate per edge runs

on the same machine, in one run, under one execution mode of bench_search.py (default: `fast` on a GPU, the
eager fp32 reference on a TINY configuration on a CPU). Each row is a real `Search` timed through
`Search.iteration` by bench_search's own `bench_mode`. Prints a table, appends each row to the CSV as soon as
it is measured (benchmarks/methods.csv by default; a failing method is recorded and the others go on), and
prints the paper's claim measured: how many times faster a MiLeNAS iteration is than a second-order DARTS one
(the paper: "over three times faster"). Gumbel MiLeNAS is "not available" in a build whose SearchConfig has no
`sampler`. Without a GPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_search as bs  # noqa: E402  (puts the repository on sys.path)

from milenas_fast.config import SearchConfig  # noqa: E402

METHODS = [  # name, SearchConfig settings
    ("milenas", {"optimization": "milenas"}),
    ("darts", {"optimization": "darts"}),
    ("darts_2nd", {"optimization": "darts_2nd"}),
    ("single_level", {"optimization": "single_level"}),
    ("gumbel_milenas", {"optimization": "milenas", "sampler": "gumbel"}),
]
FIELDS = ["date", "gpu", "torch", "cuda", "triton", "python", "batch", "C", "layers", "mode", "method", "status",
          "median_ms", "p20_ms", "p80_ms", "peak_mib", "vs_milenas", "notes"]


def available(settings: dict) -> str:
    """'' when this build's SearchConfig has every setting, else why not."""
    names = {f.name for f in dataclasses.fields(SearchConfig)}
    missing = [k for k in settings if k not in names]
    return f"not available (SearchConfig has no {', '.join(missing)})" if missing else ""


def mode_for(mode, settings: dict):
    """Gumbel sampling runs one candidate per edge, which the fused all-candidates kernel does not: it takes the
    implementation `auto` picks for it."""
    if settings.get("sampler") == "gumbel" and mode[1] == "fused":
        return (mode[0], "auto", *mode[2:])
    return mode


def run_method(name, settings, mode, args, device) -> dict:
    why = available(settings)
    if why:
        return {"status": why}
    try:
        return bs.bench_mode(mode_for(mode, settings), args, device, **settings)
    except Exception as e:  # one failing method must not hide the others
        traceback.print_exc()
        return {"status": f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--mode", choices=[m[0] for m in bs.MODES], help="bench_search mode (default: fast on a GPU)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--methods", default=",".join(m[0] for m in METHODS))
    ap.add_argument("--csv", default=str(Path(__file__).with_name("methods.csv")))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        print("bench_methods: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if device.type == "cpu":
        print("no CUDA GPU: the eager fp32 reference on a TINY CPU configuration (C=4, 3 cells, batch 8); the "
              "ratios between methods hold on this CPU only and say nothing about GPU speed")
        args.C, args.layers, args.batch, args.iters, args.warmup = 4, 3, 8, 2, 1
        args.mode = "eager-fp32"
    mode = next(m for m in bs.MODES if m[0] == (args.mode or "fast"))
    ver = bs.versions(device)
    print(f"device: {ver['gpu']}; torch {ver['torch']} (CUDA {ver['cuda']}), triton {ver['triton']}, python "
          f"{ver['python']}; mode {mode[0]}; batch {args.batch}, C={args.C}, {args.layers} cells")
    print(f"\n{'method':16} {'ms/it (p20-p80)':>24} {'x milenas':>10} {'peak MiB':>9}", flush=True)
    path, now, rows = Path(args.csv), datetime.datetime.now().isoformat(timespec="seconds"), {}
    for name, settings in METHODS:
        if name not in args.methods.split(","):
            continue
        r = rows[name] = run_method(name, settings, mode, args, device)
        base = rows.get("milenas", {}).get("median_ms")
        rel = r["median_ms"] / base if base and r["status"] == "ok" else None
        if r["status"] == "ok":
            peak = "-" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.0f}"  # NaN: not measured on a CPU
            x = f"{rel:.2f}" if rel else "-"
            print(f"{name:16} {r['median_ms']:9.2f} ({r['p20_ms']:7.2f}-{r['p80_ms']:7.2f}) {x:>10} {peak:>9}   "
                  f"{r['notes']}", flush=True)
        else:
            print(f"{name:16} {r['status']}", flush=True)
        bs.append_csv(path, {"date": now, "gpu": ver["gpu"], "torch": ver["torch"], "cuda": ver["cuda"],
                             "triton": ver["triton"], "python": ver["python"], "batch": args.batch, "C": args.C,
                             "layers": args.layers, "mode": mode[0], "method": name, "status": r["status"],
                             "notes": r.get("notes", ""), "vs_milenas": f"{rel:.3f}" if rel else "",
                             **{k: f"{r[k]:.3f}" for k in ("median_ms", "p20_ms", "p80_ms", "peak_mib") if k in r}},
                      FIELDS)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fast, slow = rows.get("milenas", {}), rows.get("darts_2nd", {})
    if fast.get("status") == slow.get("status") == "ok":
        print(f"\nMiLeNAS vs second-order DARTS on {ver['gpu']}: {slow['median_ms'] / fast['median_ms']:.2f}x faster "
              f"per iteration (the paper: over 3x)")
    print(f"CSV rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
