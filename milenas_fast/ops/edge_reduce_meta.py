"""What edge_reduce's two implementations (the C++/CUDA op and its Triton kernels) share: the contract on the
inputs, the fake (shape-only) kernels, the autograd formula and the FLOPs, and the registration of the C++ ops'
fake and autograd kernels, which ops/extension.py runs the moment it loads the library (so that a loaded library is
complete; its schemas live in csrc/ops.cpp). No Triton here."""
from __future__ import annotations

import torch

from .costs import states_flops, states_launches

MAX_CANDIDATES = 8  # csrc/edge_reduce.h's kMaxCandidates: the kernels take one pointer per candidate
# the Triton kernels' candidate pointer parameters, in their launch records (unused slots alias y0)
CANDIDATE_PTRS = tuple(f"y{k}_ptr" for k in range(MAX_CANDIDATES))


def check_candidates(ys, most: int = MAX_CANDIDATES) -> None:
    """The C++ op's contract on the candidates (csrc/edge_reduce.h), with its messages (`most`: bn_stats takes
    a fused cell's group of edges)."""
    k = len(ys)
    if not 1 <= k <= most:
        raise RuntimeError(f"edge_reduce: need 1 to {most} candidates, got {k}")
    y = ys[0]
    if y.dim() != 4:
        raise RuntimeError(f"edge_reduce: each candidate must be [N, C, H, W], got {list(y.shape)}")
    if y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"edge_reduce: candidates must be float32, bfloat16 or float16, got {y.dtype}")
    for i, t in enumerate(ys[1:], 1):
        if t.shape != y.shape or t.dtype != y.dtype or t.device != y.device:
            raise RuntimeError(f"edge_reduce: ys[{i}] must match ys[0] ({list(y.shape)}, {y.dtype}, {y.device}), "
                               f"got {list(t.shape)}, {t.dtype}, {t.device}")


def check(ys, w, mean, rstd) -> None:
    """The C++ op's input contract (csrc/edge_reduce.h), with its messages."""
    check_candidates(ys)
    k, c, y = len(ys), ys[0].shape[1], ys[0]
    if w.dtype != torch.float32 or w.shape != (k,):
        raise RuntimeError(f"edge_reduce: w must be float32 [K={k}], got {w.dtype} {list(w.shape)}")
    for t in (mean, rstd):
        if t.dtype != torch.float32 or t.shape != (k, c):
            raise RuntimeError(f"edge_reduce: mean and rstd must be float32 [K={k}, C={c}], got {t.dtype} "
                               f"{list(t.shape)}")
    for t in (w, mean, rstd):
        if t.device != y.device:
            raise RuntimeError(f"edge_reduce: all inputs must be on {y.device}, got {t.device}")


def setup_context(ctx, inputs, output):
    ys, w, mean, rstd = inputs[:4]
    ctx.k = len(ys)
    ctx.save_for_backward(*ys, w, mean, rstd)


def backward_with(op):
    """The autograd backward of an edge_reduce forward whose backward op is `op`: ONE grad_y buffer
    [K, N, C, H, W], handed out as per-candidate views."""
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        ys, (w, mean, rstd) = list(saved[:ctx.k]), saved[ctx.k:]
        flags = ctx.needs_input_grad  # (one flag per candidate, w, mean, rstd[, acc when it was passed])
        need_ys, need = flags[0], flags[1:4]
        # Only what autograd asks for: α-only passes skip nothing here, but frozen BN statistics or a fixed w do.
        gy, *rest = op(grad, ys, w, mean, rstd, [any(need_ys), *need])
        gys = [None] * ctx.k if gy is None else [g if n else None for g, n in zip(gy.unbind(0), need_ys)]
        if len(flags) > 4:  # acc's gradient is the output's: no launch
            return (gys, *rest, grad if flags[4] else None)
        return (gys, *rest)
    return backward


def fake_forward(ys, w, mean, rstd, acc=None):
    return ys[0].new_empty(ys[0].shape)


def fake_backward(grad_out, ys, w, mean, rstd, output_mask):
    k, c = len(ys), ys[0].shape[1]
    return (
        ys[0].new_empty((k, *ys[0].shape)) if output_mask[0] else None,
        w.new_empty((k,)) if output_mask[1] else None,
        w.new_empty((k, c)) if output_mask[2] else None,
        w.new_empty((k, c)) if output_mask[3] else None,
    )


def cuda_splits(n: int, k: int, c: int) -> int:
    """S of the CUDA partial sums (csrc/cuda/edge_reduce.cu's `splits`: from the shape alone)."""
    want = max(1, min(n, -(-2048 // (k * c))))
    nps = -(-n // want)
    return -(-n // nps)


def fake_partials(grad_out, ys, w, mean, rstd):
    k, (n, c) = len(ys), ys[0].shape[:2]
    s = 1 if ys[0].device.type == "cpu" else cuda_splits(max(n, 1), k, c)
    return w.new_empty((k, c, s)), w.new_empty((c, s))


def forward_flops(ys, *_) -> int:
    return 3 * sum(y.numel() for y in ys)  # subtract, scale, accumulate per candidate element


def backward_flops(grad, ys, *_) -> int:
    return 6 * sum(y.numel() for y in ys)  # grad_y plus the dot products


def partials_flops(grad, ys, *_) -> int:
    return 3 * sum(y.numel() for y in ys) + grad.numel()  # g·(y − mean) summed, and g summed


for _name, _fn in (("edge_reduce", forward_flops), ("edge_reduce_backward", backward_flops),
                   ("edge_reduce_partials", partials_flops)):
    states_flops(f"milenas_fast::{_name}")(_fn)


@states_launches("milenas_fast::edge_reduce_backward")
def backward_launches(grad, ys, w, mean, rstd, output_mask) -> int:
    """csrc/cuda/edge_reduce.cu: a partial kernel (grad_y and/or the sums) and a final one for the sums."""
    return (1 if any(output_mask) else 0) + (1 if any(output_mask[1:]) else 0)


def register_cpp() -> None:
    """Fake and autograd kernels of the C++ ops: run by extension.load() right after it loads the library."""
    torch.library.register_fake("milenas_fast::edge_reduce", fake_forward)
    torch.library.register_fake("milenas_fast::edge_reduce_backward", fake_backward)
    torch.library.register_fake("milenas_fast::edge_reduce_partials", fake_partials)
    torch.library.register_autograd("milenas_fast::edge_reduce",
                                    backward_with(lambda *a: torch.ops.milenas_fast.edge_reduce_backward(*a)),
                                    setup_context=setup_context)
