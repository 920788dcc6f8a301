"""Pictures of a run: the normal and reduction cells, softmaxed α as heatmaps (final epoch and over
epochs), and the (n, r) conv-count trajectory with validation accuracy.

Cells are first built as an explicit graph (CellGraph: nodes and op-labelled edges), then rendered with
graphviz's `dot` when that binary exists, else with a pure-matplotlib layered layout. matplotlib is used
through Figure objects only (no pyplot), so callers' backends and global state are left alone.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .space import genotype as gt
from .space.primitives import PRIMITIVES

FORMATS = ("png", "svg")
OP_COLOURS = {
    "none": "#bbbbbb", "max_pool_3x3": "#1f77b4", "avg_pool_3x3": "#17becf", "skip_connect": "#7f7f7f",
    "sep_conv_3x3": "#d62728", "sep_conv_5x5": "#ff7f0e", "dil_conv_3x3": "#2ca02c", "dil_conv_5x5": "#9467bd",
}


@dataclass
class CellGraph:
    """One cell as a DAG. Nodes: 'c_{k-2}', 'c_{k-1}', '0'..'steps-1', 'c_{k}'. Edges (src, dst, op): op is
    the primitive on that edge, or '' for the concatenation into the output."""
    name: str
    nodes: list[str] = field(default_factory=list)
    edges: list[tuple[str, str, str]] = field(default_factory=list)

    def op_edges(self) -> list[tuple[str, str, str]]:
        return [e for e in self.edges if e[2]]


INPUTS = ("c_{k-2}", "c_{k-1}")
OUTPUT = "c_{k}"


def cell_graph(cell: list[tuple[str, int]], concat, name: str) -> CellGraph:
    steps = len(cell) // 2
    g = CellGraph(name, nodes=[*INPUTS, *map(str, range(steps)), OUTPUT])
    state_names = [*INPUTS, *map(str, range(steps))]
    for k, (op, j) in enumerate(cell):
        g.edges.append((state_names[j], str(k // 2), op))
    for i in concat:
        g.edges.append((state_names[i], OUTPUT, ""))
    return g


def genotype_graphs(g: gt.Genotype) -> dict[str, CellGraph]:
    return {"normal": cell_graph(g.normal, g.normal_concat, "normal"),
            "reduction": cell_graph(g.reduce, g.reduce_concat, "reduction")}


# --- rendering cells ---------------------------------------------------------------------------------
def dot_source(graph: CellGraph) -> str:
    def q(s):
        return '"' + s.replace('"', r"\"") + '"'

    lines = [f"digraph {q(graph.name)} {{", "  rankdir=LR;",
             '  node [style="rounded,filled", shape=rect, fontname=helvetica, penwidth=2, fontsize=20];',
             '  edge [fontname=helvetica, fontsize=16];']
    for n in graph.nodes:
        colour = "darkseagreen2" if n in INPUTS else "palegoldenrod" if n == OUTPUT else "lightblue"
        lines.append(f"  {q(n)} [fillcolor={colour}];")
    for src, dst, op in graph.edges:
        attrs = f'label={q(op)}, color="{OP_COLOURS.get(op, "#555555")}"' if op else 'color="gray"'
        lines.append(f"  {q(src)} -> {q(dst)} [{attrs}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _render_dot(graph: CellGraph, stem: Path) -> list[Path]:
    dot = shutil.which("dot")
    out = []
    src = dot_source(graph)
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=src.encode(), check=True, capture_output=True,
                       timeout=60)
        out.append(path)
    return out


def layout(graph: CellGraph) -> dict[str, tuple[float, float]]:
    """Arc diagram: every state on one line in topological order (c_{k-2}, c_{k-1}, 0..steps-1, c_{k}).
    Op edges arc above the line, concatenation edges below, so no edge runs through a node and an
    edge's label sits alone at its apex (apex height grows with the span)."""
    return {n: (float(i), 0.0) for i, n in enumerate(graph.nodes)}


def new_figure(w: float, h: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout=layout)


def save_figure(fig, stem: Path) -> list[Path]:
    import matplotlib

    out = []
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, smaller
            fig.savefig(path, format=fmt, dpi=110)
        out.append(path)
    return out


ARC = 0.55  # matplotlib arc3 `rad`: the control point sits rad·span off the chord; the apex half that
ARC_CONCAT = 0.3


def _bezier_apex(p0, p1, rad):
    """The point at t=½ of matplotlib's arc3 curve from p0 to p1."""
    (x0, y0), (x1, y1) = p0, p1
    cx, cy = (x0 + x1) / 2 + rad * (y1 - y0), (y0 + y1) / 2 - rad * (x1 - x0)
    return 0.25 * x0 + 0.5 * cx + 0.25 * x1, 0.25 * y0 + 0.5 * cy + 0.25 * y1


def _render_matplotlib(graph: CellGraph, stem: Path) -> list[Path]:
    from matplotlib.patches import FancyArrowPatch

    pos = layout(graph)
    span = len(graph.nodes) - 1
    # arc3 bends in display space: equal aspect keeps the arcs where _bezier_apex puts their labels.
    above = max((pos[d][0] - pos[s][0] for s, d, op in graph.edges if op), default=1.0)
    below = max((pos[d][0] - pos[s][0] for s, d, op in graph.edges if not op), default=1.0)
    top, bottom = ARC * above / 2 + 0.4, ARC_CONCAT * below / 2 + 0.4
    fig = new_figure(1.6 * (span + 1.2), 1.6 * (top + bottom) + 0.5, layout=None)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.6 * (top + bottom) / (1.6 * (top + bottom) + 0.5)))
    ax.set_aspect("equal")
    ax.set_axis_off()
    fig.suptitle(f"{graph.name} cell", y=0.98)
    seen = set()
    for src, dst, op in graph.edges:
        p0, p1 = pos[src], pos[dst]
        # Ops arc above the line (negative rad bends a left-to-right chord upwards), the concat below.
        # A repeated (src, dst) pair (hand-written genotypes) goes below so the two labels do not collide.
        up = bool(op) and (src, dst) not in seen
        seen.add((src, dst))
        rad = -ARC if up else (ARC if op else ARC_CONCAT)
        colour = OP_COLOURS.get(op, "#999999") if op else "#b0b0b0"
        ax.add_patch(FancyArrowPatch(p0, p1, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=14,
                                     color=colour, lw=2.0 if op else 1.0, shrinkA=14, shrinkB=14, zorder=1))
        if op:
            x, y = _bezier_apex(p0, p1, rad)
            ax.text(x, y, op, fontsize=8, ha="center", va="center", color=colour, zorder=3,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.9))
    for n, (x, y) in pos.items():
        colour = "#c1f0c1" if n in INPUTS else "#eee8aa" if n == OUTPUT else "#add8e6"
        label = f"${n}$" if n.startswith("c_") else n  # mathtext: c_{k-2} reads as a subscript, not as source
        ax.text(x, y, label, ha="center", va="center", fontsize=12, zorder=4,
                bbox=dict(boxstyle="round,pad=0.4", fc=colour, ec="black"))
    ax.set_xlim(-0.6, span + 0.6)
    ax.set_ylim(-max(bottom, ARC * above / 2 + 0.4 if len(seen) < len(graph.edges) else 0), top)
    return save_figure(fig, stem)


def render_cell(graph: CellGraph, stem: Path, engine: str = "auto") -> list[Path]:
    """PNG and SVG of one cell at `stem`.{png,svg}. engine: auto (dot if installed) | dot | matplotlib."""
    if engine == "dot" and not shutil.which("dot"):
        raise ConfigError("--engine dot: graphviz's `dot` is not on PATH (install graphviz, or use --engine auto)")
    if engine == "dot" or (engine == "auto" and shutil.which("dot")):
        try:
            return _render_dot(graph, stem)
        except (OSError, subprocess.SubprocessError, TypeError):
            if engine == "dot":
                raise
    return _render_matplotlib(graph, stem)


# --- α and the trajectory ----------------------------------------------------------------------------
def edge_labels(steps: int = 4) -> list[str]:
    names = ["k-2", "k-1"] + [str(i) for i in range(steps)]
    return [f"{names[j]}→{i}" for i in range(steps) for j in range(2 + i)]


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "genotypes.jsonl"
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise gt.GenotypeError(f"{path}: line {n} is not JSON ({e.msg})") from None
    return rows


UNIFORM = 1.0 / len(PRIMITIVES)  # every softmax(α) row starts here
DEVIATION_LABEL = f"softmax(α) − 1/{len(PRIMITIVES)} (0 = uniform)"


def deviation_range(entries: list[dict]) -> float:
    """The colour scale's half-width: the largest distance from uniform in what is drawn. A fixed 0–0.25 scale
    painted an early epoch (every weight 0.12–0.13) one flat colour; this one shows its differences too."""
    dev = max(abs(v - UNIFORM) for e in entries for key in ("alphas_normal", "alphas_reduce")
              for row in e[key] for v in row)
    return max(dev, 1e-4)


def _heat(ax, weights, title: str, span: float, labels: bool = True):
    """softmax(α) as its deviation from uniform on a diverging scale: red gains, blue loses."""
    dev = [[v - UNIFORM for v in row] for row in weights]
    im = ax.imshow(dev, vmin=-span, vmax=span, cmap="RdBu_r", aspect="auto")
    ax.set_title(title, fontsize=9)
    if labels:
        ax.set_xticks(range(len(PRIMITIVES)), PRIMITIVES, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(weights)), edge_labels(), fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return im


def alphas_figure(entry: dict):
    """One epoch's softmax(α) of both cells; each edge's strongest op is labelled with its weight (labelling
    all 224 would be unreadable, and early on they all read 0.12–0.13)."""
    span = deviation_range([entry])
    fig = new_figure(9, 5.5)
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ("alphas_normal", "alphas_reduce"), ("normal", "reduction")):
        im = _heat(ax, entry[key], f"{name} cell, epoch {entry['epoch']}", span)
        for i, row in enumerate(entry[key]):
            k = max(range(len(row)), key=row.__getitem__)
            strong = abs(row[k] - UNIFORM) > 0.6 * span  # dark cell: white text
            ax.text(k, i, f"{row[k]:.3f}", ha="center", va="center", fontsize=6,
                    color="white" if strong else "black")
    fig.colorbar(im, ax=axes, shrink=0.8, label=DEVIATION_LABEL + "; labels: each edge's largest weight")
    return fig


def plot_alphas(entry: dict, stem: Path) -> list[Path]:
    return save_figure(alphas_figure(entry), stem)


def plot_alpha_epochs(history: list[dict], stem: Path, max_panels: int = 12) -> list[Path]:
    """Small multiples of softmax(α) at up to `max_panels` evenly spaced epochs (always the first and last)."""
    n = len(history)
    picks = sorted({round(i * (n - 1) / max(1, min(n, max_panels) - 1)) for i in range(min(n, max_panels))})
    span = deviation_range([history[i] for i in picks])  # one scale for every panel: epochs compare
    fig = new_figure(1.2 * len(picks) + 2.0, 5)
    axes = fig.subplots(2, len(picks), squeeze=False)
    for col, idx in enumerate(picks):
        e = history[idx]
        for row, key in enumerate(("alphas_normal", "alphas_reduce")):
            ax = axes[row][col]
            im = _heat(ax, e[key], f"ep {e['epoch']}" if row == 0 else "", span, labels=False)
            if col == 0:
                ax.set_ylabel("normal" if row == 0 else "reduction")
    fig.colorbar(im, ax=axes, shrink=0.8, label=DEVIATION_LABEL)
    return save_figure(fig, stem)


def plot_trajectory(history: list[dict], stem: Path) -> list[Path]:
    from matplotlib.ticker import MaxNLocator

    epochs = [e["epoch"] for e in history]
    fig = new_figure(8, 4)
    ax = fig.add_subplot()
    ax.plot(epochs, [e["n"] for e in history], "o-", ms=3, label="n (normal-cell convs)", color="#d62728")
    ax.plot(epochs, [e["r"] for e in history], "s-", ms=3, label="r (reduction-cell convs)", color="#1f77b4")
    ax.set_xlabel("epoch")
    # whole epochs only: a one-epoch run's axis read −0.04 … 0.04
    if len(epochs) <= 12:
        ax.set_xticks(epochs)
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("selected conv ops")
    ax.set_ylim(-0.5, 8.5)
    ax2 = ax.twinx()
    ax2.plot(epochs, [e["valid_acc"] for e in history], color="black", marker=".", label="valid acc")
    ax2.set_ylabel("validation accuracy (%)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title("model size (n, r) and validation accuracy per epoch")
    return save_figure(fig, stem)


# --- a run folder ------------------------------------------------------------------------------------
def run_genotype(run_dir: Path, history: list[dict]) -> gt.Genotype:
    """The run's final genotype (genotype.json / genotype.txt), else the last recorded epoch's."""
    for name in ("genotype.json", "genotype.txt"):
        if (run_dir / name).is_file():
            return gt.from_text((run_dir / name).read_text(), where=str(run_dir / name))
    if history:
        return gt.from_text(history[-1]["genotype"], where=f"{run_dir / 'genotypes.jsonl'} (last epoch)")
    raise gt.GenotypeError(f"{run_dir}: no genotype.json, genotype.txt or genotypes.jsonl (not a run folder?)")


def plot_run(run_dir, out_dir=None, engine: str = "auto") -> list[Path]:
    """Every picture the run folder allows, written to RUN_DIR/plots (or out_dir); returns their paths.
    Search runs: cells, α heatmaps and the (n, r) trajectory. Eval runs: cells only."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise gt.GenotypeError(f"{run_dir}: not a folder")
    history = read_history(run_dir)
    g = run_genotype(run_dir, history)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, graph in genotype_graphs(g).items():
        paths += render_cell(graph, out / name, engine)
    if history:
        paths += plot_alphas(history[-1], out / "alphas")
        paths += plot_alpha_epochs(history, out / "alphas_epochs")
        paths += plot_trajectory(history, out / "model_size")
    return paths
