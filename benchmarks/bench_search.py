"""One MiLeNAS iteration (batch 64, default supernet) under several execution modes:

  eager-fp32        reference MixedOp, fp32, eager                     (the baseline)
  eager-amp         reference MixedOp, bf16 autocast, eager
  eager-graphs      reference MixedOp, fp32, whole iteration in a CUDA graph
  fast              fused MixedOp + AMP + CUDA graph + GPU-resident data (augmentation timed in)
  fast-fusedstep    the same with --fused_train_step (2 passes instead of 3)

Reports the median ms/iteration with p20/p80 (CUDA events, after warm-up, batches rotated), peak memory,
and the projected 50-epoch search time (391 iterations + one validation pass per epoch). Prints a table and
appends CSV rows (benchmarks/search.csv by default) with GPU name and versions. The fused MixedOp comes
from milenas_fast.runtime.resolve_impl("fused", device); rows needing it say n/a when it cannot run.
On a CPU-only machine only the reference runs, on a tiny configuration, and the script says so (exit 0).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from milenas_fast.data.datasets import make_synthetic  # noqa: E402
from milenas_fast.data.loaders import Plan, augment_batch  # noqa: E402
from milenas_fast.data.datasets import Split  # noqa: E402
from milenas_fast.precision import Precision  # noqa: E402
from milenas_fast.search.graphed import GraphedStep  # noqa: E402
from milenas_fast.search.step import StepRule, fused_search_step, search_step  # noqa: E402
from milenas_fast.space.supernet import Network  # noqa: E402

ITERS_PER_EPOCH, VALID_BATCHES, EPOCHS = 391, 391, 50
MODES = [  # name, impl, amp, graphs, gpu_data, fused_train_step
    ("eager-fp32", "reference", False, False, False, False),
    ("eager-amp", "reference", True, False, False, False),
    ("eager-graphs", "reference", False, True, False, False),
    ("fast", "fused", True, True, True, False),
    ("fast-fusedstep", "fused", True, True, True, True),
]


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


def mixed_op_for(impl, device):
    from milenas_fast.runtime import resolve_impl

    try:
        cls, why = resolve_impl(impl, device)
        return cls, why
    except Exception as e:  # ConfigError for an unavailable fused path
        return None, str(e).splitlines()[0][:160]


def bench_mode(mode, args, device, split):
    name, impl, amp, graphs, gpu_data, fused_step = mode
    if graphs and device.type != "cuda":
        return {"mode": name, "status": "n/a (CUDA graphs need CUDA)"}
    cls, why = mixed_op_for(impl, device)
    if cls is None:
        return {"mode": name, "status": f"n/a ({why})"}
    torch.manual_seed(0)
    model = Network(args.C, 10, args.layers, mixed_op=cls).to(device)
    model.train()
    w = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    a = torch.optim.Adam(model.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    rule, prec = StepRule(), Precision(device, amp)
    B = args.batch
    n_rot = 4
    plan = Plan.draw(len(split), 0, "train", 0)
    imgs = split.images.to(device)
    labels = split.labels.to(device)

    def batch(i):  # rotate through batches so nothing is timed on the same input (or zeros)
        sl = slice((i % n_rot) * B, (i % n_rot + 1) * B)
        idx = plan.order[sl].to(device)
        return augment_batch(imgs[idx], plan.offsets[sl].to(device), plan.flips[sl].to(device)), labels[idx]

    pre = [batch(i) for i in range(2 * n_rot)]
    step_fn = fused_search_step if fused_step else search_step
    graphed = GraphedStep(model, w, a, rule, prec, B, fused_step) if graphs else None

    def one(i):
        if gpu_data:  # the GPU-resident loader's work is part of the iteration
            tr, va = batch(2 * i), batch(2 * i + 1)
        else:
            tr, va = pre[(2 * i) % len(pre)], pre[(2 * i + 1) % len(pre)]
        if graphed is not None:
            return graphed(tr, lambda: va)
        return step_fn(model, tr, va, w, a, rule, prec)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        one(i)
    times = []
    for i in range(args.iters):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            one(args.warmup + i)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            one(args.warmup + i)
            times.append(1e3 * (time.perf_counter() - t))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    # the per-epoch validation pass (eval mode, no grad) at the same batch size
    model.eval()
    vt = []
    with torch.no_grad():
        for i in range(max(3, args.iters // 4)):
            x, _ = pre[i % len(pre)]
            t = time.perf_counter()
            with prec.autocast():
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            vt.append(1e3 * (time.perf_counter() - t))
    med = statistics.median(times)
    proj_min = EPOCHS * (ITERS_PER_EPOCH * med + VALID_BATCHES * statistics.median(vt)) / 6e4
    del graphed, model
    return {"mode": name, "status": "ok", "median_ms": med, "p20_ms": percentile(times, 0.2),
            "p80_ms": percentile(times, 0.8), "peak_mib": peak, "valid_ms": statistics.median(vt),
            "proj_50ep_min": proj_min, "impl": why}


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
              "(C=4, 3 cells, batch 8, 16x16 images); these numbers say nothing about GPU speed")
        args.C, args.layers, args.batch, args.iters, args.warmup = 4, 3, 8, 3, 1
        modes = [MODES[0]]
        size = 16
    else:
        torch.backends.cudnn.benchmark = True
        size = 32
    split = make_synthetic(max(16 * args.batch, 256), seed=0)
    if size != 32:
        split = Split(split.images[:, :, :size, :size].contiguous(), split.labels)
    ver = versions(device)
    print(f"device: {ver['gpu']}; torch {ver['torch']} (CUDA {ver['cuda']}), triton {ver['triton']}, "
          f"python {ver['python']}; batch {args.batch}, C={args.C}, {args.layers} cells")
    rows = []
    for m in modes:
        try:
            r = bench_mode(m, args, device, split)
        except Exception as e:  # one failing mode must not hide the others
            r = {"mode": m[0], "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        rows.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {r['mode']}: {r['status']}", flush=True)
    base = next((r["median_ms"] for r in rows if r["mode"] == "eager-fp32" and r["status"] == "ok"), None)
    print(f"\n{'mode':16} {'ms/it (p20-p80)':>24} {'speed-up':>9} {'peak MiB':>9} {'50-ep search':>13}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['mode']:16} {r['status']}")
            continue
        sp = f"{base / r['median_ms']:.1f}x" if base else "-"
        print(f"{r['mode']:16} {r['median_ms']:9.2f} ({r['p20_ms']:7.2f}-{r['p80_ms']:7.2f}) {sp:>9} "
              f"{r['peak_mib']:9.0f} {r['proj_50ep_min']:10.1f} min")
    path = Path(args.csv)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        wr = csv.writer(f)
        if new:
            wr.writerow(["date", "gpu", "torch", "cuda", "triton", "python", "batch", "C", "layers", "mode",
                         "status", "median_ms", "p20_ms", "p80_ms", "peak_mib", "valid_ms", "proj_50ep_min"])
        now = datetime.datetime.now().isoformat(timespec="seconds")
        for r in rows:
            wr.writerow([now, ver["gpu"], ver["torch"], ver["cuda"], ver["triton"], ver["python"], args.batch,
                         args.C, args.layers, r["mode"], r["status"]] +
                        [f"{r[k]:.3f}" if k in r else "" for k in
                         ("median_ms", "p20_ms", "p80_ms", "peak_mib", "valid_ms", "proj_50ep_min")])
    print(f"CSV rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
