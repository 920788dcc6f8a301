"""The DARTS evaluation network: parameter counts, drop path, auxiliary head, eval-cell layout."""
import pytest
import torch
import torch.nn as nn

from milenas_fast.errors import ConfigError
from milenas_fast.space import evalnet
from milenas_fast.space.evalnet import NetworkCIFAR, param_count
from milenas_fast.space.genotype import GenotypeError, conv_counts, from_text, to_text
from milenas_fast.space.known_genotypes import DARTS_V1, DARTS_V2, KNOWN, MILENAS, by_name
from milenas_fast.space.primitives import Identity

# C=36, 20 cells, 10 classes, auxiliary head excluded (DARTS `param size`); DARTS' own log prints 3.349342MB.
PARAMS = {"DARTS_V2": 3_349_342, "MILENAS": 3_874_222, "DARTS_V1": 3_169_414}
AUX_PARAMS_AT_36 = 476_426


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_exact_parameter_counts(name):
    model = NetworkCIFAR(36, 10, 20, True, KNOWN[name])
    assert param_count(model) == PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name] + AUX_PARAMS_AT_36
    assert f"{param_count(model) / 1e6:f}" == {"DARTS_V2": "3.349342", "MILENAS": "3.874222",
                                               "DARTS_V1": "3.169414"}[name]


def test_known_genotypes():
    assert conv_counts(MILENAS) == (7, 3)  # the paper's n7r3
    assert KNOWN["DARTS"] is DARTS_V2
    assert by_name("milenas") is MILENAS
    for g in (DARTS_V1, DARTS_V2, MILENAS):
        assert from_text(to_text(g)) == g
    with pytest.raises(ConfigError, match="DARTS_V1, DARTS_V2, DARTS, MILENAS"):
        by_name("ENAS")


def tiny(genotype=MILENAS, auxiliary=True):
    torch.manual_seed(0)
    return NetworkCIFAR(4, 10, 3, auxiliary, genotype)


def test_eval_cells_affine_bn_and_no_bn_after_pools():
    model = tiny()
    assert all(m.affine for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    reduce_cell = model.cells[1]
    assert reduce_cell.reduction
    pools = [op for op in reduce_cell._ops if isinstance(op, (nn.MaxPool2d, nn.AvgPool2d))]
    assert len(pools) == 2  # bare pools, not Sequential(pool, BN)
    assert [type(op).__name__ for op in reduce_cell._ops].count("FactorizedReduce") == 0  # skips read node 0
    assert isinstance(model.cells[0]._ops[4], Identity)  # ('skip_connect', 0) in a normal cell


def test_forward_shapes_and_auxiliary_only_in_training():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    model.train()
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 10)
    model.eval()
    logits, aux = model(x)
    assert logits.shape == (2, 10) and aux is None
    logits, aux = tiny(auxiliary=False).train()(x)
    assert aux is None


def test_drop_path_skips_identity_ops(monkeypatch):
    model = tiny(DARTS_V2).train()
    calls = []
    real = evalnet.drop_path
    monkeypatch.setattr(evalnet, "drop_path", lambda x, p: calls.append(p) or real(x, p))
    model.drop_path_prob = 0.3
    model(torch.randn(2, 3, 32, 32))
    expected = sum(not isinstance(op, Identity) for cell in model.cells for op in cell._ops)
    identities = sum(isinstance(op, Identity) for cell in model.cells for op in cell._ops)
    assert identities > 0 and len(calls) == expected and set(calls) == {0.3}
    calls.clear()
    model.eval()(torch.randn(2, 3, 32, 32))
    model.train().drop_path_prob = 0.0
    model(torch.randn(2, 3, 32, 32))
    assert calls == []


def test_drop_path_identity_edge_is_untouched():
    """A node fed by two identities passes its inputs through exactly, whatever the drop probability."""
    g = from_text("Genotype(normal=[('skip_connect', 0), ('skip_connect', 1), ('sep_conv_3x3', 0), "
                  "('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
                  "('sep_conv_3x3', 1)], normal_concat=[2], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), "
                  "('max_pool_3x3', 0), ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('max_pool_3x3', 1), "
                  "('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=range(2, 6))")
    cell = NetworkCIFAR(4, 10, 3, False, g).cells[0].train()
    s0, s1 = torch.randn(4, 12, 8, 8), torch.randn(4, 12, 8, 8)
    with torch.no_grad():
        expected = cell.preprocess0(s0) + cell.preprocess1(s1)
        torch.manual_seed(1)
        out = cell(s0, s1, drop_prob=0.9)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_drop_path_scales_survivors():
    torch.manual_seed(0)
    y = evalnet.drop_path(torch.ones(4000, 1, 2, 2), 0.25)
    values = y.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(4 / 3)
    assert abs((y[:, 0, 0, 0] > 0).float().mean().item() - 0.75) < 0.03


def test_bad_concat_is_a_genotype_error():
    bad = MILENAS._replace(normal_concat=range(2, 7))
    with pytest.raises(GenotypeError, match="normal_concat .* state"):
        NetworkCIFAR(4, 10, 3, False, bad)
