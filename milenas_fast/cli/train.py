"""`milenas-fast train`: train a genotype from scratch (DARTS train.py; flags generated from TrainConfig)."""
from __future__ import annotations

from ..train.config import TrainConfig
from .settings_command import add_settings_parser, run_settings


def add_parser(sub) -> None:
    add_settings_parser(sub, "train", TrainConfig, help="train a genotype from scratch and report test accuracy",
                        description="Train a cell (--arch NAME or --genotype TEXT|FILE|RUN_DIR) from scratch on "
                                    "CIFAR-10 (or --dataset cifar100 | imagefolder | imagenet | synthetic), "
                                    "DARTS-style. DARTS flag names; hyphenated aliases are accepted. Several "
                                    "processes: torchrun --nproc_per_node N -m milenas_fast train ..., or --nproc N.")


def run(args, argv) -> int:
    from ..train.loop import run as run_train

    return run_settings("train", TrainConfig, run_train, args, argv)
