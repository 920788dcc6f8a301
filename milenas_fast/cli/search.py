"""`milenas-fast search`: the MiLeNAS search (flags generated from SearchConfig)."""
from __future__ import annotations

from .. import distributed
from ..config import SearchConfig, add_dataclass_flags, explicit_flags


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="run the architecture search",
                       description="MiLeNAS search on CIFAR-10 (or --dataset cifar100 | imagefolder | synthetic). DARTS flag names; "
                                   "hyphenated aliases are accepted. Several processes: torchrun "
                                   "--nproc_per_node N -m milenas_fast search ..., or --nproc N.")
    add_dataclass_flags(p, SearchConfig)
    distributed.add_nproc_flag(p)


def run(args, argv) -> int:
    from ..search.loop import run as run_search

    def body() -> int:
        cfg = SearchConfig.from_args(args)
        run_dir = run_search(cfg, explicit_flags(argv[1:], SearchConfig))
        if not cfg.quiet and distributed.is_main():
            print(f"done: {run_dir}")
        return 0
    return distributed.run_command("search", args, argv, body)
