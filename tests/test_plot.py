"""`milenas-fast plot`: the cell graphs match the genotype; every picture is a real PNG/SVG."""
import json
import shutil

import pytest
import torch

from milenas_fast import plot
from milenas_fast.cli import main
from milenas_fast.space.genotype import conv_counts, derive, to_text
from milenas_fast.space.known_genotypes import DARTS_V2, MILENAS


def test_cell_graph_matches_the_genotype():
    graphs = plot.genotype_graphs(MILENAS)
    states = ["c_{k-2}", "c_{k-1}", "0", "1", "2", "3"]
    for name, cell in (("normal", MILENAS.normal), ("reduction", MILENAS.reduce)):
        g = graphs[name]
        assert g.nodes == states + ["c_{k}"]
        assert g.op_edges() == [(states[j], str(k // 2), op) for k, (op, j) in enumerate(cell)]
        assert [e for e in g.edges if not e[2]] == [(s, "c_{k}", "") for s in ("0", "1", "2", "3")]
    assert ("1", "2", "dil_conv_5x5") in graphs["reduction"].edges  # an edge between intermediate nodes
    src = plot.dot_source(graphs["normal"])
    for a, b, op in graphs["normal"].op_edges():
        assert f'"{a}" -> "{b}" [label="{op}"' in src


def check_picture(path):
    data = path.read_bytes()
    assert len(data) > 5000, path
    if path.suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert path.suffix == ".svg" and b"<svg" in data[:2000] and data.rstrip().endswith(b"</svg>")


def fake_search_run(path, epochs=5):
    """A search run folder as loop.write_run_files leaves it (genotypes.jsonl, genotype.json)."""
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    lines = []
    for epoch in range(epochs):
        a_n, a_r = torch.randn(14, 8, generator=g) * (1 + epoch), torch.randn(14, 8, generator=g) * (1 + epoch)
        geno = derive(a_n, a_r)
        n, r = conv_counts(geno)
        lines.append(json.dumps({
            "epoch": epoch, "genotype": to_text(geno), "n": n, "r": r, "model_size": f"n{n}r{r}",
            "train_acc": 20.0 + epoch, "valid_acc": 18.0 + 2 * epoch,
            "alphas_normal": torch.softmax(a_n, -1).tolist(), "alphas_reduce": torch.softmax(a_r, -1).tolist()}))
    (path / "genotypes.jsonl").write_text("\n".join(lines) + "\n")
    (path / "genotype.txt").write_text(to_text(geno) + "\n")
    return path


def test_plot_search_run(tmp_path):
    run = fake_search_run(tmp_path / "search-x")
    paths = plot.plot_run(run, engine="matplotlib")
    stems = {"normal", "reduction", "alphas", "alphas_epochs", "model_size"}
    assert {p.name for p in paths} == {f"{s}.{f}" for s in stems for f in ("png", "svg")}
    for p in paths:
        assert p.parent == run / "plots"
        check_picture(p)
    svg = (run / "plots" / "normal.svg").read_text()
    normal = json.loads((run / "genotypes.jsonl").read_text().splitlines()[-1])["genotype"]
    for op, _ in eval(normal, {"Genotype": lambda **k: k, "range": range})["normal"]:  # noqa: S307 - own text
        assert op in svg  # the op labels are text in the SVG


def test_plot_eval_run_draws_cells_only(tmp_path, capsys):
    run = tmp_path / "eval-x"
    run.mkdir()
    (run / "genotype.txt").write_text(to_text(DARTS_V2) + "\n")
    assert main(["plot", str(run), "--engine", "matplotlib", "--out", str(tmp_path / "pics")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[1] for p in printed) == ["normal.png", "normal.svg", "reduction.png",
                                                           "reduction.svg"]
    for p in (tmp_path / "pics").iterdir():
        check_picture(p)


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` not installed")
def test_plot_with_graphviz(tmp_path):
    for p in plot.render_cell(plot.genotype_graphs(MILENAS)["normal"], tmp_path / "normal", engine="dot"):
        check_picture(p)


def test_plot_bad_input(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no genotype.json" in capsys.readouterr().err
    if shutil.which("dot") is None:
        (tmp_path / "empty" / "genotype.txt").write_text(to_text(MILENAS))
        assert main(["plot", str(tmp_path / "empty"), "--engine", "dot"]) == 2
        assert "dot" in capsys.readouterr().err


def test_an_early_epochs_alphas_are_not_one_flat_colour():
    """After one epoch every weight is 0.12–0.13: the scale fits them, centred on uniform, and says so."""
    g = torch.Generator().manual_seed(1)
    entry = {"epoch": 0, "alphas_normal": torch.softmax(torch.randn(14, 8, generator=g) * 0.02, -1).tolist(),
             "alphas_reduce": torch.softmax(torch.randn(14, 8, generator=g) * 0.01, -1).tolist()}
    fig = plot.alphas_figure(entry)
    image = fig.axes[0].images[0]
    low, high = image.get_clim()
    assert low == -high and high == pytest.approx(plot.deviation_range([entry])) and high < 0.01
    assert "uniform" in fig.axes[-1].get_ylabel()  # the colour bar
