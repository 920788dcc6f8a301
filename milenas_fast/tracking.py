"""Experiment tracking: what a search or train run reports, sent to TensorBoard and/or Weights & Biases.

One Tracker per run, on rank 0 only; without --tensorboard and --wandb it has no sinks and does nothing. Two
x-axes: `step/*` scalars are per report window (every --report_freq steps) at the global iteration
epoch × steps_per_epoch + step + 1; `epoch/*` scalars, the α heatmaps and the genotype at the epoch number (as in
genotypes.jsonl and metrics.csv). Epochs are reported after their checkpoint is written, so a resumed run
has reported exactly the checkpointed epochs; TensorBoard's purge_step then drops the windows the interrupted
epoch had reported, and the run goes on in the same folder without duplicated steps.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from .config import TENSORBOARD_IN_RUN


def figure_pixels(fig):
    """An RGB uint8 array (H, W, 3) of a matplotlib Figure, rendered off-screen."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def entropy(weights: list[list[float]]) -> float:
    """Mean entropy (nats) of a cell's per-edge softmax(α): log 8 = 2.079 when uniform, 0 when one-hot."""
    return sum(-sum(p * math.log(p) for p in row if p > 0) for row in weights) / len(weights)


class TensorBoardSink:
    def __init__(self, log_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict, axis: str, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, tag: str, pixels, step: int) -> None:
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def hparams(self, config: dict) -> None:
        """Into this run's own event file (SummaryWriter.add_hparams would start a second run beside it)."""
        from torch.utils.tensorboard.summary import hparams

        plain = {k: v for k, v in config.items() if isinstance(v, (bool, int, float, str))}
        for summary in hparams(plain, {}):
            self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per run folder: its id comes from the folder's path, so a resumed run continues it."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict):
        import wandb

        self.wandb = wandb
        run_id = f"{run_dir.name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
        # console="off": W&B's stdout capture fails in forked DataLoader workers (and log.txt has those lines)
        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(run_dir)}  # default: wandb/ in the run folder
        self.run = wandb.init(project=project, name=name or run_dir.name, id=run_id, resume="allow",
                              config=config, settings=wandb.Settings(console="off"), **where)
        # W&B reports the first import of libraries it knows to its service; a forked DataLoader worker
        # importing one (torchvision's transforms) then fails with ForkedError
        from wandb.sdk.lib.import_hooks import unregister_all_post_import_hooks

        unregister_all_post_import_hooks()
        self.run.define_metric("iteration")
        self.run.define_metric("epoch")
        self.run.define_metric("step/*", step_metric="iteration")
        self.run.define_metric("epoch/*", step_metric="epoch")
        self.run.define_metric("alphas", step_metric="epoch")
        self.run.define_metric("genotype", step_metric="epoch")

    def scalars(self, values: dict, axis: str, step: int) -> None:
        self.run.log({**values, axis: step})

    def image(self, tag: str, pixels, step: int) -> None:
        self.run.log({tag: self.wandb.Image(pixels), "epoch": step})

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: text, "epoch": step})

    def hparams(self, config: dict) -> None:
        pass  # given to wandb.init as the run's config

    def flush(self) -> None:
        pass  # W&B writes as it goes

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """What a run reports, to every sink it was given (none: nothing happens). A context manager."""

    def __init__(self, sinks: list, steps_per_epoch: int = 1):
        self.sinks, self.steps_per_epoch = sinks, steps_per_epoch
        self.images_per_s = 0.0  # the last window's rate: over the epoch so far, so the epoch's at its end

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        for sink in self.sinks:
            sink.close()

    def window(self, epoch: int, step: int, totals: tuple[float, float, float], images_per_s: float,
               lrs: dict[str, float]) -> None:
        """A report window of training (Totals.read(): loss, top-1, top-5 so far this epoch)."""
        if not self.sinks:
            return
        self.images_per_s = images_per_s
        loss, top1, top5 = totals
        values = {"step/train_loss": loss, "step/train_top1": top1, "step/train_top5": top5,
                  "step/images_per_s": images_per_s, **{f"step/{k}": v for k, v in lrs.items()}}
        for sink in self.sinks:
            sink.scalars(values, "iteration", epoch * self.steps_per_epoch + step + 1)

    def epoch(self, row: dict, seconds: float, **extra: float) -> None:
        """An epoch's numbers: the numeric fields of its genotypes.jsonl / metrics.csv row, its time and rate."""
        values = {f"epoch/{k}": float(v) for k, v in row.items()
                  if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        values.update({"epoch/seconds": seconds, "epoch/images_per_s": self.images_per_s,
                       **{f"epoch/{k}": v for k, v in extra.items()}})
        for sink in self.sinks:
            sink.scalars(values, "epoch", row["epoch"])
            sink.flush()

    def architecture(self, entry: dict) -> None:
        """A search epoch's α (heatmaps, each cell type's entropy) and genotype; (n, r) come with epoch()."""
        if not self.sinks:
            return
        from .plot import alphas_figure

        pixels = figure_pixels(alphas_figure(entry))
        scalars = {"epoch/entropy_normal": entropy(entry["alphas_normal"]),
                   "epoch/entropy_reduce": entropy(entry["alphas_reduce"])}
        for sink in self.sinks:
            sink.scalars(scalars, "epoch", entry["epoch"])
            sink.image("alphas", pixels, entry["epoch"])
            sink.text("genotype", entry["genotype"], entry["epoch"])
            sink.flush()


def tensorboard_dir(cfg, run_dir: Path) -> Path:
    return run_dir / "tb" if cfg.tensorboard == TENSORBOARD_IN_RUN else Path(cfg.tensorboard)


def open_tracker(cfg, run_dir: Path, main: bool, resumed: bool, epoch: int, steps_per_epoch: int) -> Tracker:
    """The run's tracker; `main`: rank 0, the only one that reports (the others get one without sinks).
    Resumed at `epoch`: TensorBoard drops what the interrupted epoch had reported, and the hyper-parameters
    are not written again."""
    sinks = []
    if main:
        if cfg.tensorboard:
            sinks.append(TensorBoardSink(tensorboard_dir(cfg, run_dir),
                                         epoch * steps_per_epoch + 1 if resumed else None))
        if cfg.wandb:
            sinks.append(WandbSink(run_dir, cfg.wandb_project, cfg.wandb_name, cfg.to_dict()))
    if not resumed:
        for sink in sinks:
            sink.hparams(cfg.to_dict())
    return Tracker(sinks, steps_per_epoch)
