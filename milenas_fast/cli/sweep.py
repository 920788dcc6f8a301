"""`milenas-fast sweep --seeds 1,2,3,4 [search flags]`: one search per seed, the seeds compared, the best
genotype selected (milenas_fast/sweep.py)."""
from __future__ import annotations

from ..config import SearchConfig, add_dataclass_flags, explicit_flags

from ..errors import ConfigError


def add_parser(sub) -> None:
    # "resolve": the sweep's own --save/--save_dir/--resume/--seed replace the search flags of those names
    p = sub.add_parser("sweep", conflict_handler="resolve", help="one search per seed, then select the best genotype",
                       description="The paper's protocol: one `milenas-fast search` per seed (in parallel, one per "
                                   "GPU, when several are visible), a table and plot of the seeds, and the genotype "
                                   "with the best search validation accuracy written to SWEEP/genotype.json. Takes "
                                   "every search flag.")
    add_dataclass_flags(p, SearchConfig)
    p.add_argument("--seeds", default=None, metavar="S1,S2,...", help="comma-separated seeds, one search each")
    p.add_argument("--seed", default=None, help="not accepted: use --seeds")
    p.add_argument("--save", default="EXP", metavar="S", help="the sweep folder is sweep-<save>-<YYYYmmdd-HHMMSS>")
    p.add_argument("--save_dir", "--save-dir", dest="save_dir", default="", metavar="S",
                   help="exact sweep folder (overrides --save; must be empty or new)")
    p.add_argument("--resume", default="", metavar="SWEEP_DIR",
                   help="continue a sweep: finished seeds are skipped, the others resumed or restarted")


def run(args, argv) -> int:
    from .. import sweep

    if args.seed is not None:
        raise ConfigError("a sweep takes --seeds S1,S2,... instead of --seed")
    seeds = sweep.parse_seeds(args.seeds) if args.seeds is not None else None
    typed = {k: v for k, v in explicit_flags(argv[1:], SearchConfig).items() if k not in sweep.OWN_FLAGS}
    if args.resume:
        sweep_dir, seeds, flags, lock = sweep.resume_sweep(args.resume, seeds, typed)
    elif seeds is None:
        raise ConfigError("--seeds S1,S2,... is required (or --resume SWEEP_DIR)")
    else:
        (sweep_dir, lock), flags = sweep.new_sweep(seeds, typed, args.save, args.save_dir), typed
    with lock:  # one sweep at a time in its folder, for as long as it runs
        try:
            return sweep.run(sweep_dir, seeds, flags)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"continue with --resume {sweep_dir}") from None
