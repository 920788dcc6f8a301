"""`milenas-fast search`: the MiLeNAS search (flags generated from SearchConfig)."""
from __future__ import annotations

from ..config import SearchConfig, add_dataclass_flags, explicit_flags


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="run the architecture search",
                       description="MiLeNAS search on CIFAR-10 (or --dataset synthetic). DARTS flag names; "
                                   "hyphenated aliases are accepted.")
    add_dataclass_flags(p, SearchConfig)


def run(args, argv) -> int:
    from ..search.loop import run as run_search

    cfg = SearchConfig.from_args(args)
    run_dir = run_search(cfg, explicit_flags(argv[1:], SearchConfig))
    if not cfg.quiet:
        print(f"done: {run_dir}")
    return 0
