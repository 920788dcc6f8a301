"""`milenas-fast train`: train a genotype from scratch (DARTS train.py; flags generated from TrainConfig)."""
from __future__ import annotations

from .. import distributed
from ..config import add_dataclass_flags, explicit_flags
from ..train.config import TrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a genotype from scratch and report test accuracy",
                       description="Train a cell (--arch NAME or --genotype TEXT|FILE|RUN_DIR) from scratch on "
                                   "CIFAR-10 (or --dataset cifar100 | imagefolder | imagenet | synthetic), DARTS-style. DARTS flag names; hyphenated "
                                   "aliases are accepted. Several processes: torchrun --nproc_per_node N -m "
                                   "milenas_fast train ..., or --nproc N.")
    add_dataclass_flags(p, TrainConfig)
    distributed.add_nproc_flag(p)


def run(args, argv) -> int:
    from ..train.loop import run as run_train

    def body() -> int:
        cfg = TrainConfig.from_args(args)
        run_dir = run_train(cfg, explicit_flags(argv[1:], TrainConfig))
        if not cfg.quiet and distributed.is_main():
            print(f"done: {run_dir}")
        return 0
    return distributed.run_command("train", args, argv, body)
