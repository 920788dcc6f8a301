"""`milenas-fast plot RUN_DIR`: cell diagrams, α heatmaps and the model-size trajectory of a run."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's cells, α heatmaps and (n, r) trajectory",
                       description="PNG and SVG pictures of a search or eval run folder, written to RUN_DIR/plots.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a search-… or eval-… run folder")
    p.add_argument("--out", default="", help="write the pictures here instead of RUN_DIR/plots")
    p.add_argument("--engine", default="auto", choices=("auto", "dot", "matplotlib"),
                   help="cell diagrams: graphviz dot when installed (auto), or the matplotlib layout")


def run(args, argv) -> int:
    from ..plot import plot_run

    for path in plot_run(args.run_dir, args.out or None, args.engine):
        print(path)
    return 0
