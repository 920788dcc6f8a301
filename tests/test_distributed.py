"""Several processes (gloo on the CPU, 2 ranks): α identical on every rank and equal to one process's update
from the mean of the ranks' α gradients, sharded data, rank 0 alone writes, a killed rank ends the run in
bounded time, resume of a 2-process run (bit-exact) and under another world size, `--nproc`."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from milenas_fast import distributed
from milenas_fast.cli import main
from milenas_fast.errors import ConfigError
from milenas_fast.data.loaders import Plan, ResidentLoader
from milenas_fast.precision import Precision
from milenas_fast.search.step import StepRule, alpha_gradient, search_step
from milenas_fast.space.mixed_op import FusedMixedOp, ReferenceMixedOp
from milenas_fast.space.supernet import Network

CPU = torch.device("cpu")
ITERATIONS = 3
TINY = ["search", "--dataset", "synthetic", "--synthetic_images", "32", "--layers", "3", "--init_channels", "4",
        "--batch_size", "8", "--epochs", "3", "--device", "cpu", "--deterministic", "--quiet", "--loader", "gpu",
        "--workers", "0", "--report_freq", "1", "--dist_timeout", "60"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the step under DDP, in-process ranks ----------------------------------------------------------------
def _network(dtype=torch.float32) -> Network:
    torch.manual_seed(0)
    net = Network(4, 10, 3, mixed_op=ReferenceMixedOp)
    if dtype != torch.float32:  # weights, α and the softmax (mixing_weights computes it in fp32) in `dtype`
        net.to(dtype)
        net.alphas_normal, net.alphas_reduce = (a.detach().to(dtype).requires_grad_() for a in net.arch_parameters())
        net._arch_parameters = [net.alphas_normal, net.alphas_reduce]
        net.mixing_weights = lambda: tuple(torch.softmax(a, -1) for a in net.arch_parameters())
    return net


def assert_within_fp32_error(got, want64, fp32):
    """`got` (fp32, its sums taken in another order: other threads, other ranks) lies within 4× of the
    distance between this process's own fp32 result and float64, plus 4 ulps of the values: a yardstick
    measured on the same arithmetic, not a guess at the last digits of fp32."""
    for i, (g, w, f) in enumerate(zip(got, want64, fp32, strict=True)):
        spread = (f.double() - w).abs().max().item()
        tol = 4 * spread + 4 * torch.finfo(torch.float32).eps * w.abs().max().item()
        err = (g.double() - w).abs().max().item()
        assert err <= tol, f"tensor {i}: {err:.3g} from float64, allowed {tol:.3g} (fp32 here: {spread:.3g})"


def _optimisers(model):
    return (torch.optim.SGD(model.parameters(), 0.05, momentum=0.9, weight_decay=3e-4),
            torch.optim.Adam(model.arch_parameters(), lr=0.01, betas=(0.5, 0.999), weight_decay=1e-3))


def _batches(rank: int, iteration: int):
    """Rank `rank`'s (train, valid) batches of iteration `iteration`: different on every rank."""
    g = torch.Generator().manual_seed(1000 * rank + iteration)
    return tuple((torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 10, (5,), generator=g)) for _ in range(2))


def _mixed_op(cls):
    torch.manual_seed(0)
    return cls(4, 1)


def _op_inputs(rank: int):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(2, 4, 6, 6, generator=g), torch.softmax(torch.randn(8, generator=g), 0)


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init(CPU, 60)
    results = {}
    for fused in (False, True):  # the eager three-pass step and --shared_train_pass
        model = _network()
        net = distributed.wrap(model, CPU)
        w_opt, a_opt = _optimisers(model)
        alphas, first_exp_avg = [], None
        for i in range(ITERATIONS):
            search_step(net, *_batches(rank, i), w_opt, a_opt, StepRule(), Precision(CPU, False), fused)
            alphas.append([a.detach().clone() for a in model.arch_parameters()])
            if i == 0:
                first_exp_avg = [a_opt.state[a]["exp_avg"].clone() for a in model.arch_parameters()]
        results[fused] = {"alphas": alphas, "exp_avg": first_exp_avg,
                          "weights": [p.detach().clone() for p in model.parameters()]}
    op = _mixed_op(FusedMixedOp)  # the fused MixedOp (Triton interpreter on the CPU) under DDP
    x, w = _op_inputs(rank)
    ddp = distributed.wrap(op, CPU)  # kept alive until backward: its reducer does the all-reduce
    ddp(x, w).square().sum().backward()
    results["fused_op"] = {"fused": op._fused_index is not None,
                           "grads": {n: p.grad.clone() for n, p in op.named_parameters()}}
    results["darts_2nd"] = _darts_2nd_gradient(*_halves(rank))  # under DDP: the global batch's gradient
    results["gumbel"] = _gumbel_steps(rank)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


def _halves(rank: int | None, dtype=torch.float32):
    """Rank `rank`'s half of one (train, valid) pair of batches; None: the whole batches (one process)."""
    g = torch.Generator().manual_seed(7)
    whole = [(torch.randn(6, 5, generator=g).to(dtype), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    return whole if rank is None else [(x[3 * rank:3 * rank + 3], y[3 * rank:3 * rank + 3]) for x, y in whole]


def _darts_2nd_gradient(train, valid):
    """darts_2nd's α gradient, as the step averages it, on the smooth tiny supernet in eval mode (BatchNorm on
    running statistics, so two half batches are exactly one whole batch), after one real SGD step (momentum)."""
    from tiny_supernet import Tiny

    torch.manual_seed(3)
    model = Tiny().eval().to(train[0].dtype)
    model._alphas = [a.detach().to(train[0].dtype).requires_grad_() for a in model._alphas]
    w_opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=3e-4)
    model._loss(*train).backward()
    for p, g in zip(model.parameters(), distributed.average([p.grad for p in model.parameters()])):
        p.grad = g
    w_opt.step()
    grads, _ = alpha_gradient(model, {"train": train, "valid": valid}, StepRule("darts_2nd"),
                              Precision(CPU, False), w_optimizer=w_opt)
    return distributed.average(grads)


def _gumbel_steps(rank: int) -> dict:
    """Two --sampler gumbel steps under DDP: the indices each rank drew, its α, and the epoch check with equal
    and with deliberately different noise streams."""
    from milenas_fast.search.sampler import GumbelSampler
    from milenas_fast.space.sampled_op import HardSampledMixedOp

    torch.manual_seed(0)
    model = Network(4, 10, 3, mixed_op=HardSampledMixedOp)
    sampler, drawn = GumbelSampler("cell", 5, CPU, 2.0), []
    model.sampler = lambda net: _record(sampler, net, drawn)  # the sampler, recording what it drew
    net = distributed.wrap(model, CPU)
    w_opt, a_opt = _optimisers(model)
    for i in range(2):
        search_step(net, *_batches(rank, i), w_opt, a_opt, StepRule(), Precision(CPU, False), False)
    out = {"drawn": drawn, "alphas": [a.detach().clone() for a in model.arch_parameters()],
           "same": distributed.check_alphas(model.arch_parameters(), sampler.generator.get_state())}
    sampler.generator.manual_seed(rank)  # one rank's stream moved: the check must stop the run
    try:
        distributed.check_alphas(model.arch_parameters(), sampler.generator.get_state())
        out["different"] = None
    except distributed.RankFailure as e:
        out["different"] = str(e)
    return out


def _record(draw, net, drawn):
    weights, indices = draw(net)
    drawn.append(indices)
    return weights, indices


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_rank_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _single_process_update(grads_of_rank):
    """What one process computes: Adam's first step from the given gradient (returns α, exp_avg), in the
    gradient's dtype."""
    model = _network(grads_of_rank[0].dtype)
    _, a_opt = _optimisers(model)
    for a, g in zip(model.arch_parameters(), grads_of_rank):
        a.grad = g
    a_opt.step()
    return ([a.detach() for a in model.arch_parameters()],
            [a_opt.state[a]["exp_avg"] for a in model.arch_parameters()])


def _gradient(rank: int, dtype=torch.float32):
    train, valid = ((x.to(dtype), y) for x, y in _batches(rank, 0))
    grads, _ = alpha_gradient(_network(dtype), {"train": train, "valid": valid}, StepRule(), Precision(CPU, False))
    return grads


@pytest.mark.slow  # two spawned ranks (the `ranks` fixture)
@pytest.mark.gpu_path
@pytest.mark.parametrize("fused", [False, True], ids=["three_pass", "shared_train_pass"])
def test_alphas_and_weights_bit_identical_on_both_ranks(ranks, fused):
    a, b = ranks[0][fused], ranks[1][fused]
    for i in range(ITERATIONS):
        assert all(torch.equal(x, y) for x, y in zip(a["alphas"][i], b["alphas"][i])), f"iteration {i}"
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    assert distributed.checksum(a["alphas"][-1]) == distributed.checksum(b["alphas"][-1])
    assert not torch.equal(a["alphas"][0][0], a["alphas"][-1][0])  # α did move


@pytest.mark.slow  # two spawned ranks (the `ranks` fixture)
@pytest.mark.numerics
@pytest.mark.gpu_path
@pytest.mark.parametrize("fused", [False, True], ids=["three_pass", "shared_train_pass"])
def test_alpha_update_is_the_single_process_update_from_the_mean_gradient(ranks, fused):
    def update(dtype):
        g0, g1 = _gradient(0, dtype), _gradient(1, dtype)
        alpha, avg = _single_process_update([(x + y) / 2 for x, y in zip(g0, g1)])
        return avg + alpha

    got = ranks[0][fused]
    assert_within_fp32_error(got["exp_avg"] + got["alphas"][0], update(torch.float64), update(torch.float32))
    # the check can fail: rank 0's own gradient alone gives another Adam state
    _, own_avg = _single_process_update(_gradient(0))
    assert max(float((x - y).abs().max()) for x, y in zip(own_avg, got["exp_avg"])) > 1e-4


@pytest.mark.slow  # two spawned ranks (the `ranks` fixture)
@pytest.mark.gpu_path
def test_fused_mixed_op_under_ddp_gets_the_mean_of_the_ranks_weight_gradients(ranks):
    a, b = ranks[0]["fused_op"], ranks[1]["fused_op"]
    assert a["fused"] and b["fused"]
    want = {}
    for rank in range(2):  # the reference MixedOp, one process, each rank's input
        op = _mixed_op(ReferenceMixedOp)
        x, w = _op_inputs(rank)
        op(x, w).square().sum().backward()
        for n, p in op.named_parameters():
            want[n] = want.get(n, 0) + p.grad / 2
    assert set(a["grads"]) == set(want)
    for n, g in want.items():
        assert torch.equal(a["grads"][n], b["grads"][n]), n
        torch.testing.assert_close(a["grads"][n], g, rtol=1e-4, atol=1e-5, msg=n)


# --- data: disjoint shares of the same plan --------------------------------------------------------------
@pytest.mark.gpu_path
def test_rank_shares_are_disjoint_and_together_the_whole_plan_at_world_times_the_batch():
    from milenas_fast.data.datasets import Split

    n, batch, world = 23, 3, 2
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n))
    plan = Plan.draw(n, seed=3, stream="train", pass_index=1)
    shares = []
    for r in range(world):
        loader = ResidentLoader(split, batch, CPU)
        loader.rank, loader.world = r, world
        shares.append(list(loader.batches(loader.plan(3, "train", 1))))
        assert len(shares[-1]) == len(loader) == -(-(n // world) // batch)
    labels = [torch.cat([y for _, y in s]) for s in shares]
    assert not set(labels[0].tolist()) & set(labels[1].tolist())
    whole = list(ResidentLoader(split, batch * world, CPU).batches(plan))
    for i, (x, y) in enumerate(whole[:len(shares[0])]):
        if y.numel() < batch * world:  # the tail cut to a multiple of the world size
            continue
        got_x = torch.cat([shares[r][i][0] for r in range(world)])
        got_y = torch.cat([shares[r][i][1] for r in range(world)])
        order = torch.argsort(got_y)
        assert torch.equal(got_y[order], y.sort().values) and torch.equal(got_x[order], x[torch.argsort(y)])


# --- the CLI under torchrun and self-launched ranks -------------------------------------------------------
@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """`torchrun --nproc_per_node 2 -m milenas_fast search ... --tensorboard` in an empty folder, 3 epochs."""
    cwd = tmp_path_factory.mktemp("torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "milenas_fast", *TINY, "--save", "ddp", "--tensorboard"]
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, done


@pytest.mark.slow
@pytest.mark.gpu_path
def test_torchrun_search_writes_one_run_folder_and_logs_the_checksum_every_epoch(torchrun_run):
    cwd, done = torchrun_run
    entries = list(cwd.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("search-ddp-")  # rank 1 wrote nothing
    log = (entries[0] / "log.txt").read_text()
    sums = re.findall(r"alpha checksum ([0-9a-f]{16}) identical on 2 ranks", log)
    assert len(sums) == 3 and len(set(sums)) == 3
    assert log.count("args = ") == 1 and "CUDA graphs: ignored on cpu" in log
    assert "Traceback" not in done.stderr
    state = torch.load(entries[0] / "checkpoint.pt", weights_only=True)
    assert state["finished"] and state["world_size"] == 2
    assert distributed.checksum(state["alphas"]) == sums[-1]
    events = list((entries[0] / "tb").glob("events.out.tfevents.*"))  # rank 0 alone tracks the run
    assert len(events) == 1 and events[0].stat().st_size > 0, events


@pytest.mark.slow
@pytest.mark.gpu_path
def test_torchrun_train_writes_one_run_folder(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "milenas_fast", "train", "--dataset", "synthetic", "--synthetic_images", "40", "--layers", "3",
           "--init_channels", "4", "--batch_size", "8", "--epochs", "1", "--device", "cpu", "--auxiliary", "--quiet",
           "--loader", "gpu", "--workers", "0", "--scale_lr", "--save", "ddp"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("eval-ddp-") and (run_dir / "weights_last.pt").is_file()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["history"][0]["lr"] == pytest.approx(2 * 0.025)  # --scale_lr × 2 ranks


def _ranks(args: list[str], cwd: Path) -> list[subprocess.Popen]:
    """Two ranks started the way torchrun starts them (its environment variables)."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "milenas_fast", *args], cwd=cwd, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r),
                                  "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]


@pytest.mark.slow
def test_killed_rank_ends_the_run_then_resume_is_bit_exact(torchrun_run, tmp_path, monkeypatch):
    from milenas_fast.search import loop

    straight_dir = next(torchrun_run[0].iterdir())
    run_dir = tmp_path / "killed"
    rank0, rank1 = _ranks(TINY + ["--save_dir", str(run_dir)], tmp_path)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint.pt").exists():  # the first epoch is saved
        assert rank0.poll() is None and time.monotonic() < deadline, rank0.stderr.read()[-2000:]
        time.sleep(0.02)
    rank1.send_signal(signal.SIGKILL)
    start = time.monotonic()
    out, err = rank0.communicate(timeout=120)
    rank1.communicate()
    assert time.monotonic() - start < 90
    assert rank0.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("milenas-fast search: error: rank 0 of 2 lost the other ranks") and "Traceback" not in err
    partial = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # intact
    assert 1 <= partial["epoch"] < 3 and not partial["finished"]

    # the same run under another world size: continues, says what changed
    other = tmp_path / "one_process"
    other.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(loop, "_plot", lambda run_dir: None)  # pictures are not what is tested here
    assert main(["search", "--resume", str(other), "--quiet"]) == 0
    assert "resuming a run of 2 process(es) with 1" in (other / "log.txt").read_text()

    procs = _ranks(["search", "--resume", str(run_dir), "--quiet", "--dist_timeout", "60"], tmp_path)
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    want = torch.load(straight_dir / "checkpoint.pt", weights_only=True)
    got = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert got["finished"] and all(torch.equal(x, y) for x, y in zip(got["alphas"], want["alphas"]))
    assert all(torch.equal(want["model"][k], got["model"][k]) for k in want["model"])


# --- small pieces ----------------------------------------------------------------------------------------
def test_nproc_relaunches_the_same_command_through_torch_distributed_run(monkeypatch):
    seen = {}

    class FakePopen:
        def __init__(self, cmd):
            seen["cmd"] = cmd

        def wait(self):
            return 3

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["search", "--nproc", "2", "--epochs", "1", "--nproc=2", "--device", "cpu"]
    assert main(argv) == 3  # the launcher's exit status
    assert seen["cmd"] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "milenas_fast", "search", "--epochs", "1", "--device", "cpu"]


def test_before_joining_the_group_torchruns_rank_says_who_writes(monkeypatch):
    """A run settles (and locks) its folder before the process group exists: only RANK 0 may claim it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()
    monkeypatch.delenv("WORLD_SIZE")
    assert distributed.is_main()


def test_bad_nproc_is_one_line_and_exit_2(capsys):
    assert main(["train", "--nproc", "0"]) == 2
    assert capsys.readouterr().err.strip() == "milenas-fast train: error: --nproc must be positive, got 0"


def test_sync_bn_needs_cuda_with_several_processes(monkeypatch):
    model = Network(4, 10, 3, mixed_op=ReferenceMixedOp)
    converted = distributed.convert_sync_bn(model, CPU)  # one process: converted (statistics stay local)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--sync_bn needs CUDA"):
        distributed.convert_sync_bn(model, CPU)


def test_one_process_helpers_are_no_ops():
    grads = [torch.randn(3, 2)]
    assert distributed.average(grads) is grads and distributed.world_size() == 1 and distributed.is_main()
    model = Network(4, 10, 3, mixed_op=ReferenceMixedOp)
    assert distributed.wrap(model, CPU) is model
    assert distributed.check_alphas(model.arch_parameters()).endswith("(1 process)")
    assert not distributed.is_collective_failure(RuntimeError("gloo: Connection closed by peer"))


@pytest.mark.gpu_path
def test_cuda_graphs_are_off_with_several_processes_with_one_warning(monkeypatch):
    assert distributed.graphs_policy(True, "on") == (True, "on", None)  # one process keeps them
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    on, why, warning = distributed.graphs_policy(True, "on")
    assert not on and why.startswith("off: 2 processes") and "not captured" in warning
    assert distributed.graphs_policy(False, "off (--no-cuda_graphs)") == (False, "off (--no-cuda_graphs)", None)


@pytest.mark.slow
@pytest.mark.gpu_path
def test_torchrun_imagenet_training_reads_disjoint_shards(tmp_path):
    """ImageNet-style training on a generated JPEG folder with 2 ranks (each reads its shard of the epoch's
    order; tests/test_imagenet_loaders.py checks the shards): one run folder, one finished epoch."""
    from image_folders import jpeg_imagenet

    data = jpeg_imagenet(tmp_path / "imagenet")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "milenas_fast", "train", "--dataset", "imagenet", "--data", str(data), "--image_size", "32",
           "--layers", "3", "--init_channels", "4", "--batch_size", "2", "--epochs", "1", "--device", "cpu",
           "--quiet", "--loader", "torch", "--workers", "0", "--save", "ddp"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("eval-ddp-")]
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["config"]["dataset"] == "imagenet"


@pytest.mark.slow  # two spawned ranks (the `ranks` fixture)
@pytest.mark.numerics
@pytest.mark.gpu_path
def test_darts_2nd_under_ddp_is_the_global_batch_unrolled_gradient(ranks):
    """Each rank unrolls with the ranks' mean weight gradients (virtual step and v), so the averaged α
    gradient equals one process's on the whole batch; per-rank unrolling would not."""
    one = _darts_2nd_gradient(*_halves(None))
    one64 = _darts_2nd_gradient(*_halves(None, torch.float64))
    for r in ranks:
        assert_within_fp32_error(r["darts_2nd"], one64, one)
    alone = _darts_2nd_gradient(*_halves(0))  # rank 0's half alone: a different gradient
    assert max((a - b).abs().max() for a, b in zip(alone, one)) > 1e-3


@pytest.mark.slow  # two spawned ranks (the `ranks` fixture)
@pytest.mark.gpu_path
def test_gumbel_ranks_draw_the_same_sample_and_diverged_streams_stop_the_run(ranks):
    """Every rank draws the same architecture at every forward (same seed, same number of draws), and the
    epoch check compares the noise streams too: averaged α would stay equal even if the samples parted."""
    a, b = (r["gumbel"] for r in ranks)
    assert len(a["drawn"]) == 2 * 3 and a["drawn"] == b["drawn"]  # 3 forwards per milenas step
    assert len({str(d) for d in a["drawn"]}) > 1  # the draws change from forward to forward
    for x, y in zip(a["alphas"], b["alphas"]):
        assert torch.equal(x, y)
    assert a["same"].endswith("identical on 2 ranks")
    assert a["different"] and a["different"].startswith("the Gumbel sampler's noise streams differ across ranks")
