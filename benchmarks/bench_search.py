"""One MiLeNAS iteration (batch 64, default supernet) under several execution modes:

  eager-fp32        reference MixedOp, fp32, eager                     (the baseline)
  eager-amp         reference MixedOp, bf16 autocast, eager
  eager-graphs      reference MixedOp, fp32, whole iteration in a CUDA graph
  fast              fused MixedOp + AMP + CUDA graph + GPU-resident data (augmentation timed in)
  fast-sharedpass    the same with --shared_train_pass (2 passes instead of 3)

Each mode is a real `Search` (the search loop's own object, built from a SearchConfig on the synthetic set
with the GPU-resident loader) and each timed iteration is `Search.iteration`, exactly what the loop runs.
Modes without "GPU-resident data" rotate pre-built batches, so only the iteration is timed.

Reports the median ms/iteration with p20/p80 (CUDA events, after warm-up), peak memory, and the projected
50-epoch search time (391 iterations + one validation pass per epoch). Every row is printed and appended to
the CSV (benchmarks/search.csv by default, with GPU name and versions) as soon as it is measured, so a run
cut short keeps what it measured; a failing mode is recorded with its error and the others go on. Rows
whose implementation cannot run here say n/a.
On a CPU-only machine only the reference runs, on a TINY configuration, and the script says so (exit 0).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from milenas_fast.config import SearchConfig  # noqa: E402

from milenas_fast.errors import ConfigError
from milenas_fast.data.loaders import BatchStream  # noqa: E402
from milenas_fast.search.loop import Search  # noqa: E402

ITERS_PER_EPOCH, VALID_BATCHES, EPOCHS = 391, 391, 50
MODES = [  # name, impl, amp, graphs, gpu_data, shared_train_pass
    ("eager-fp32", "reference", False, False, False, False),
    ("eager-amp", "reference", True, False, False, False),
    ("eager-graphs", "reference", False, True, False, False),
    ("fast", "fused", True, True, True, False),
    ("fast-sharedpass", "fused", True, True, True, True),
]
FIELDS = ["date", "gpu", "torch", "cuda", "triton", "python", "batch", "C", "layers", "mode", "status",
          "median_ms", "p20_ms", "p80_ms", "peak_mib", "valid_ms", "proj_50ep_min", "notes"]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def versions(device):
    out = {"torch": torch.__version__, "cuda": torch.version.cuda or "-", "python": sys.version.split()[0]}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = "-"
    out["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return out


def build(mode, args, device, **settings) -> Search:
    """The loop's Search for one mode (plus SearchConfig `settings`, e.g. optimization); enough images that the
    timed iterations stay within one pass."""
    _, impl, amp, graphs, _, shared_pass = mode
    per_half = args.batch * (args.warmup + args.iters + 6)  # + the 4 pre-built batches, + slack
    cfg = SearchConfig(dataset="synthetic", synthetic_images=2 * per_half, batch_size=args.batch, loader="gpu",
                       init_channels=args.C, layers=args.layers, impl=impl, amp=amp, cuda_graphs=graphs,
                       shared_train_pass=shared_pass, device=device.type, seed=0, quiet=True, **settings).validate()
    return Search(cfg, device)


def bench_mode(mode, args, device, **settings):
    name, _, _, graphs, gpu_data, _ = mode
    if graphs and device.type != "cuda":
        return {"status": "n/a (CUDA graphs need CUDA)"}
    try:
        search = build(mode, args, device, **settings)
    except ConfigError as e:  # e.g. --impl fused where the kernels cannot run
        return {"status": f"n/a ({str(e).splitlines()[0][:200]})"}
    notes = f"MixedOp {search.plan.mixed_op_why}; CUDA graphs {search.plan.graphs_why}"
    train = BatchStream(search.train_loader, 0, "train")
    pre = [next(train) for _ in range(4)]
    if not gpu_data:  # only the iteration is timed: rotate pre-built batches (the loader's work stays out)
        search.valid_stream = itertools.cycle([next(search.valid_stream) for _ in range(4)])
        train = itertools.cycle(pre)
    search.model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        search.iteration(next(train))
    times = []
    for _ in range(args.iters):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            search.iteration(next(train))
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            search.iteration(next(train))
            times.append(1e3 * (time.perf_counter() - t))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    # the per-epoch validation pass (eval mode, no grad) at the same batch size
    search.model.eval()
    vt = []
    with torch.no_grad():
        for i in range(max(3, args.iters // 4)):
            x, _ = pre[i % len(pre)]
            t = time.perf_counter()
            with search.precision.autocast():
                search.model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            vt.append(1e3 * (time.perf_counter() - t))
    med = statistics.median(times)
    proj_min = EPOCHS * (ITERS_PER_EPOCH * med + VALID_BATCHES * statistics.median(vt)) / 6e4
    return {"status": "ok", "median_ms": med, "p20_ms": percentile(times, 0.2), "p80_ms": percentile(times, 0.8),
            "peak_mib": peak, "valid_ms": statistics.median(vt), "proj_50ep_min": proj_min, "notes": notes}


def print_row(name, r, base):
    if r["status"] != "ok":
        print(f"{name:16} {r['status']}", flush=True)
        return
    sp = f"{base / r['median_ms']:.1f}x" if base else "-"
    print(f"{name:16} {r['median_ms']:9.2f} ({r['p20_ms']:7.2f}-{r['p80_ms']:7.2f}) {sp:>9} "
          f"{r['peak_mib']:9.0f} {r['proj_50ep_min']:10.1f} min   {r['notes']}", flush=True)


def append_csv(path: Path, row: dict, fields=FIELDS) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow(row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--modes", default=",".join(m[0] for m in MODES))
    ap.add_argument("--csv", default=str(Path(__file__).with_name("search.csv")))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = [m for m in MODES if m[0] in args.modes.split(",")]
    if device.type == "cpu":
        print("no CUDA GPU: running only the eager fp32 reference on a TINY configuration "
              "(C=4, 3 cells, batch 8); these numbers say nothing about GPU speed")
        args.C, args.layers, args.batch, args.iters, args.warmup = 4, 3, 8, 2, 1
    ver = versions(device)
    print(f"device: {ver['gpu']}; torch {ver['torch']} (CUDA {ver['cuda']}), triton {ver['triton']}, "
          f"python {ver['python']}; batch {args.batch}, C={args.C}, {args.layers} cells")
    print(f"\n{'mode':16} {'ms/it (p20-p80)':>24} {'speed-up':>9} {'peak MiB':>9} {'50-ep search':>13}", flush=True)
    path, base = Path(args.csv), None
    now = datetime.datetime.now().isoformat(timespec="seconds")
    for m in modes:
        if device.type == "cpu" and m[0] != "eager-fp32":
            print(f"{m[0]:16} skipped (CPU smoke: the fp32 reference only)", flush=True)
            continue
        try:
            r = bench_mode(m, args, device)
        except Exception as e:  # one failing mode must not hide the others
            traceback.print_exc()
            r = {"status": f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
        if m[0] == "eager-fp32" and r["status"] == "ok":
            base = r["median_ms"]
        print_row(m[0], r, base)
        append_csv(path, {"date": now, "gpu": ver["gpu"], "torch": ver["torch"], "cuda": ver["cuda"],
                          "triton": ver["triton"], "python": ver["python"], "batch": args.batch, "C": args.C,
                          "layers": args.layers, "mode": m[0], "status": r["status"], "notes": r.get("notes", ""),
                          **{k: f"{r[k]:.3f}" for k in ("median_ms", "p20_ms", "p80_ms", "peak_mib", "valid_ms",
                                                         "proj_50ep_min") if k in r}})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"CSV rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
