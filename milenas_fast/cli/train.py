"""`milenas-fast train`: train a genotype from scratch (DARTS train.py; flags generated from TrainConfig)."""
from __future__ import annotations

import argparse

from ..config import add_dataclass_flags
from ..train.config import TrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a genotype from scratch and report test accuracy",
                       description="Train a cell (--arch NAME or --genotype TEXT|FILE|RUN_DIR) from scratch on "
                                   "CIFAR-10 (or --dataset synthetic), DARTS-style. DARTS flag names; hyphenated "
                                   "aliases are accepted.")
    add_dataclass_flags(p, TrainConfig)


def explicit_flags(argv: list[str]) -> dict:
    """The flags the user actually typed (for --resume consistency checks)."""
    p = argparse.ArgumentParser(add_help=False)
    add_dataclass_flags(p, TrainConfig, explicit_only=True)
    ns, _ = p.parse_known_args(argv)
    return vars(ns)


def run(args, argv) -> int:
    from ..train.loop import run as run_train

    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})
    run_dir = run_train(cfg, explicit_flags(argv[1:]))
    if not cfg.quiet:
        print(f"done: {run_dir}")
    return 0
