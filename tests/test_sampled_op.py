"""HardSampledMixedOp against its reference twin, MixedOp given the same hard one-hot row: output, gradients
(input, weights row, candidate parameters), the straight-through α gradient, and that only one candidate
runs."""
import pytest
import torch

from milenas_fast import HardSampledMixedOp
from milenas_fast.search.sampler import hard_gumbel
from milenas_fast.space.mixed_op import ReferenceMixedOp
from milenas_fast.space.primitives import PRIMITIVES

pytestmark = pytest.mark.numerics  # CI reruns them under 2 threads and each CPU kernel set

C = 6  # odd spatial sizes below; C even for FactorizedReduce


def _twins(stride, device):
    torch.manual_seed(stride)
    ref = ReferenceMixedOp(C, stride).to(device)
    hard = HardSampledMixedOp(C, stride).to(device)
    hard.load_state_dict(ref.state_dict())
    return ref, hard


def _one_hot_row(k, device, tau=2.0):
    """A straight-through one-hot row drawn by the sampler's hard_gumbel that selects k, with its logits
    (the same ones on every call with the same k)."""
    logits = torch.randn(len(PRIMITIVES), generator=torch.Generator().manual_seed(k)).to(device).requires_grad_()
    for seed in range(1000):  # the first noise draw that picks k
        row, index = hard_gumbel(logits, tau, torch.Generator(device).manual_seed(seed))
        if int(index) == k:
            return logits, row
    raise AssertionError("no draw picked k")


def test_same_state_dict_keys_as_mixed_op():
    for stride in (1, 2):
        ref, hard = _twins(stride, "cpu")
        assert list(ref.state_dict()) == list(hard.state_dict())
        assert hard.decision.impl == "reference"


@pytest.mark.gpu_path
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [0, 3, 4, 7])  # none, skip (FactorizedReduce at stride 2), sep 3×3, dil 5×5
@pytest.mark.parametrize("with_index", [True, False])
def test_forward_and_gradients_equal_mixed_op_with_the_one_hot_row(device, stride, k, with_index):
    ref, hard = _twins(stride, device)
    x = torch.randn(3, C, 9, 7, device=device)
    g = torch.randn(3, C, 9 // stride + 9 % stride, 7 // stride + 7 % stride, device=device)  # upstream gradient
    outs = {}
    for name, op in (("ref", ref), ("hard", hard)):
        logits, row = _one_hot_row(k, device)
        xi = x.clone().requires_grad_()
        row.retain_grad()
        out = op(xi, row, k) if (name == "hard" and with_index) else op(xi, row)
        out.backward(g)
        outs[name] = (out, xi.grad, row.grad, logits.grad,
                      {n: p.grad for n, p in op.named_parameters()})
    (o_r, gx_r, gw_r, gl_r, gp_r), (o_h, gx_h, gw_h, gl_h, gp_h) = outs["ref"], outs["hard"]
    torch.testing.assert_close(o_h, o_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_h, gx_r, rtol=1e-5, atol=1e-6)
    # the weights row: MixedOp's gradient on the sampled entry, none on the others (their ops never ran)
    expected = torch.zeros_like(gw_r)
    expected[k] = gw_r[k]
    torch.testing.assert_close(gw_h, expected, rtol=1e-5, atol=1e-6)
    if PRIMITIVES[k] != "none":
        assert gw_h[k].abs() > 0
    # straight-through: that one entry's gradient reaches every logit through the softmax
    logits, row = _one_hot_row(k, device)
    soft = row - row.detach()  # the differentiable part: softmax((logits + G) / τ) minus its value
    ref_logits_grad, = torch.autograd.grad(soft, logits, expected)
    torch.testing.assert_close(gl_h, ref_logits_grad, rtol=1e-5, atol=1e-9)
    assert gl_h.ne(0).all() == (PRIMITIVES[k] != "none")
    for n, p in gp_h.items():
        if n.startswith(f"_ops.{k}."):
            torch.testing.assert_close(p, gp_r[n], rtol=1e-5, atol=1e-6)
        else:
            assert p is None and not gp_r[n].abs().any(), n  # MixedOp gives it exact zeros (weight 0)


@pytest.mark.gpu_path
@pytest.mark.parametrize("with_index", [True, False])
def test_only_the_sampled_candidate_runs(with_index):
    _, hard = _twins(2, "cpu")
    calls = []
    for i, op in enumerate(hard._ops):
        op.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    x = torch.randn(2, C, 7, 7)
    for k in (5, 1, 0):
        calls.clear()
        _, row = _one_hot_row(k, "cpu")
        out = hard(x, row, k) if with_index else hard(x, row)
        assert calls == [k]
        assert out.shape == (2, C, 4, 4)


@pytest.mark.gpu_path
def test_autocast_output_matches_mixed_op():
    ref, hard = _twins(1, "cpu")
    x = torch.randn(2, C, 7, 7)
    _, row = _one_hot_row(4, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x, row), hard(x, row, 4)
    # the candidate's own dtype (MixedOp's sum is fp32: skip_connect passes the fp32 input through)
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float())
