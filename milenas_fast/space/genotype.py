"""Genotype: deriving an architecture from α, conv counts, and text/JSON round trips.

The printed form is the one DARTS users paste into code:
    Genotype(normal=[('sep_conv_3x3', 1), ...], normal_concat=range(2, 6), reduce=[...], reduce_concat=range(2, 6))
"""
from __future__ import annotations

import ast
import json
from collections import namedtuple
from pathlib import Path

import torch

from .primitives import CONV_PRIMITIVES, PRIMITIVES

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


class GenotypeError(ValueError):
    """A genotype text or file that cannot be understood; the message says what and where."""


def parse_cell(weights: torch.Tensor, steps: int = 4, primitives=PRIMITIVES) -> list[tuple[str, int]]:
    """Top-2 rule: per node keep the two incoming edges with the largest non-`none` weight; on each,
    the op is the argmax over non-`none` ops. Ties go to the lower index (edge and op alike)."""
    W = weights.detach().float().cpu().tolist()
    none = primitives.index("none") if "none" in primitives else -1
    ops = [k for k in range(len(primitives)) if k != none]
    gene, start, n = [], 0, 2
    for _ in range(steps):
        rows = W[start:start + n]
        best = [max(rows[j][k] for k in ops) for j in range(n)]
        edges = sorted(range(n), key=lambda j: -best[j])[:2]  # stable sort: lower index wins ties
        for j in edges:
            k_best = ops[0]
            for k in ops:
                if rows[j][k] > rows[j][k_best]:
                    k_best = k
            gene.append((primitives[k_best], j))
        start += n
        n += 1
    return gene


def derive(alphas_normal: torch.Tensor, alphas_reduce: torch.Tensor, steps: int = 4, multiplier: int = 4,
           primitives=PRIMITIVES) -> Genotype:
    concat = range(2 + steps - multiplier, steps + 2)
    return Genotype(
        normal=parse_cell(torch.softmax(alphas_normal.float(), dim=-1), steps, primitives),
        normal_concat=concat,
        reduce=parse_cell(torch.softmax(alphas_reduce.float(), dim=-1), steps, primitives),
        reduce_concat=concat,
    )


def conv_count(cell: list[tuple[str, int]]) -> int:
    return sum(op in CONV_PRIMITIVES for op, _ in cell)


def conv_counts(g: Genotype) -> tuple[int, int]:
    """(n, r): selected sep/dil convs in the normal and reduction cell (the paper's model size n?r?)."""
    return conv_count(g.normal), conv_count(g.reduce)


def to_text(g: Genotype) -> str:
    return repr(Genotype(list(map(tuple, g.normal)), g.normal_concat, list(map(tuple, g.reduce)), g.reduce_concat))


def to_dict(g: Genotype) -> dict:
    return {
        "normal": [[op, int(i)] for op, i in g.normal],
        "normal_concat": list(g.normal_concat),
        "reduce": [[op, int(i)] for op, i in g.reduce],
        "reduce_concat": list(g.reduce_concat),
    }


# No cell has more states than this; a concat is bounded by it before a range(...) is expanded.
MAX_CONCAT = 64


def quote(value, items: int = 8) -> str:
    """`value` for an error line, at most `items` items of a sequence: a huge one must not make a huge line."""
    if isinstance(value, (list, tuple)) and len(value) > items:
        return f"[{', '.join(map(repr, value[:items]))}, ... ({len(value)} items)]"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _as_concat(value, field: str, where: str):
    if not isinstance(value, (list, tuple, range)) or not 0 < len(value) <= MAX_CONCAT:
        raise GenotypeError(f"{where}: {field} must be a non-empty list of at most {MAX_CONCAT} node indices, "
                            f"got {quote(value)}")
    values = list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise GenotypeError(f"{where}: {field} must be a list of node indices, got {quote(value)}")
    # Keep the pasteable range(...) form when the indices are contiguous.
    if values == list(range(values[0], values[-1] + 1)):
        return range(values[0], values[-1] + 1)
    return values


def _as_cell(value, field: str, where: str) -> list[tuple[str, int]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise GenotypeError(f"{where}: {field} must be a non-empty list of (op, input) pairs")
    cell = []
    for pos, item in enumerate(value):
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], int) or isinstance(item[1], bool)):
            raise GenotypeError(f"{where}: {field}[{pos}] must be a pair like ('sep_conv_3x3', 1), got {quote(item)}")
        op, idx = item
        if op not in PRIMITIVES:
            raise GenotypeError(f"{where}: {field}[{pos}] names unknown op {quote(op)}; known: {', '.join(PRIMITIVES)}")
        if not 0 <= idx < 2 + pos // 2:
            raise GenotypeError(f"{where}: {field}[{pos}] reads input {idx}, but node {pos // 2} can only read "
                                f"inputs 0..{1 + pos // 2}")
        cell.append((op, idx))
    if len(cell) % 2:
        raise GenotypeError(f"{where}: {field} must hold two pairs per node, got {len(cell)} pairs")
    return cell


def from_dict(d: dict, where: str = "genotype") -> Genotype:
    if not isinstance(d, dict):
        raise GenotypeError(f"{where}: expected an object with normal/normal_concat/reduce/reduce_concat")
    missing = [k for k in Genotype._fields if k not in d]
    if missing:
        raise GenotypeError(f"{where}: missing field(s) {', '.join(missing)}")
    return Genotype(
        normal=_as_cell(d["normal"], "normal", where),
        normal_concat=_as_concat(d["normal_concat"], "normal_concat", where),
        reduce=_as_cell(d["reduce"], "reduce", where),
        reduce_concat=_as_concat(d["reduce_concat"], "reduce_concat", where),
    )


def _literal(node: ast.AST, where: str):
    """literal_eval plus `range(a, b)`; nothing is executed."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
        args = [_literal(a, where) for a in node.args]
        if node.keywords or not 1 <= len(args) <= 2 or not all(isinstance(a, int) for a in args):
            raise GenotypeError(f"{where}: line {node.lineno} col {node.col_offset}: bad range(...)")
        return range(*args)  # lazy: _as_concat bounds its length before expanding it
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, where) for e in node.elts]
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise GenotypeError(f"{where}: line {node.lineno} col {node.col_offset + 1}: "
                            f"expected a literal, got {quote(ast.unparse(node))}") from None


def from_text(text: str, where: str = "genotype text") -> Genotype:
    """Parse the printed form (`genotype = ` prefix allowed; concat as range(...) or a list) or JSON."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return from_dict(json.loads(text), where)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"{where}: invalid JSON at line {e.lineno} col {e.colno}: {e.msg}") from None
    if text.startswith("genotype") and "=" in text.split("(", 1)[0]:
        text = text.split("=", 1)[1].strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise GenotypeError(f"{where}: syntax error at line {e.lineno} col {e.offset}: {e.msg}") from None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "Genotype"):
        raise GenotypeError(f"{where}: expected Genotype(normal=..., normal_concat=..., reduce=..., reduce_concat=...)")
    if len(tree.args) > len(Genotype._fields):
        raise GenotypeError(f"{where}: too many positional fields")
    fields = dict(zip(Genotype._fields, (_literal(a, where) for a in tree.args)))
    for kw in tree.keywords:
        if kw.arg not in Genotype._fields:
            raise GenotypeError(f"{where}: unknown field {kw.arg!r} (line {kw.value.lineno} col {kw.value.col_offset + 1})")
        fields[kw.arg] = _literal(kw.value, where)
    return from_dict(fields, where)


def load(source: str | Path) -> Genotype:
    """A genotype from printed text, a .json/.txt file, or a search run folder (its genotype.json)."""
    path = Path(source)
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError:  # text too long to be a path
        is_dir = is_file = False
    if is_dir:
        path = path / "genotype.json"
        if not path.is_file():
            raise GenotypeError(f"{source}: no genotype.json in this folder (is it a finished search run folder?)")
        is_file = True
    if is_file:
        return from_text(path.read_text(), where=str(path))
    if "Genotype" in str(source) or str(source).lstrip().startswith("{"):
        return from_text(str(source))
    raise GenotypeError(f"{source}: neither a file, a run folder, nor Genotype(...) text")
