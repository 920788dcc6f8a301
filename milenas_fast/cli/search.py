"""`milenas-fast search`: the MiLeNAS search (flags generated from SearchConfig)."""
from __future__ import annotations

from ..config import SearchConfig
from .settings_command import add_settings_parser, run_settings


def add_parser(sub) -> None:
    add_settings_parser(sub, "search", SearchConfig, help="run the architecture search",
                        description="MiLeNAS search on CIFAR-10 (or --dataset cifar100 | imagefolder | synthetic). "
                                    "DARTS flag names; hyphenated aliases are accepted. Several processes: torchrun "
                                    "--nproc_per_node N -m milenas_fast search ..., or --nproc N.")


def run(args, argv) -> int:
    from ..search.loop import run as run_search

    return run_settings("search", SearchConfig, run_search, args, argv)
