"""Several processes (torchrun: one per GPU, or several on a CPU) running one search or training.

Distributed is on when torchrun's WORLD_SIZE is above 1; a 1-process run (torchrun included) is the plain
single-process run: no process group, no DDP wrapper, no collectives, so every helper here is a no-op there
(and the CUDA-graph path, which captures no collectives, stays available).

- `init`: the process group from torchrun's environment, gloo on CPU, nccl on CUDA (LOCAL_RANK picks the
  GPU), with a timeout so a dead rank ends the others' collectives in bounded time.
- `wrap`: the weights in DistributedDataParallel (its backward averages their gradients). α are not DDP
  parameters: `average` all-reduces their gradients once per iteration (search/step.py).
- `check_alphas`: the per-epoch proof that every rank holds the same α.
- Collective failures (a rank died, a timeout) become `RankFailure`: one line, exit 1.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError
from .errors import one_line


class RankFailure(RuntimeError):
    """The ranks lost each other (a rank died or stopped answering) or disagree about α."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Rank 0 (or the single process): the only one that writes the run folder. Before the process group is
    joined (a run settles its folder first), torchrun's RANK says which process this is."""
    if world_size() == 1 and requested_world() > 1:
        return os.environ.get("RANK", "0") == "0"
    return rank() == 0


def requested_world() -> int:
    """What torchrun asked for (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def init(device: torch.device, timeout_s: float) -> torch.device:
    """Join torchrun's process group when it launched several processes; returns this rank's device
    (cuda:LOCAL_RANK on CUDA). A second call is a no-op."""
    if requested_world() <= 1:
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; "
                              "start at most one process per GPU (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as e:
            raise RankFailure(f"could not join the process group ({one_line(e)})") from None
    return device


def shutdown() -> None:
    """Leave the group cleanly, or a rank could abort at exit ("terminate called without an active
    exception"): what still holds the group (a DDP reducer inside a search, kept by reference cycles) is
    freed while the group exists, and the ranks leave together."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        with contextlib.suppress(RuntimeError):  # a peer that failed is gone: nothing to wait for
            dist.barrier()
        dist.destroy_process_group()


def lost(e: BaseException) -> RankFailure:
    """A failed collective as the one line the CLI prints."""
    return RankFailure(f"rank {rank()} of {world_size()} lost the other ranks ({one_line(e)}); a rank died or "
                       "stopped answering; the last complete checkpoint is intact (continue with --resume RUN_DIR)")


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because a peer is gone or silent: torch's DistError family,
    or gloo's and NCCL's plain RuntimeErrors ("Connection closed by peer", timeouts)."""
    if world_size() <= 1:
        return False
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection closed", "Timed out"))


class DDP(DistributedDataParallel):
    """DDP that reads the network's other attributes through. The step functions get this object as
    `model`: `model(x)` is the weight pass, through DDP's reducer (weight gradients averaged); `model._loss`,
    `arch_parameters()`, … are the network's own, so the α-only passes (frozen weights, `model._loss`) run
    the UNWRAPPED network: DDP never prepares a reduction that no weight gradient would complete, and no
    buffers are broadcast for them."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def graphs_policy(on: bool, why: str) -> tuple[bool, str, str | None]:
    """CUDA graphs with several processes: off, since DDP's and α's all-reduces are not captured (README
    "Multi-GPU and multi-node"). Returns (on, why, the warning to log once or None)."""
    world = world_size()
    if not on or world <= 1:
        return on, why, None
    return (False, f"off: {world} processes (DDP); eager loop",
            f"CUDA graphs are off with {world} processes: the all-reduces of DDP and of α are not captured; "
            "using the eager loop")


def convert_sync_bn(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """--sync_bn: BatchNorm statistics over the global batch (torch's SyncBatchNorm, CUDA only)."""
    if requested_world() > 1 and device.type != "cuda":
        raise ConfigError("--sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on the CPU)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(model: torch.nn.Module, device: torch.device):
    """The weights in DDP when distributed; the network itself otherwise."""
    if world_size() <= 1:
        return model
    # --sampler gumbel: the candidates not drawn get no gradient (every rank draws the same sample)
    unused = getattr(model, "sampler", None) is not None
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)


def average(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over ranks of a list of gradients, in ONE flat all-reduce. Every rank receives the same
    bits (the reduced buffer is shared), so every rank's Adam step is identical."""
    world = world_size()
    if world <= 1:
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    return [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]


def all_totals_(totals) -> None:
    """Epoch totals (meters.Totals: loss/top-1/top-5 sums and a count) summed over ranks, in place."""
    if world_size() > 1:
        t = torch.cat([totals.sums, totals.sums.new_tensor([totals.n])])
        dist.all_reduce(t)
        totals.sums.copy_(t[:-1])
        totals.n = int(t[-1].item())


def any_rank(flag: torch.Tensor) -> bool:
    """Whether the 0-d `flag` is set on any rank: every rank gets the same answer, so all stop together."""
    if world_size() > 1:
        flag = flag.to(torch.int32)  # a copy: the caller's flag stays its own
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def from_rank0(obj):
    """Rank 0's `obj` (picklable) on every rank, e.g. the run folder it just created."""
    if world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_(tensors) -> None:
    """Rank 0's values into every rank's tensors (α and weights at the start and after resume)."""
    if world_size() <= 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def checksum(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_alphas(alphas, sampler_state: torch.Tensor | None = None) -> str:
    """The α checksum line; RankFailure when ranks hold different α (the run must stop: they would
    derive different genotypes) or, with `sampler_state` (the Gumbel noise generator's), different noise
    streams: each rank would then train another sampled network while the averaged α stayed identical."""
    mine = checksum(alphas)
    world = world_size()
    if world <= 1:
        return f"alpha checksum {mine} (1 process)"
    every = [None] * world
    dist.all_gather_object(every, (mine, None if sampler_state is None else checksum([sampler_state])))
    for i, what in enumerate(("α", "the Gumbel sampler's noise streams")):
        if len({e[i] for e in every}) != 1:
            raise RankFailure(f"{what} differ across ranks (checksums " + ", ".join(
                f"rank {r}: {e[i]}" for r, e in enumerate(every)) + "); stopping")
    return f"alpha checksum {mine} identical on {world} ranks"


def add_nproc_flag(parser) -> None:
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="run N processes on this machine (one per GPU, or N on the CPU): re-launches this "
                             "command through torch.distributed.run (torchrun); --batch_size is per process")


def run_command(command: str, args, argv: list[str], body) -> int:
    """A CLI command under torchrun, or re-launched by `--nproc N`: `body()` with collective failures (a rank
    died or stopped answering, α diverged) as one line and exit status 1; the process group closed after."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be positive, got {args.nproc}")
    if args.nproc > 1 and requested_world() <= 1:
        return relaunch(args.nproc, strip_nproc(argv))
    try:
        code = body()
    except Exception as e:  # noqa: BLE001 — only collective failures are handled here
        if not (isinstance(e, RankFailure) or is_collective_failure(e)):
            raise
        # no shutdown: tearing down a group whose peer is gone may block; the process exit frees it
        print(f"milenas-fast {command}: error: {e if isinstance(e, RankFailure) else lost(e)}", file=sys.stderr)
        return 1
    shutdown()
    return code


def relaunch(nproc: int, argv: list[str]) -> int:
    """`--nproc N`: the same command under torch.distributed.run on this machine (N processes); its exit
    status."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "milenas_fast", *argv]
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the launcher forwards Ctrl-C to its workers; wait for their exits
        return proc.wait() or 130


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
