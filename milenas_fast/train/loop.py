"""Train a fixed genotype from scratch: epochs, test accuracy, run folder, checkpoints, resume."""
from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from .. import distributed, runs, tracking
from ..data import make_loader, resolve_loader
from ..data.eval_data import TestBatches, cutout, cutout_generator, imagenet_loaders, load_train_test
from ..data.loaders import epoch_batches
from ..divergence import FiniteWatch, floating_state
from ..meters import Progress, Totals
from ..precision import Precision
from ..runtime import load_rng_state, resolve_device, rng_state, seed_everything, set_determinism
from ..space import genotype as gt
from ..space.evalnet import MOBILE_MULT_ADDS, NetworkCIFAR, NetworkImageNet, check_cell, mult_adds, param_count
from ..space.known_genotypes import by_name
from .config import TrainConfig

log = logging.getLogger("milenas_fast")

METRICS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "seconds")


def resolve_genotype(cfg: TrainConfig) -> tuple[gt.Genotype, str]:
    """(genotype, where it came from) for --arch / --genotype; DARTS_V2 when neither is given."""
    if cfg.genotype:
        return gt.load(cfg.genotype), f"--genotype {cfg.genotype}"
    name = cfg.arch or "DARTS_V2"
    return by_name(name), f"--arch {name}"


def build_network(cfg: TrainConfig, genotype: gt.Genotype, num_classes: int):
    if cfg.dataset == "imagenet":
        return NetworkImageNet(cfg.init_channels, num_classes, cfg.layers, cfg.auxiliary, genotype, cfg.image_size)
    return NetworkCIFAR(cfg.init_channels, num_classes, cfg.layers, cfg.auxiliary, genotype,
                        image_size=cfg.image_size)


def count_mult_adds(cfg: TrainConfig, genotype: gt.Genotype, num_classes: int) -> tuple[int, int]:
    """(mult-adds, image side): at 224×224 for ImageNet (the papers' number, whatever --image_size), else at
    the run's size; counted on a meta-device copy (no memory, no compute, the RNG untouched)."""
    size = 224 if cfg.dataset == "imagenet" else cfg.image_size
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        net = build_network(replace(cfg, image_size=size), genotype, num_classes)
    return mult_adds(net, size), size


class Trainer:
    """Everything a training epoch needs, and its checkpointable state."""

    tracker = tracking.Tracker([])  # run() gives it the run's (--tensorboard, --wandb)

    def __init__(self, cfg: TrainConfig, device: torch.device, genotype: gt.Genotype):
        self.cfg, self.device, self.genotype = cfg, device, genotype
        seed_everything(cfg.seed)
        set_determinism(cfg.deterministic, device)
        # The genotype first: one the network cannot be built from fails before any data is loaded.
        check_cell(genotype.normal, genotype.normal_concat, "normal")
        check_cell(genotype.reduce, genotype.reduce_concat, "reduce")
        if cfg.dataset == "imagenet":  # streamed from image files
            self.train_loader, self.test_batches, self.num_classes, self.loader_name, self.loader_why = \
                imagenet_loaders(cfg.data, cfg.loader, cfg.batch_size, cfg.image_size, device, cfg.workers, cfg.seed,
                                 shard=(distributed.rank(), distributed.world_size()))
        else:  # in memory
            train, test = load_train_test(cfg.dataset, cfg.data, cfg.synthetic_images, cfg.image_size)
            self.num_classes = train.num_classes
            self.loader_name, self.loader_why = resolve_loader(cfg.loader, device)
            self.train_loader = make_loader(self.loader_name, train, cfg.batch_size, device, cfg.workers,
                                            shard=(distributed.rank(), distributed.world_size()))
            self.test_batches = TestBatches(test, cfg.batch_size, device)
        # loading draws nothing from the global RNG: the weights are those the seed gave before data existed
        self.model = build_network(cfg, genotype, self.num_classes).to(device)
        if cfg.sync_bn:
            self.model = distributed.convert_sync_bn(self.model, device)
        self.net = distributed.wrap(self.model, device)  # what the training step runs: DDP with several processes
        lr_scale = distributed.world_size() if cfg.scale_lr else 1  # --scale_lr: linear scaling, global batch
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smooth)
        self.test_criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), cfg.learning_rate * lr_scale,
                                         momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.lr_schedule == "exponential":  # DARTS ImageNet: StepLR(1, gamma), the same thing
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, cfg.gamma)
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs, eta_min=0.0)
        self.precision = Precision(device, cfg.amp)
        self.watch = FiniteWatch(device, watch_losses=self.precision.scaler is None,
                                 hint="start again with a lower --learning_rate or without --amp")
        self.epoch = 0
        self.best_acc = -1.0
        self.history: list[dict] = []

    # --- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "kind": "train", "config": self.cfg.to_dict(), "genotype": gt.to_text(self.genotype),
            "epoch": self.epoch, "best_acc": self.best_acc, "history": self.history,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "precision": self.precision.state_dict(), "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        with runs.restoring():
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.precision.load_state_dict(state["precision"])
            self.epoch, self.best_acc, self.history = state["epoch"], state["best_acc"], state["history"]
            load_rng_state(state["rng"])

    # --- one epoch -------------------------------------------------------------------------------------
    def train_epoch(self, progress: Progress) -> tuple[float, float]:
        cfg, model, precision = self.cfg, self.model, self.precision
        model.train()
        model.drop_path_prob = cfg.drop_path_prob * self.epoch / cfg.epochs
        weights = list(model.parameters())
        totals = Totals(self.device)
        start, seen = time.perf_counter(), 0
        if cfg.dataset == "imagenet":
            batches = self.train_loader.epoch(self.epoch)
        else:
            batches = epoch_batches(self.train_loader, cfg.seed, "train", self.epoch)
        for step, (x, y) in enumerate(batches):
            if cfg.cutout:
                x = cutout(x, cfg.cutout_length, cutout_generator(cfg.seed, self.epoch, step))
            self.optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                logits, logits_aux = self.net(x)
            loss = self.criterion(logits.float(), y)
            if logits_aux is not None:
                loss = loss + cfg.auxiliary_weight * self.criterion(logits_aux.float(), y)
            precision.scale(loss).backward()
            precision.step(self.optimizer, weights, cfg.grad_clip)
            self.watch.fold(loss.detach())
            totals.add(loss.detach(), logits.detach(), y)
            seen += y.numel()
            if step % cfg.report_freq == 0 or step == len(self.train_loader) - 1:
                obj, top1 = totals.log_line("train", step)
                self.watch.check(f"epoch {self.epoch} step {step}")
                rate = seen / (time.perf_counter() - start)
                progress.update(step + 1, obj, top1, rate)
                self.tracker.window(self.epoch, step, totals.read(), rate, {"lr": self.optimizer.param_groups[0]["lr"]})
        self.watch.fold(tensors=floating_state(model))
        self.watch.check(f"the end of epoch {self.epoch}'s training")
        distributed.all_totals_(totals)  # the epoch's numbers over every rank's share
        obj, top1, _ = totals.read()
        return top1, obj

    @torch.no_grad()
    def infer(self) -> tuple[float, float, float]:
        """(top-1, loss, top-5) on the test set; the loss without label smoothing."""
        self.model.eval()
        totals = Totals(self.device)
        for step, (x, y) in enumerate(self.test_batches):
            with self.precision.autocast():
                logits, _ = self.model(x)
            totals.add(self.test_criterion(logits.float(), y), logits, y)
            if step % self.cfg.report_freq == 0 or step == len(self.test_batches) - 1:
                totals.log_line("valid", step)
        self.watch.fold(totals.sums[0])
        self.watch.check(f"epoch {self.epoch}'s test")
        obj, top1, top5 = totals.read()
        return top1, obj, top5


def metrics_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRICS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: row.get(k, "") for k in METRICS})  # runs from before test_top5 lack it
    return buf.getvalue()


def save_weights(path: Path, model: nn.Module) -> None:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    runs.atomic_write_bytes(path, buf.getvalue())


def run_genotype(cfg: TrainConfig, run_dir: Path, state: dict | None) -> tuple[gt.Genotype, str]:
    """(genotype, where it came from): a resumed run's own copy (the source file or run folder may have
    changed since), else --arch / --genotype."""
    if state is not None:
        return gt.from_text(state["genotype"], "checkpoint genotype"), f"checkpoint {run_dir}"
    if cfg.resume:  # stopped before its first checkpoint: genotype.json is written before args.json
        return gt.load(run_dir), f"{run_dir / 'genotype.json'}"
    return resolve_genotype(cfg)


def prepare(cfg: TrainConfig, genotype: gt.Genotype, state: dict | None) -> Trainer:
    """Load the data and build the trainer, restored from `state` when resuming; nothing is written."""
    device = distributed.init(resolve_device(cfg.device), cfg.dist_timeout)
    trainer = Trainer(cfg, device, genotype)
    if state is not None:
        trainer.load_state_dict(state)
    distributed.broadcast_(trainer.model.state_dict().values())  # every rank starts from rank 0's weights
    return trainer


def run(cfg: TrainConfig, explicit: dict | None = None, console: bool = True) -> Path:
    if not cfg.resume:  # a checkpoint or args.json holds the resolved settings
        cfg = cfg.with_dataset_defaults(explicit)

    def build(cfg, run_dir, state):
        genotype, source = run_genotype(cfg, run_dir, state)
        return prepare(cfg, genotype, state), source

    def body(built, run_dir, resumed, bar):
        trainer = built[0]
        trainer.tracker = tracking.open_tracker(trainer.cfg, run_dir, distributed.is_main(), resumed, trainer.epoch,
                                                len(trainer.train_loader))
        with trainer.tracker:
            return _run(trainer, run_dir, resumed, built[1], Progress(bar))

    return runs.run_in_folder("train", TrainConfig, cfg, explicit, console, build, body)


def _run(trainer: Trainer, run_dir: Path, resumed: bool, source: str, progress: Progress) -> Path:
    cfg, model = trainer.cfg, trainer.model
    g = trainer.genotype
    main = distributed.is_main()
    if resumed:
        log.info("resuming %s at epoch %d", run_dir, trainer.epoch)
    elif main:  # args.json last: a folder holding it can be resumed, and that reads the genotype files
        runs.atomic_write_text(run_dir / "genotype.txt", gt.to_text(g) + "\n")
        runs.atomic_write_json(run_dir / "genotype.json", gt.to_dict(g))
        runs.atomic_write_json(run_dir / runs.ARGS, cfg.to_dict())
        log.info("args = %s", cfg.to_dict())
    n, r = gt.conv_counts(g)
    log.info("genotype = %s (from %s; model size n%dr%d)", gt.to_text(g), source, n, r)
    log.info("device = %s; %s; loader = %s (%s)", trainer.device, trainer.precision.note, trainer.loader_name,
             trainer.loader_why)
    log.info("normalisation: %s", "ImageNet's mean and std" if cfg.dataset == "imagenet" else
             trainer.train_loader.split.stats_note())  # the test set uses the training set's
    log.info("param size = %fMB", param_count(model) / 1e6)
    if cfg.auxiliary:
        aux = sum(p.numel() for p in model.auxiliary_head.parameters())
        log.info("auxiliary head = %fMB (not counted above)", aux / 1e6)
    macs, size = count_mult_adds(cfg, g, trainer.num_classes)
    mobile = ""
    if cfg.dataset == "imagenet":
        mobile = "; within the mobile setting (≤ 600M)" if macs <= MOBILE_MULT_ADDS else \
            "; EXCEEDS the mobile setting's 600M"
    log.info("mult-adds = %fM at %dx%d (conv and linear layers, auxiliary head excluded%s)", macs / 1e6, size,
             size, mobile)

    while trainer.epoch < cfg.epochs:
        lr = trainer.scheduler.get_last_lr()[0]
        log.info("epoch %d lr %e", trainer.epoch, lr)
        log.info("drop_path_prob %f", cfg.drop_path_prob * trainer.epoch / cfg.epochs)
        epoch_start = time.perf_counter()
        progress.start(trainer.epoch, len(trainer.train_loader))
        try:
            train_acc, train_obj = trainer.train_epoch(progress)
        finally:
            progress.close()
        log.info("train_acc %f", train_acc)
        test_acc, test_obj, test_top5 = trainer.infer()
        log.info("valid_acc %f", test_acc)
        log.info("valid_acc_top5 %f", test_top5)
        trainer.scheduler.step()
        seconds = time.perf_counter() - epoch_start
        trainer.history.append({"epoch": trainer.epoch, "lr": lr, "train_loss": train_obj, "train_acc": train_acc,
                                "test_loss": test_obj, "test_acc": test_acc, "test_top5": test_top5,
                                "seconds": round(seconds, 3)})
        improved = test_acc > trainer.best_acc
        if improved:
            trainer.best_acc = test_acc
        trainer.epoch += 1
        # Weights first, checkpoint last: a crash in between leaves a checkpoint that redoes this epoch.
        if main:
            save_weights(run_dir / "weights_last.pt", model)
            if improved:
                save_weights(run_dir / "weights_best.pt", model)
            runs.atomic_write_text(run_dir / "metrics.csv", metrics_csv(trainer.history))
            runs.save_checkpoint(run_dir / runs.CHECKPOINT, trainer.state_dict())
        trainer.tracker.epoch(trainer.history[-1], seconds)  # once checkpointed, as for search
        log.info("best test_acc %f; epoch time %.1fs", trainer.best_acc, seconds)
    if main:
        runs.atomic_write_text(run_dir / "metrics.csv", metrics_csv(trainer.history))
    log.info("run folder: %s", run_dir)
    return run_dir
