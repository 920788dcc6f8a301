"""What `search` and `train` share: flags generated from a settings class, and the run under one process,
torchrun or `--nproc N`."""
from __future__ import annotations

from .. import distributed
from ..config import add_dataclass_flags, explicit_flags


def add_settings_parser(sub, name: str, settings, help: str, description: str) -> None:
    p = sub.add_parser(name, help=help, description=description)
    add_dataclass_flags(p, settings)
    distributed.add_nproc_flag(p)


def run_settings(name: str, settings, runner, args, argv) -> int:
    """`runner(cfg, explicit_flags)` (the loop's run) on every rank; rank 0 prints the run folder."""
    def body() -> int:
        cfg = settings.from_args(args)
        run_dir = runner(cfg, explicit_flags(argv[1:], settings))
        if not cfg.quiet and distributed.is_main():
            print(f"done: {run_dir}")
        return 0
    return distributed.run_command(name, args, argv, body)
