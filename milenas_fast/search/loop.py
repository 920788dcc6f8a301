"""The search: epochs, validation, model-size buckets, early stopping, run folder, checkpoints, resume."""
from __future__ import annotations

import copy
import functools
import json
import logging
import time
from pathlib import Path

import torch

from .. import distributed, runs, tracking
from ..config import SearchConfig
from ..errors import ConfigError
from ..data import BatchStream, load_dataset, make_loader, split_train_val
from ..data.loaders import epoch_batches
from ..divergence import FiniteWatch, floating_state
from ..meters import Progress, Totals
from ..precision import Precision
from ..runtime import load_rng_state, resolve_device, rng_state, seed_everything, set_determinism
from ..space import genotype as gt
from ..space.mixed_op import MixedOp, set_impl
from ..space.supernet import Network
from . import graphed, plan
from .authors_code import FreshIteratorStream
from .guard import Component, Guard
from .sampler import GumbelSampler, tau_at
from .step import StepRule, search_step

log = logging.getLogger("milenas_fast")


def compile_in_place(model, **options) -> None:
    """`--compile`: what nn.Module.compile does (in place: state_dict keys unchanged), with one Dynamo setting
    patched for this model's calls only. frozen_weights toggles the weights' requires_grad between passes;
    torch 2.11 skips the guards on parameters whose module dict is unchanged and so replayed the α-pass graph
    (no weight gradients) for the w pass: keep those guards."""
    keep_guards = torch._dynamo.config.patch(skip_tensor_guards_with_matching_dict_tags=False)
    model._compiled_call_impl = keep_guards(torch.compile(model._call_impl, **options))


class Search:
    """Everything a search epoch needs, and its checkpointable state."""

    tracker = tracking.Tracker([])  # run() gives it the run's (--tensorboard, --wandb)

    def __init__(self, cfg: SearchConfig, device: torch.device, graphs=None):
        """`graphs`: a capture mechanism to use instead of deciding (graphed.EagerGraphs() runs the graph path
        on a CPU, for tests)."""
        self.cfg, self.device = cfg, device
        seed_everything(cfg.seed)
        set_determinism(cfg.deterministic, device)
        data = load_dataset(cfg.dataset, cfg.data, cfg.synthetic_images, cfg.image_size)
        train, valid = split_train_val(data, cfg.train_portion)
        self.plan = plan.resolve(cfg, device, graphs)
        self.warnings = list(self.plan.warnings)  # logged once the run folder's log exists
        self.rank, self.world = distributed.rank(), distributed.world_size()
        check_split_sizes(len(train) // self.world, len(valid) // self.world, cfg.batch_size,
                          drop_last=self.plan.graphs)
        # CUDA graphs need static shapes: the train loader drops its partial last batch (graphed.py); it keeps
        # dropping it if the guard later switches the graph off
        shard = (self.rank, self.world)  # each process reads its own share of every plan
        self.train_loader = make_loader(self.plan.loader, train, cfg.batch_size, device, cfg.workers,
                                        drop_last=self.plan.graphs, shard=shard)
        self.valid_loader = make_loader(self.plan.loader, valid, cfg.batch_size, device, cfg.workers, shard=shard)
        self.model = Network(cfg.init_channels, data.num_classes, cfg.layers, mixed_op=self.plan.mixed_op).to(device)
        if self.plan.kernels is not None:  # the kernels the fused MixedOp passed its self-test with
            set_impl(self.model, "fused", self.plan.kernels)
        self.sampler = (GumbelSampler(cfg.gumbel_share, cfg.seed, device, cfg.tau_max)
                        if cfg.sampler == "gumbel" else None)
        self.model.sampler = self.sampler
        if cfg.sync_bn:
            self.model = distributed.convert_sync_bn(self.model, device)
        lr_scale = self.world if cfg.scale_lr else 1  # --scale_lr: linear scaling with the global batch
        self.w_optimizer = torch.optim.SGD(self.model.parameters(), cfg.learning_rate * lr_scale,
                                           momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.a_optimizer = torch.optim.Adam(self.model.arch_parameters(), lr=cfg.arch_learning_rate,
                                            betas=(0.5, 0.999), weight_decay=cfg.arch_weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_optimizer, cfg.epochs,
                                                                    eta_min=cfg.learning_rate_min * lr_scale)
        self.precision = Precision(device, cfg.amp)
        self.watch = FiniteWatch(device, watch_losses=self.precision.scaler is None,
                                 hint="start again with a lower --learning_rate or --arch_learning_rate, or "
                                      "without --amp")
        self.rule = StepRule(cfg.optimization, cfg.lambda_train_regularizer, cfg.lambda_valid_regularizer,
                             cfg.grad_clip, cfg.authors_code)
        stream = FreshIteratorStream if cfg.authors_code else BatchStream
        self.valid_stream = stream(self.valid_loader, cfg.seed, "valid")
        if cfg.authors_code and cfg.lambda_valid_regularizer != 1 and cfg.optimization == "milenas":
            self.warnings.append(f"--authors_code ignores --lambda_valid_regularizer "
                                 f"{cfg.lambda_valid_regularizer}, as the authors' code does (weight 1)")
        self.graphed = graphed.GraphedStep(self.model, self.w_optimizer, self.a_optimizer, self.rule,
                                           self.precision, cfg.batch_size, self.plan.shared_train_pass,
                                           graphs=graphs, watch=self.watch) if self.plan.graphs else None
        if self.plan.compile:
            compile_in_place(self.model)
        self.net = distributed.wrap(self.model, device)  # what the step runs: DDP under several processes
        self.guard = Guard(self._components(), self._snapshot, self._restore,
                           iterations=(self.graphed.warmup + 3) if self.graphed else 3)
        self.epoch = 0
        self.history: list[dict] = []
        self.model_sizes: dict[str, dict] = {}
        self.finished = False

    # --- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "kind": "search", "config": self.cfg.to_dict(), "epoch": self.epoch, "finished": self.finished,
            "model": self.model.state_dict(), "alphas": [a.detach().cpu() for a in self.model.arch_parameters()],
            "w_optimizer": self.w_optimizer.state_dict(), "a_optimizer": self.a_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "precision": self.precision.state_dict(),
            "valid_stream": self.valid_stream.state_dict(), "history": self.history,
            "model_sizes": self.model_sizes, "rng": rng_state(), "world_size": self.world,
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        with runs.restoring():
            self._load(state)
        if self.graphed is not None:
            self.graphed.invalidate()  # the optimisers' state tensors were replaced

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.model.load_alphas(state["alphas"])
        self.w_optimizer.load_state_dict(state["w_optimizer"])
        self.a_optimizer.load_state_dict(state["a_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])
        saved_world = state.get("world_size", 1)
        self.valid_stream.load_state_dict(state["valid_stream"], saved_world)
        if saved_world != self.world:
            self.warnings.append(f"resuming a run of {saved_world} process(es) with {self.world}: the global batch is "
                                 f"now {self.world} × --batch_size; the learning rates continue as saved")
        self.epoch, self.finished = state["epoch"], state["finished"]
        self.history, self.model_sizes = state["history"], state["model_sizes"]
        load_rng_state(state["rng"])
        if self.sampler is not None and not self.sampler.load_state_dict(state["sampler"]):
            self.warnings.append("the checkpoint's Gumbel noise generator is another device type's: the samples "
                                 "continue from a new stream (this resume is not bit-exact with an uninterrupted run)")

    # --- fast components and their guard ---------------------------------------------------------------
    def _components(self) -> list[Component]:
        """The fast components, in order of suspicion when an iteration fails."""
        out = []
        if self.graphed is not None:
            out.append(Component("CUDA graph", "the eager loop", functools.partial(self._without, "CUDA graph"),
                                 engaged=lambda: self.graphed is not None and self.graphed.phase != "warmup"))
        if self.plan.compile:
            out.append(Component("torch.compile", "the uncompiled model",
                                 functools.partial(self._without, "torch.compile")))
        if any(m.decision.impl == "fused" for m in self.model.modules() if isinstance(m, MixedOp)):
            # strict only when asked for by name: `auto` also builds the pinned FusedMixedOp
            out.append(Component("fused MixedOp", "the reference MixedOp", functools.partial(self._without, "fused MixedOp"),
                                 strict=self.cfg.impl == "fused"))
        return out

    def _without(self, component: str, why: str) -> None:
        """The guard's fallback: a new plan without `component`, and the search rebuilt to match it."""
        self.plan = self.plan.without(component, why)
        if component == "CUDA graph":
            self.graphed = None
        elif component == "torch.compile":
            self.model._compiled_call_impl = None  # undoes compile_in_place
        else:
            set_impl(self.model, "reference")

    def _snapshot(self) -> dict:
        return copy.deepcopy(self.state_dict())

    def _restore(self, state: dict) -> None:
        self.load_state_dict(copy.deepcopy(state))  # the snapshot may be restored again

    # --- one epoch -------------------------------------------------------------------------------------
    def train_epoch(self, progress) -> tuple[float, float, float]:
        cfg, model = self.cfg, self.model
        model.train()
        totals = Totals(self.device)
        batches = epoch_batches(self.train_loader, cfg.seed, "train", self.epoch)
        start, seen = time.perf_counter(), 0
        for step, train_batch in enumerate(batches):
            loss, logits = self.guard(functools.partial(self.iteration, train_batch))
            totals.add(loss, logits, train_batch[1])
            seen += train_batch[1].numel()
            last = step == len(self.train_loader) - 1
            if step % cfg.report_freq == 0 or last:
                obj, top1 = totals.log_line("train", step)
                self.watch.check(f"epoch {self.epoch} step {step}")
                rate = seen / (time.perf_counter() - start)
                progress.update(step + 1, obj, top1, rate)
                self.tracker.window(self.epoch, step, totals.read(), rate, self.learning_rates())
        self.watch.fold(tensors=floating_state(model) + model.arch_parameters())
        self.watch.check(f"the end of epoch {self.epoch}'s training")
        distributed.all_totals_(totals)  # the epoch's numbers over every rank's share
        obj, top1, top5 = totals.read()
        return top1, obj, top5

    def learning_rates(self) -> dict[str, float]:
        return {"lr": self.w_optimizer.param_groups[0]["lr"], "arch_lr": self.a_optimizer.param_groups[0]["lr"]}

    def iteration(self, train_batch):
        """One search iteration on `train_batch` (the validation batch comes from the stream)."""
        if self.graphed is not None:
            return self.graphed(train_batch, lambda: next(self.valid_stream))
        valid_batch = next(self.valid_stream) if self.rule.uses("valid") else None
        return search_step(self.net, train_batch, valid_batch, self.w_optimizer, self.a_optimizer, self.rule,
                           self.precision, self.plan.shared_train_pass, self.watch)

    @torch.no_grad()
    def infer(self) -> tuple[float, float, float]:
        self.model.eval()
        totals = Totals(self.device)
        for x, y in epoch_batches(self.valid_loader, self.cfg.seed, "infer", self.epoch):
            with self.precision.autocast():
                logits = self.model(x)
            totals.add(self.model._criterion(logits.float(), y), logits, y)
        distributed.all_totals_(totals)
        self.watch.fold(totals.sums[0])
        self.watch.check(f"epoch {self.epoch}'s validation")
        obj, top1 = totals.log_line("valid", len(self.valid_loader) - 1)
        return top1, obj, totals.read()[2]

    def record(self, train: tuple, valid: tuple, lr) -> dict:
        """The epoch's history entry; `train` and `valid`: (top-1 %, loss, top-5 %)."""
        (train_acc, train_obj, train_top5), (valid_acc, valid_obj, valid_top5) = train, valid
        g = self.model.genotype()
        n, r = gt.conv_counts(g)
        w_normal, w_reduce = self.model.mixing_weights()
        entry = {
            "epoch": self.epoch, "genotype": gt.to_text(g), "n": n, "r": r, "model_size": f"n{n}r{r}",
            "train_acc": train_acc, "train_loss": train_obj, "valid_acc": valid_acc, "valid_loss": valid_obj,
            "train_top5": train_top5, "valid_top5": valid_top5, "lr": lr, "alphas_normal": w_normal.detach().cpu().tolist(),
            "alphas_reduce": w_reduce.detach().cpu().tolist(),
        }
        if self.sampler is not None:
            entry["tau"] = self.sampler.tau
        self.history.append(entry)
        best = self.model_sizes.get(entry["model_size"])
        if best is None or valid_acc > best["valid_acc"]:
            self.model_sizes[entry["model_size"]] = {
                "epoch": self.epoch, "n": n, "r": r, "valid_acc": valid_acc, "train_acc": train_acc,
                "genotype": entry["genotype"], "genotype_json": gt.to_dict(g)}
        return entry


def check_split_sizes(n_train: int, n_valid: int, batch_size: int, drop_last: bool) -> None:
    """Refuse splits the loop cannot use: the CUDA-graph step needs one full validation batch per pass
    (refused on every device, so a command means the same everywhere) and, dropping partial training
    batches, at least one full training batch."""
    if n_valid < batch_size:
        raise ConfigError(f"the validation split has {n_valid} images, fewer than one batch (--batch_size "
                          f"{batch_size}); use more images, a smaller --batch_size or a smaller --train_portion")
    if drop_last and n_train < batch_size:
        raise ConfigError(f"the training split has {n_train} images, fewer than one batch (--batch_size "
                          f"{batch_size}), and CUDA graphs drop partial batches; use more images, a smaller "
                          "--batch_size or --no-cuda_graphs")


def write_run_files(run_dir: Path, search: Search) -> None:
    """Files derived from the checkpointed history: rewritten whole so they always agree with it."""
    lines = "".join(json.dumps(e) + "\n" for e in search.history)
    runs.atomic_write_text(run_dir / "genotypes.jsonl", lines)
    runs.atomic_write_json(run_dir / "model_sizes.json", dict(sorted(search.model_sizes.items())))


def write_final(run_dir: Path, search: Search) -> gt.Genotype:
    g = search.model.genotype()
    runs.atomic_write_json(run_dir / "genotype.json", gt.to_dict(g))
    runs.atomic_write_text(run_dir / "genotype.txt", gt.to_text(g) + "\n")
    return g


def _plot(run_dir: Path) -> None:
    """Cell diagrams and α plots; a failure here must not lose a finished search."""
    from ..plot import plot_run

    try:
        files = plot_run(run_dir)
        log.info("plots: %s", ", ".join(str(f.name) for f in files))
    except Exception as e:  # noqa: BLE001 — plotting is a convenience, the genotype is already saved
        log.warning("plotting failed (%s: %s); run `milenas-fast plot %s` to retry", type(e).__name__, e, run_dir)


def prepare(cfg: SearchConfig, run_dir: Path, state: dict | None) -> Search:
    """Load the data and build the search, restored from `state` when resuming; nothing is written."""
    device = distributed.init(resolve_device(cfg.device), cfg.dist_timeout)
    search = Search(cfg, device)
    if state is not None:
        search.load_state_dict(state)
    # every rank starts from rank 0's α and weights (identical by seeding or from the same checkpoint: a check)
    distributed.broadcast_(search.model.arch_parameters() + list(search.model.state_dict().values()))
    return search


def run(cfg: SearchConfig, explicit: dict | None = None, console: bool = True) -> Path:
    def body(search, run_dir, resumed, bar):
        search.tracker = tracking.open_tracker(search.cfg, run_dir, distributed.is_main(), resumed, search.epoch,
                                               len(search.train_loader))
        with search.tracker:
            return _run(search, run_dir, resumed, Progress(bar))

    return runs.run_in_folder("search", SearchConfig, cfg, explicit, console, prepare, body)


def _run(search: Search, run_dir: Path, resumed: bool, progress: Progress) -> Path:
    cfg, model, ckpt = search.cfg, search.model, run_dir / runs.CHECKPOINT
    main = distributed.is_main()
    if resumed:
        log.info("resuming %s at epoch %d", run_dir, search.epoch)
    else:
        if main:
            runs.atomic_write_json(run_dir / runs.ARGS, cfg.to_dict())
        log.info("args = %s", cfg.to_dict())
    for warning in search.warnings:
        log.warning(warning)
    first, second = search.plan.log_lines()
    log.info("%s", first)
    log.info("normalisation: %s", search.train_loader.split.stats_note())  # the validation half uses it too
    log.info("%s", second)
    log.info("param size = %fMB", sum(p.numel() for p in model.parameters()) / 1e6)

    while search.epoch < cfg.epochs and not search.finished:
        lr = search.scheduler.get_last_lr()[0]
        log.info("epoch %d lr %e", search.epoch, lr)
        if search.sampler is not None:
            search.sampler.tau = tau_at(search.epoch, cfg.epochs, cfg.tau_max, cfg.tau_min, cfg.authors_code)
            log.info("tau %f", search.sampler.tau)
        if cfg.authors_code:  # the authors log the architecture the epoch starts from
            log.info("genotype = %s", gt.to_text(model.genotype()))
        epoch_start = time.perf_counter()
        progress.start(search.epoch, len(search.train_loader))
        try:
            train = search.train_epoch(progress)
        finally:
            progress.close()
        log.info("train_acc %f", train[0])
        valid = search.infer()
        log.info("valid_acc %f", valid[0])
        search.scheduler.step()
        entry = search.record(train, valid, lr)
        if not cfg.authors_code:
            log.info("genotype = %s", entry["genotype"])
        seconds = time.perf_counter() - epoch_start
        log.info("model size %s; epoch time %.1fs", entry["model_size"], seconds)
        stop = cfg.early_stopping and (entry["n"], entry["r"]) == (cfg.early_stop_normal, cfg.early_stop_reduce)
        search.epoch += 1
        search.finished = stop or search.epoch >= cfg.epochs
        sampler_state = search.sampler.generator.get_state() if search.sampler is not None else None
        log.info("%s", distributed.check_alphas(model.arch_parameters(), sampler_state))  # diverged ranks stop before saving
        if main:
            runs.save_checkpoint(ckpt, search.state_dict())
            write_run_files(run_dir, search)
        # reported once checkpointed: a resumed run has reported exactly the epochs it continues from
        search.tracker.epoch(entry, seconds, arch_lr=search.learning_rates()["arch_lr"])
        search.tracker.architecture(entry)
        if stop:
            log.info("early stopping: the normal cell has %d convs and the reduction cell %d", entry["n"], entry["r"])
    if main:
        write_run_files(run_dir, search)
        g = write_final(run_dir, search)
        log.info("final genotype = %s", gt.to_text(g))
        _plot(run_dir)
    log.info("run folder: %s", run_dir)
    return run_dir
