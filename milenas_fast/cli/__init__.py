"""`milenas-fast <command>`: one module per command, each adding its own subparser."""
from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from ..data import DataError
from ..runs import CheckpointError, RunStopped
from ..space.genotype import GenotypeError
from ..sweep import die_with_sweep
from . import export, info, plot, search, sweep, train

COMMANDS = {"search": search, "train": train, "plot": plot, "info": info, "sweep": sweep, "export": export}
USER_ERRORS = (ConfigError, DataError, CheckpointError, GenotypeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="milenas-fast", description="Fast, faithful MiLeNAS on the DARTS space.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_sweep()  # a seed's search of a sweep ends with the sweep
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args, argv) or 0
    except USER_ERRORS as e:
        print(f"milenas-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"milenas-fast {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # outside a run (a run words its own: runs.one_line_stops)
        where = f": {e.filename}" if e.filename else ""
        print(f"milenas-fast {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a run's carries what is left to continue from
        note = f"; {e}" if str(e) else ""
        print(f"\nmilenas-fast {args.command}: interrupted{note}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
