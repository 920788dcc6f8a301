"""Genotype derivation (top-2 rule), conv counts, printed/JSON round trips and error messages."""
import json

import pytest
import torch

from milenas_fast.space import genotype as gt
from milenas_fast.space.primitives import PRIMITIVES

IDX = {p: i for i, p in enumerate(PRIMITIVES)}

MILENAS_TEXT = (
    "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('dil_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 1)], normal_concat=range(2, 6), "
    "reduce=[('dil_conv_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('skip_connect', 2), "
    "('dil_conv_5x5', 3), ('skip_connect', 2), ('max_pool_3x3', 0)], reduce_concat=range(2, 6))"
)


def _alpha_for(cell, strength=5.0):
    """α whose derivation gives `cell` (a list of 8 (op, input) pairs, in rank order per node)."""
    a = torch.zeros(14, 8)
    start = 0
    for node in range(4):
        for rank, (op, j) in enumerate(cell[2 * node: 2 * node + 2]):
            a[start + j, IDX[op]] = strength - rank  # the first of the pair ranks higher
        start += node + 2
    return a


def test_derivation_recovers_hand_built_cells():
    g = gt.from_text(MILENAS_TEXT)
    derived = gt.derive(_alpha_for(g.normal), _alpha_for(g.reduce))
    assert derived == g
    assert gt.conv_counts(derived) == (7, 3)


def test_none_is_ignored_even_when_it_dominates():
    a = torch.zeros(14, 8)
    a[:, IDX["none"]] = 100.0  # none wins every softmax
    a[:, IDX["avg_pool_3x3"]] = 1.0
    a[3, IDX["sep_conv_5x5"]] = 2.0  # node 1, edge from s1
    cell = gt.parse_cell(torch.softmax(a, -1))
    assert all(op != "none" for op, _ in cell)
    assert cell[2] == ("sep_conv_5x5", 1)


def test_ties_go_to_the_lower_index():
    cell = gt.parse_cell(torch.full((14, 8), 1 / 8))
    # every edge ties: per node the first two inputs, and on each the first non-none op
    assert cell == [("max_pool_3x3", 0), ("max_pool_3x3", 1)] * 4


def test_edges_ranked_by_strongest_non_none_op():
    a = torch.zeros(14, 8)
    a[2, IDX["skip_connect"]] = 3.0   # node 1 reads s0 ...
    a[4, IDX["dil_conv_3x3"]] = 4.0   # ... and node 0, which ranks first
    cell = gt.parse_cell(torch.softmax(a, -1))
    assert cell[2:4] == [("dil_conv_3x3", 2), ("skip_connect", 0)]


def test_printed_form_is_pasteable_and_round_trips():
    g = gt.from_text(MILENAS_TEXT)
    text = gt.to_text(g)
    assert text == MILENAS_TEXT
    assert gt.from_text("genotype = " + text) == g
    assert eval(text, {"Genotype": gt.Genotype}) == g  # what users do with it


def test_list_concat_and_json_forms():
    g = gt.from_text(MILENAS_TEXT)
    listed = MILENAS_TEXT.replace("range(2, 6)", "[2, 3, 4, 5]")
    assert gt.from_text(listed) == g
    assert gt.from_text(json.dumps(gt.to_dict(g))) == g
    assert gt.from_dict(gt.to_dict(g)) == g


def test_load_from_file_and_run_folder(tmp_path):
    g = gt.from_text(MILENAS_TEXT)
    (tmp_path / "genotype.json").write_text(json.dumps(gt.to_dict(g)))
    (tmp_path / "g.txt").write_text(MILENAS_TEXT + "\n")
    assert gt.load(tmp_path) == g
    assert gt.load(tmp_path / "g.txt") == g
    assert gt.load(MILENAS_TEXT) == g


@pytest.mark.parametrize("text, fragment", [
    ("Genotype(normal=[('sep_conv_3x3', 1)", "syntax error at line 1"),
    (MILENAS_TEXT.replace("'sep_conv_5x5', 1", "'sep_conv_7x7', 1"), "normal[7] names unknown op 'sep_conv_7x7'"),
    (MILENAS_TEXT.replace("('dil_conv_5x5', 3)", "('dil_conv_5x5', 6)"), "reduce[5] reads input 6"),
    (MILENAS_TEXT.replace("reduce_concat=range(2, 6)", "reduce_concat=os.system('x')"), "expected a literal"),
    ("Genotype(normal=[], normal_concat=range(2, 6))", "missing field(s) reduce, reduce_concat"),
    ('{"normal": [}', "invalid JSON at line 1"),
    ("print(1)", "expected Genotype("),
])
def test_malformed_text_says_what_and_where(text, fragment):
    with pytest.raises(gt.GenotypeError, match=None) as err:
        gt.from_text(text)
    assert fragment in str(err.value)


@pytest.mark.parametrize("concat, fragment", [
    ("range(0, 1000000000)", "got range(0, 1000000000)"),
    (str(list(range(10**5))), "got [0, 1, 2, 3, 4, 5, 6, 7, ... (100000 items)]"),
    ("[]", "must be a non-empty list"),
    ("[2, True]", "must be a list of node indices"),
])
def test_a_bad_concat_is_quoted_short(concat, fragment):
    with pytest.raises(gt.GenotypeError) as err:
        gt.from_text(MILENAS_TEXT.replace("normal_concat=range(2, 6)", f"normal_concat={concat}"))
    assert fragment in str(err.value) and len(str(err.value)) < 300


def test_a_huge_range_is_refused_before_it_is_expanded():
    """range(0, 10**9) used to be expanded into a list before any check (tens of gigabytes)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(gt.GenotypeError, match="at most 64 node indices"):
            gt.from_text(MILENAS_TEXT.replace("range(2, 6)", "range(0, 1000000000)"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10**7
