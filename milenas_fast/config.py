"""The validated settings of a run. Each field carries its flag help, so the CLI is generated from here
and there is one place that knows defaults and rules. Bad values raise ConfigError (exit 2 in the CLI)."""
from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from .errors import ConfigError


def opt(default, help: str, choices=None, former: str | None = None, const=None, metavar=None):
    """A flag's field. `former`: the flag's old name, still accepted on the command line and in stored
    configurations (args.json, checkpoints). `const`: the flag may be typed without a value, meaning `const`
    (argparse nargs='?')."""
    return field(default=default, metadata={"help": help, "choices": choices, "former": former, "const": const,
                                            "metavar": metavar})


TENSORBOARD_IN_RUN = "RUN_DIR/tb"  # --tensorboard typed without a folder: tb/ inside the run folder
# Experiment tracking only reports on a run, so it may change on --resume (each command's RUNTIME adds it).
TRACKING = ("tensorboard", "wandb", "wandb_project", "wandb_name")


OPTIMIZATIONS = ("milenas", "darts", "single_level", "darts_2nd")


@dataclass
class Settings:
    """What search and train settings share: the flags of runs with several processes (torchrun), range checks
    with flag-named messages, dict round trip."""
    scale_lr: bool = opt(False, "several processes (torchrun): multiply the weights' learning rates by the world "
                                "size (linear scaling: --batch_size is per process, the global batch is world × it)")
    sync_bn: bool = opt(False, "several processes on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm); "
                               "default: each process normalises with its own batch")
    dist_timeout: int = opt(300, "several processes: seconds a collective may wait for the other ranks before the "
                                 "run stops with an error (a dead or stuck rank)")
    tensorboard: str = opt("", "log to TensorBoard in DIR (typed alone: the run folder's tb/); needs the "
                               "tensorboard package", const=TENSORBOARD_IN_RUN, metavar="DIR")
    wandb: bool = opt(False, "log to Weights & Biases (WANDB_MODE=offline works without an account); needs wandb")
    wandb_project: str = opt("milenas-fast", "--wandb: the W&B project")
    wandb_name: str = opt("", "--wandb: the W&B run name (default: the run folder's name)")

    def check(self, positive=(), nonneg=(), fractions=()) -> None:
        """Every field of its declared type (a stored configuration may have been edited) and every number
        finite, before the ranges: NaN fails no `<` test. `fractions` lie in [0, 1)."""
        for f in fields(self):
            self._check_type(f.name, type(f.default))
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must not be negative, got {getattr(self, name)}")
        for name in fractions:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must lie in [0, 1), got {getattr(self, name)}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        for flag in ("tensorboard", "wandb"):  # before the run starts: never a half-written folder
            if getattr(self, flag) and importlib.util.find_spec(flag) is None:
                raise ConfigError(f"--{flag} needs the {flag} package: pip install 'milenas-fast[{flag}]'")
        if self.init_channels % 2:
            raise ConfigError(f"--init_channels must be even (FactorizedReduce halves it), got {self.init_channels}")

    def _check_type(self, name: str, kind: type) -> None:
        value = getattr(self, name)
        number = kind is float and isinstance(value, int)  # JSON writes 1.0 as 1
        if isinstance(value, bool) != (kind is bool) or not (isinstance(value, kind) or number):
            raise ConfigError(f"--{name} must be {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"--{name} must be a finite number, got {value}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def current_names(cls, d: dict) -> dict:
        """`d` (a stored configuration) with renamed flags under their current names."""
        renamed = {f.metadata["former"]: f.name for f in fields(cls) if f.metadata.get("former")}
        return {renamed.get(k, k): v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cls.current_names(d).items() if k in known})

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


@dataclass
class SearchConfig(Settings):
    # data
    dataset: str = opt("cifar10", "cifar10 or cifar100 (torchvision, downloaded into --data when missing), "
                                  "synthetic, or imagefolder (--data DIR: DIR/<class>/<image>, or DIR/train/...)",
                       ("cifar10", "cifar100", "synthetic", "imagefolder"))
    data: str = opt("./data", "folder holding (or receiving) CIFAR-10/100, or the image folder")
    image_size: int = opt(32, "--dataset imagefolder: images resized (shorter side, then centre crop) to this "
                              "side once, held in memory; a multiple of 4")
    synthetic_images: int = opt(5000, "images in the synthetic set (--dataset synthetic)")
    train_portion: float = opt(0.5, "fraction of the training set that trains the weights; the rest drives α")
    batch_size: int = opt(64, "batch size (train and validation)")
    workers: int = opt(2, "DataLoader worker processes (--loader torch)")
    loader: str = opt("auto", "auto | torch | gpu (dataset resident on the device) | dali", ("auto", "torch", "gpu", "dali"))
    # weights
    learning_rate: float = opt(0.025, "initial learning rate of the weights (SGD)")
    learning_rate_min: float = opt(0.001, "final learning rate of the cosine schedule")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(3e-4, "SGD weight decay")
    grad_clip: float = opt(5.0, "clip the WEIGHTS' gradient norm at this value (0 disables)")
    # architecture
    arch_learning_rate: float = opt(3e-4, "Adam learning rate of α")
    arch_weight_decay: float = opt(1e-3, "Adam weight decay (L2) of α")
    optimization: str = opt("milenas", "milenas (mixed-level) | darts (first order) | single_level | darts_2nd "
                                        "(second-order DARTS: unrolled, finite-difference Hessian)", OPTIMIZATIONS)
    lambda_train_regularizer: float = opt(1.0, "weight of ∇α L_train in the α gradient")
    lambda_valid_regularizer: float = opt(1.0, "weight of ∇α L_val in the α gradient")
    authors_code: bool = opt(False, "reproduce the authors' code where we deliberately differ: clip α (not the "
                                    "weights), a fresh validation iterator per step, λ_valid ignored, the genotype "
                                    "logged before each epoch's training")
    # sampling (MiLeNAS-GDAS)
    sampler: str = opt("softmax", "softmax (every candidate, weighted by softmax(α)) | gumbel (hard Gumbel-softmax "
                                  "samples, straight-through; only the sampled candidate runs)", ("softmax", "gumbel"))
    tau_max: float = opt(10.0, "--sampler gumbel: temperature of the first epoch (falls linearly to --tau_min)")
    tau_min: float = opt(1.0, "--sampler gumbel: temperature of the last epoch (GDAS uses 0.1)")
    gumbel_share: str = opt("cell", "--sampler gumbel: one sample per cell, or one per cell type shared by its "
                                    "cells", ("cell", "type"))
    # network
    init_channels: int = opt(16, "channels of the first cell")
    layers: int = opt(8, "number of cells")
    # schedule and stopping
    epochs: int = opt(50, "number of search epochs")
    early_stopping: bool = opt(False, "stop after the epoch whose genotype has the target conv counts")
    early_stop_normal: int = opt(6, "target conv count of the normal cell")
    early_stop_reduce: int = opt(0, "target conv count of the reduction cell")
    # runtime
    seed: int = opt(2, "random seed")
    device: str = opt("auto", "auto | cpu | cuda", ("auto", "cpu", "cuda"))
    amp: bool = opt(False, "mixed precision (bf16 autocast; fp16 + loss scaling where bf16 is unsupported)")
    impl: str = opt("auto", "MixedOp implementation: auto | fused | reference", ("auto", "fused", "reference"))
    cuda_graphs: bool = opt(True, "capture the whole iteration (3 passes, both optimiser steps) in one CUDA graph and "
                                  "replay it; only on a CUDA device (ignored on CPU), off with fp16 loss scaling or "
                                  "--compile; drops the partial last batch of each pass (static shapes)")
    compile: bool = opt(False, "torch.compile the supernet's forward (an alternative to --cuda_graphs)")
    shared_train_pass: bool = opt(False, "∇w and ∇α of the training loss from ONE backward (2 passes instead of 3); "
                                         "changes the algorithm slightly: w's gradient uses the pre-update α "
                                         "(formerly --fused_train_step, still accepted)", former="fused_train_step")
    deterministic: bool = opt(False, "deterministic algorithms (bit-exact reruns and resume on CPU)")
    report_freq: int = opt(50, "log a training line every N steps")
    quiet: bool = opt(False, "no progress bar and no per-step console lines (log.txt is unchanged)")
    save: str = opt("EXP", "experiment name: the run folder is search-<save>-<YYYYmmdd-HHMMSS>")
    save_dir: str = opt("", "exact run folder (overrides --save)")
    resume: str = opt("", "continue the run in RUN_DIR (or from a checkpoint file)")

    # Flags that only change how a run executes, not what it computes: they may differ on --resume.
    RUNTIME = ("device", "workers", "report_freq", "quiet", "resume", "save", "save_dir", "data", "loader", "impl",
               "cuda_graphs", "compile", "dist_timeout", *TRACKING)

    def validate(self) -> "SearchConfig":
        self.check(
            positive=("synthetic_images", "batch_size", "init_channels", "layers", "epochs", "report_freq",
                      "dist_timeout", "learning_rate", "arch_learning_rate"),
            nonneg=("learning_rate_min", "weight_decay", "grad_clip", "arch_weight_decay",
                    "lambda_train_regularizer", "lambda_valid_regularizer", "workers", "early_stop_normal",
                    "early_stop_reduce"),
            fractions=("momentum",))
        if not 0.0 < self.train_portion < 1.0:
            raise ConfigError(f"--train_portion must lie strictly between 0 and 1, got {self.train_portion}")
        check_image_size(self.dataset, self.image_size, {"imagefolder": 4})
        if self.layers < 3:  # fewer cells leave no normal cell: its α would get no gradient
            raise ConfigError(f"--layers must be at least 3 (two reduction cells and a normal one), got {self.layers}")
        if self.learning_rate_min > self.learning_rate:
            raise ConfigError("--learning_rate_min must not exceed --learning_rate")
        self._check_sampler()
        if self.authors_code and self.shared_train_pass:
            raise ConfigError("--authors_code reproduces the authors' three-pass iteration; drop --shared_train_pass")
        return self

    def _check_sampler(self) -> None:
        if not 0.0 < self.tau_min <= self.tau_max:
            raise ConfigError(f"--tau_min and --tau_max need 0 < tau_min <= tau_max, got {self.tau_min} and "
                              f"{self.tau_max}")
        if self.sampler == "gumbel" and self.compile:
            raise ConfigError("--compile does not apply to --sampler gumbel: the candidates that run change every "
                              "forward (drop --compile)")
        if self.sampler == "gumbel" and self.impl == "fused":
            raise ConfigError("--impl fused does not apply to --sampler gumbel: the fused kernel computes every "
                              "candidate, sampling runs one (use --impl auto or reference)")
        if self.sampler == "gumbel" and self.optimization == "darts_2nd":
            raise ConfigError("--optimization darts_2nd does not combine with --sampler gumbel: each forward draws "
                              "its own sample, so the finite difference of its Hessian term would compare two "
                              "different networks")


def check_image_size(dataset: str, image_size: int, multiples: dict[str, int]) -> None:
    """--image_size applies to the datasets in `multiples` (which the network's stride-2 steps must divide);
    the others have fixed 32×32 images."""
    if dataset not in multiples:
        if image_size != 32:
            raise ConfigError(f"--image_size applies to --dataset {' / '.join(multiples)}; {dataset} images are 32×32")
    elif image_size <= 0 or image_size % multiples[dataset]:
        raise ConfigError(f"--image_size must be a positive multiple of {multiples[dataset]} for --dataset {dataset} "
                          f"(the network halves it that often), got {image_size}")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, explicit_only: bool = False) -> None:
    """One flag per field, snake_case as in DARTS plus a hyphenated alias. With explicit_only, defaults
    are suppressed so the namespace holds only the flags the user typed. The shared multi-process flags
    come last in --help, after the command's own."""
    shared = {f.name for f in fields(Settings)}
    for f in sorted(fields(cls), key=lambda f: f.name in shared):
        names = [n for name in (f.name, f.metadata.get("former")) if name
                 for n in dict.fromkeys((f"--{name}", f"--{name.replace('_', '-')}"))]
        default = argparse.SUPPRESS if explicit_only else f.default
        kwargs = {"dest": f.name, "default": default, "help": f.metadata.get("help", "")}
        if f.default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} needs a default")
        if isinstance(f.default, bool):
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if f.metadata.get("const") is not None:
            kwargs.update(nargs="?", const=f.metadata["const"])
        kwargs["type"] = type(f.default)
        kwargs["metavar"] = f.metadata.get("metavar") or {int: "N", float: "X", str: "S"}[type(f.default)]
        parser.add_argument(*names, **kwargs)


def explicit_flags(argv: list[str], cls) -> dict:
    """The flags of `cls` the user actually typed in `argv` (for --resume consistency checks)."""
    p = argparse.ArgumentParser(add_help=False)
    add_dataclass_flags(p, cls, explicit_only=True)
    ns, _ = p.parse_known_args(argv)
    return vars(ns)
