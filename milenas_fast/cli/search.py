"""`milenas-fast search`: the MiLeNAS search (flags generated from SearchConfig)."""
from __future__ import annotations

import argparse

from ..config import SearchConfig, add_dataclass_flags


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="run the architecture search",
                       description="MiLeNAS search on CIFAR-10 (or --dataset synthetic). DARTS flag names; "
                                   "hyphenated aliases are accepted.")
    add_dataclass_flags(p, SearchConfig)


def explicit_flags(argv: list[str]) -> dict:
    """The flags the user actually typed (for --resume consistency checks)."""
    p = argparse.ArgumentParser(add_help=False)
    add_dataclass_flags(p, SearchConfig, explicit_only=True)
    ns, _ = p.parse_known_args(argv)
    return vars(ns)


def run(args, argv) -> int:
    from ..search.loop import run as run_search

    names = SearchConfig.__dataclass_fields__
    cfg = SearchConfig(**{k: getattr(args, k) for k in names})
    run_dir = run_search(cfg, explicit_flags(argv[1:]))
    if not cfg.quiet:
        print(f"done: {run_dir}")
    return 0
