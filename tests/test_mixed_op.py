"""MixedOp: fused vs reference (outputs, every gradient, BatchNorm running statistics, eval mode), the
DARTS state_dict contract, and the implementation switch (MILENAS_FAST_IMPL / --impl).

Without a GPU the fused path runs the Triton kernels through the interpreter and the C++ CPU ops."""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn as nn

from milenas_fast import MixedOp, Network
from milenas_fast.errors import ConfigError
from milenas_fast.ops import select
from milenas_fast.search.plan import resolve_mixed_op
from milenas_fast.space import mixing_weights, weight_cast
from milenas_fast.space import supernet
from milenas_fast.space.mixed_op import FusedMixedOp, ReferenceMixedOp, set_impl
from milenas_fast.space.primitives import PRIMITIVES

fmo = importlib.import_module("milenas_fast.space.fused_mixed_op")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_tf32():
    # The reference's convolutions must be true fp32 for tight comparisons on Ampere/Hopper.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --- a DARTS-style MixedOp, written independently (plain nn.Conv2d, pools wrapped with their BN) -------

class _Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x.mul(0.0) if self.stride == 1 else x[:, :, ::self.stride, ::self.stride].mul(0.0)


class _FactorizedReduce(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C, C // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C, C // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C, affine=False)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class _Op(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.op = nn.Sequential(*layers)

    def forward(self, x):
        return self.op(x)


def _darts_op(name, C, s):
    def block(k, stride, pad, dil):
        return [nn.ReLU(inplace=False), nn.Conv2d(C, C, k, stride, pad, dilation=dil, groups=C, bias=False),
                nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C, affine=False)]

    return {
        "none": lambda: _Zero(s),
        "max_pool_3x3": lambda: nn.Sequential(nn.MaxPool2d(3, s, 1), nn.BatchNorm2d(C, affine=False)),
        "avg_pool_3x3": lambda: nn.Sequential(nn.AvgPool2d(3, s, 1, count_include_pad=False),
                                              nn.BatchNorm2d(C, affine=False)),
        "skip_connect": lambda: nn.Identity() if s == 1 else _FactorizedReduce(C),
        "sep_conv_3x3": lambda: _Op(*block(3, s, 1, 1), *block(3, 1, 1, 1)),
        "sep_conv_5x5": lambda: _Op(*block(5, s, 2, 1), *block(5, 1, 2, 1)),
        "dil_conv_3x3": lambda: _Op(*block(3, s, 2, 2)),
        "dil_conv_5x5": lambda: _Op(*block(5, s, 4, 2)),
    }[name]()


class DartsMixedOp(nn.Module):
    def __init__(self, C, stride):
        super().__init__()
        self._ops = nn.ModuleList(_darts_op(p, C, stride) for p in PRIMITIVES)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


# --- helpers -----------------------------------------------------------------------------------------

def randomise(module: nn.Module, seed: int) -> None:
    """Non-default parameters and running statistics, so that nothing matches by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(3)


def pair(C, stride, device=DEV, seed=0):
    ref = ReferenceMixedOp(C, stride)
    randomise(ref, seed)
    fused = FusedMixedOp(C, stride)
    fused.load_state_dict(ref.state_dict())
    return ref.to(device), fused.to(device)


def inputs(N, C, H, device=DEV, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, H, generator=g) + 0.2  # off-centre: the ReLU and the pools both matter
    a = torch.softmax(torch.randn(len(PRIMITIVES), generator=g), 0)
    return x.to(device), a.to(device)


def train_step(m, x, a, grad_seed=2):
    x = x.detach().clone().requires_grad_()
    a = a.detach().clone().requires_grad_()
    out = m(x, a)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device)
    out.backward(grad)
    return out.detach(), x.grad, a.grad, {n: p.grad for n, p in m.named_parameters()}


def close(actual, expected, name, rtol=2e-5, atol_rel=2e-5):
    """Tight fp32 rule: elementwise rtol plus an absolute term relative to the largest expected value."""
    assert actual is not None and expected is not None, f"{name}: missing"
    atol = atol_rel * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def compare_train_and_eval(ref, fused, x, a, **tol):
    r, f = train_step(ref, x, a), train_step(fused, x, a)
    close(f[0], r[0], "output", **tol)
    close(f[1], r[1], "grad x", **tol)
    close(f[2], r[2], "grad mixing weights", **tol)
    assert f[2][0] == 0 and r[2][0] == 0  # `none` contributes exact zeros
    assert r[3].keys() == f[3].keys()
    for name in r[3]:
        close(f[3][name], r[3][name], f"grad {name}", **tol)
    rs, fs = ref.state_dict(), fused.state_dict()
    assert rs.keys() == fs.keys()
    for name in rs:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(fs[name], rs[name]), name
        else:
            close(fs[name], rs[name], f"after train step: {name}", **tol)
    assert rs["_ops.1.1.num_batches_tracked"].item() == 4  # the folded BNs did count the batch
    ref.eval(), fused.eval()
    with torch.no_grad():
        close(fused(x, a), ref(x, a), "eval output", **tol)
    ref.train(), fused.train()


# --- fused vs reference under the interpreter (or on the GPU when there is one) -----------------------

@pytest.fixture
def fused_ok(monkeypatch, device):
    """The device (conftest: the GPU when present, else the CPU with the interpreter), fused-capable."""
    monkeypatch.delenv(select.ENV, raising=False)
    problems = select.blockers(device)
    assert not problems, f"fused path cannot run here: {problems}"  # a bug on CI, not a skip
    return device


@pytest.mark.gpu_path
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("H", [7, 9, 16])
@pytest.mark.parametrize("C", [4, 6])
def test_fused_matches_reference(C, H, stride, fused_ok):
    ref, fused = pair(C, stride, fused_ok)
    x, a = inputs(3, C, H, fused_ok)
    compare_train_and_eval(ref, fused, x, a)


@pytest.mark.gpu_path
def test_second_train_step_and_cumulative_momentum(fused_ok):
    """Two steps (the running averages compound) with momentum=None (cumulative average) on every BN."""
    ref, fused = pair(4, 1, fused_ok, seed=3)
    for m in (ref, fused):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None
    for seed in (5, 6):
        x, a = inputs(3, 4, 7, fused_ok, seed=seed)
        r, f = train_step(ref, x, a), train_step(fused, x, a)
        close(f[0], r[0], "output")
    for (name, rb), fb in zip(ref.state_dict().items(), fused.state_dict().values()):
        close(fb.float(), rb.float(), name)


@pytest.mark.gpu_path
def test_alpha_only_backward(fused_ok):
    """α-only passes (torch.autograd.grad wrt the mixing weights) give the reference's gradient."""
    ref, fused = pair(6, 2, fused_ok, seed=4)
    x, a = inputs(3, 6, 9, fused_ok, seed=7)
    grads = []
    for m in (ref, fused):
        aa = a.clone().requires_grad_()
        grads.append(torch.autograd.grad(m(x, aa).square().sum(), aa)[0])
    close(grads[1], grads[0], "α-only grad")


@pytest.mark.gpu_path
@pytest.mark.parametrize("stride", [1, 2])
def test_state_dict_interchange_with_darts(stride, fused_ok):
    C, H = 6, 16  # even H: DARTS's FactorizedReduce slices without padding
    darts = DartsMixedOp(C, stride)
    randomise(darts, 11)
    x, a = inputs(3, C, H, fused_ok, seed=12)
    darts.to(fused_ok)
    for cls in (MixedOp, ReferenceMixedOp, FusedMixedOp):
        ours = cls(C, stride).to(fused_ok)
        ours.load_state_dict(darts.state_dict())  # strict: same keys and shapes
        assert list(ours.state_dict()) == list(darts.state_dict())
        back = DartsMixedOp(C, stride).to(fused_ok)
        back.load_state_dict(ours.state_dict())
        for k, v in back.state_dict().items():
            assert torch.equal(v, darts.state_dict()[k]), k
        with torch.no_grad():
            ours.eval(), back.eval()
            close(ours(x, a), back(x, a), f"{cls.__name__} vs DARTS (eval)")


@pytest.mark.gpu_path
@pytest.mark.slow
def test_network_loss_and_alpha_grad(fused_ok, monkeypatch):
    """A tiny supernet (one normal, two reduction cells, 2 nodes per cell: 15 mixed ops) built with each
    implementation. The interpreter pays ~2.5 s per stencil forward+backward, whatever the shape. The fused
    MixedOps' running statistics are updated by ONE foreach lerp per forward (and equal the reference's)."""
    torch.manual_seed(0)
    kw = dict(C=4, num_classes=10, layers=3, steps=2, multiplier=2)
    ref = Network(**kw, mixed_op=ReferenceMixedOp).to(fused_ok)
    fused = Network(**kw, mixed_op=FusedMixedOp).to(fused_ok)
    fused.load_state_dict(ref.state_dict())
    fused.load_alphas(ref.arch_parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 16, 16, generator=g).to(fused_ok), torch.randint(0, 10, (2,), generator=g).to(fused_ok)
    res = []
    lerps = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: lerps.append(1) or real(*a, **k))
    for net in (ref, fused):
        lerps.clear()
        loss = net._loss(x, y)
        grads = torch.autograd.grad(loss, net.arch_parameters() + list(net.parameters()))
        res.append((loss.detach(), grads))
    assert len(lerps) == 1  # the fused network's forward (the reference's BNs update themselves)
    close(res[1][0], res[0][0], "loss")
    close(res[1][1][0], res[0][1][0], "grad α_normal", rtol=1e-4, atol_rel=1e-4)
    close(res[1][1][1], res[0][1][1], "grad α_reduce", rtol=1e-4, atol_rel=1e-4)
    for i, (gf, gr) in enumerate(zip(res[1][1][2:], res[0][1][2:])):
        close(gf, gr, f"grad weight #{i}", rtol=1e-4, atol_rel=1e-4)
    for (name, rb), fb in zip(ref.state_dict().items(), fused.state_dict().values()):
        close(fb.float(), rb.float(), name, rtol=1e-4, atol_rel=1e-4)


@pytest.mark.slow  # a fused network through the interpreter
@pytest.mark.gpu_path
def test_network_casts_every_fused_weight_at_once_under_autocast(fused_ok, monkeypatch):
    """Under bf16 autocast a supernet forward casts the stride-2 skips' 1×1 weights of all its fused MixedOps by
    one foreach copy (their gradients back by one): loss and every gradient equal per-MixedOp casting bit for
    bit."""
    torch.manual_seed(3)
    net = Network(C=4, num_classes=10, layers=1, steps=2, multiplier=2, mixed_op=FusedMixedOp).to(fused_ok)
    assert len(net._fused_convs()) == 4 * 2  # 4 stride-2 skips, 2 convolutions each
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 3, 8, 8, generator=g).to(fused_ok), torch.randint(0, 10, (2,), generator=g).to(fused_ok)
    copies = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda *a, **k: copies.append(len(a[0])) or real(*a, **k))

    def run():
        copies.clear()
        with torch.autocast(torch.device(fused_ok).type, dtype=torch.bfloat16):
            loss = net._loss(x, y)
        # one reduction cell: α_normal takes no part
        grads = torch.autograd.grad(loss, [net.alphas_reduce] + list(net.parameters()))
        return loss.detach(), grads, list(copies)

    loss, grads, n = run()
    assert n == [8, 8]  # forward, backward
    monkeypatch.setattr(supernet, "cast_once", lambda *args: contextlib.nullcontext())
    want_loss, want_grads, n = run()
    assert n == [2] * 8  # per MixedOp, one each way
    assert torch.equal(loss, want_loss)
    for k, (a, b) in enumerate(zip(grads, want_grads)):
        assert torch.equal(a, b), k


@pytest.mark.gpu_path
def test_darts_list_mixes_a_view_of_the_weights(fused_ok, monkeypatch):
    """Candidates stacked in PRIMITIVES order (`none` left out, the identity in its own row): the mixing
    weights edge_reduce gets are weights[1:] itself, a view, so no gather kernel runs per call."""
    _, fused = pair(4, 1, fused_ok)
    assert fused._fused_index == slice(1, len(PRIMITIVES))
    seen = []
    real = fmo.folded_reduce
    monkeypatch.setattr(fmo, "folded_reduce", lambda ys, w, *rest: seen.append((ys, w)) or real(ys, w, *rest))
    x, a = inputs(2, 4, 5, fused_ok)
    fused(x, a)
    (ys, w), = seen
    assert w._base is a and w.storage_offset() == 1 and w.shape == (len(PRIMITIVES) - 1,)
    assert torch.equal(ys[PRIMITIVES.index("skip_connect") - 1], x)  # the identity's row: x itself


@pytest.mark.gpu_path
@pytest.mark.parametrize("prims,stride,view", [(("max_pool_3x3", "none", "skip_connect", "dil_conv_3x3"), 1, False),
                                               (("skip_connect", "avg_pool_3x3", "none"), 1, True),
                                               (("none", "skip_connect", "dil_conv_5x5"), 2, True)])
def test_primitive_subsets_match_reference(prims, stride, view, fused_ok):
    """Subsets: `none` in the middle (no view possible: a gather index built once), the identity first, a
    stride-2 skip; output, every gradient and the running statistics, train and eval, are the reference's."""
    C, H = 4, 7
    ref = ReferenceMixedOp(C, stride, primitives=prims)
    randomise(ref, 13)
    fused = FusedMixedOp(C, stride, primitives=prims)
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(fused_ok), fused.to(fused_ok)
    assert isinstance(fused._fused_index, slice) == view
    x, _ = inputs(3, C, H, fused_ok, seed=14)
    a = torch.softmax(torch.randn(len(prims), generator=torch.Generator().manual_seed(15)), 0).to(fused_ok)
    r, f = train_step(ref, x, a), train_step(fused, x, a)
    for name, got, want in zip(("output", "grad x", "grad mixing weights"), f[:3], r[:3]):
        close(got, want, name)
    assert f[2][prims.index("none")] == 0
    for name in r[3]:
        close(f[3][name], r[3][name], f"grad {name}")
    for (name, rb), fb in zip(ref.state_dict().items(), fused.state_dict().values()):
        close(fb.float(), rb.float(), name)
    ref.eval(), fused.eval()
    with torch.no_grad():
        close(fused(x, a), ref(x, a), "eval output")


@pytest.mark.gpu_path
@pytest.mark.parametrize("stride", [1, 2])
def test_eval_statistics_are_the_running_ones(stride, fused_ok):
    """Eval mode: each folded row's mean/rstd are its BatchNorm's running mean and 1/sqrt(var + eps), the
    identity's row (stride 1: in the middle) exactly 0 and 1."""
    _, fused = pair(5 if stride == 1 else 6, stride, fused_ok, seed=6)  # FactorizedReduce needs an even C
    fused.eval()
    ks = mixing_weights.order(fused.primitives)
    assert ks == list(range(1, len(PRIMITIVES)))
    bns = [fmo._last_bn(fused.primitives[k], fused._ops[k]) for k in ks]
    identity = [PRIMITIVES.index("skip_connect") - 1] if stride == 1 else []
    assert [r for r, bn in enumerate(bns) if bn is None] == identity
    rows = sum(1 << r for r, bn in enumerate(bns) if bn is not None)
    mean, rstd = fmo._running_stats(fused, bns, rows, 1e-5)
    assert mean.shape == rstd.shape == (len(ks), fused.C) and mean.dtype == rstd.dtype == torch.float32
    for r, bn in enumerate(bns):
        if bn is None:
            assert torch.equal(mean[r], torch.zeros_like(mean[r])) and torch.equal(rstd[r], torch.ones_like(rstd[r]))
        else:
            assert torch.equal(mean[r], bn.running_mean), r
            torch.testing.assert_close(rstd[r], torch.rsqrt(bn.running_var + bn.eps), rtol=1e-6, atol=0)
            assert (rstd[r] != 1).all()


# --- the switch ----------------------------------------------------------------------------------------

def test_auto_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(select.ENV, raising=False)
    d = select.decide(None, "cpu")
    assert d.impl == "reference" and d.ok and d.reasons
    cls, why, kernels = resolve_mixed_op("auto", torch.device("cpu"))
    assert cls is ReferenceMixedOp and "reference" in why
    assert resolve_mixed_op("reference", torch.device("cpu"))[0] is ReferenceMixedOp


def test_fused_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: no fused kernels
    monkeypatch.setenv(select.ENV, "fused")
    m = MixedOp(4, 1)
    with pytest.raises(select.FusedUnavailable, match="TRITON_INTERPRET"):
        m(torch.randn(2, 4, 5, 5), torch.softmax(torch.randn(8), 0))
    with pytest.raises(ConfigError, match="--impl fused"):
        resolve_mixed_op("fused", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_mixed_op("fused", torch.device("cuda"))
    monkeypatch.setenv(select.ENV, "auto")
    MixedOp(4, 1)(torch.randn(2, 4, 5, 5), torch.softmax(torch.randn(8), 0))  # auto falls back quietly


def test_a_primitive_listed_twice_is_not_fused():
    """The stencil has one branch per conv primitive: a list naming one twice takes the reference twin."""
    from milenas_fast.space import fused_mixed_op

    m = ReferenceMixedOp(4, 1, primitives=("sep_conv_3x3", "skip_connect", "sep_conv_3x3"))
    assert fused_mixed_op.unsupported(m) == "primitives listed twice (sep_conv_3x3)"
    assert fused_mixed_op.unsupported(ReferenceMixedOp(4, 1)) == ""


def test_bad_values_raise(monkeypatch):
    monkeypatch.setenv(select.ENV, "fast")
    with pytest.raises(ValueError, match="MILENAS_FAST_IMPL"):
        MixedOp(4, 1)(torch.randn(2, 4, 5, 5), torch.softmax(torch.randn(8), 0))
    with pytest.raises(ConfigError):
        resolve_mixed_op("fast", torch.device("cpu"))


@pytest.mark.gpu_path
def test_env_read_when_built_or_moved(monkeypatch, fused_ok):
    """$MILENAS_FAST_IMPL is read when a MixedOp is built or moved, never per call; set_impl re-pins."""
    calls = []
    real = fmo.fused_forward
    monkeypatch.setattr(fmo, "fused_forward", lambda *a: calls.append(1) or real(*a))
    x, a = inputs(2, 4, 8, fused_ok)
    monkeypatch.setenv(select.ENV, "reference")
    m = MixedOp(4, 2).to(fused_ok)
    monkeypatch.setenv(select.ENV, "fused")
    m(x, a)
    assert not calls and m.decision.impl == "reference"
    m.to(fused_ok)  # a move re-reads it
    m(x, a)
    assert calls == [1] and m.decision.impl == "fused"
    net = nn.Sequential(m, ReferenceMixedOp(4, 1), nn.Conv2d(4, 4, 1))
    assert set_impl(net, "reference") == 2
    m(x, a)
    assert calls == [1]
    assert set_impl(m, "fused") == 1
    m(x, a)
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="fast"):
        set_impl(net, "fast")
    assert resolve_mixed_op("fused", torch.device(fused_ok))[0] is FusedMixedOp
    # affine BNs are outside the fused path: explicit fused says so, auto falls back
    aff = MixedOp(4, 1, affine=True).to(fused_ok)
    with pytest.raises(select.FusedUnavailable, match="affine"):
        aff(x, a)
    # so are float64 inputs
    with pytest.raises(select.FusedUnavailable, match="float64"):
        m(x.double(), a.double())
    set_impl(aff, "auto")
    aff(x, a)


# --- the real shapes on a GPU --------------------------------------------------------------------------

REAL = [(16, 32), (32, 16), (64, 8)]


@pytest.mark.cuda
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("C,H", REAL)
def test_cuda_real_shapes_fp32(C, H, stride):
    assert select.decide("auto", "cuda").impl == "fused", select.decide("auto", "cuda").why()
    ref, fused = pair(C, stride, device="cuda")
    x, a = inputs(64, C, H, device="cuda")
    compare_train_and_eval(ref, fused, x, a, rtol=1e-4, atol_rel=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("stride", [1, 2])
def test_cuda_bf16_autocast_alpha_grad(stride):
    """Under bf16 autocast both paths compute in low precision; their α gradients must agree with the fp32
    reference about equally well (relative rule)."""
    ref, fused = pair(16, stride, device="cuda")
    x, a = inputs(64, 16, 32, device="cuda")
    exact = train_step(ref, x, a)[2]
    errs = {}
    for name, m in (("ref", ref), ("fused", fused)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            g = train_step(m, x, a)[2]
        errs[name] = ((g - exact).norm() / exact.norm()).item()
    assert errs["fused"] <= 2 * errs["ref"] + 1e-3, errs


@pytest.mark.cuda
def test_cuda_network_auto_uses_fused(monkeypatch):
    monkeypatch.delenv(select.ENV, raising=False)
    cls, why, kernels = resolve_mixed_op("auto", torch.device("cuda"))
    assert cls is FusedMixedOp, why


@pytest.mark.gpu_path
@pytest.mark.parametrize("stride", [1, 2])
def test_autocast_weights_cast_at_once_same_as_per_convolution(stride, fused_ok, monkeypatch):
    """Under bf16 autocast the stride-2 skip's 1×1 weights are cast by one foreach copy (and their gradients back
    by one; the conv candidates' go to the pointwise kernels uncast): the output and every gradient equal what
    autocast's per-convolution casts give."""
    _, fused = pair(6, stride, fused_ok, seed=8)
    x, a = inputs(3, 6, 9, fused_ok, seed=9)
    x = x.to(torch.bfloat16)  # as in the supernet under autocast: cell states are bf16
    copies = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda *args, **kw: copies.append(1) or real(*args, **kw))

    def run():
        with torch.autocast(torch.device(fused_ok).type, dtype=torch.bfloat16):
            return train_step(fused, x, a)

    got = run()
    assert len(copies) == (2 if stride == 2 else 0)  # forward and backward, FactorizedReduce's two weights
    monkeypatch.setattr(weight_cast, "cast_weights", lambda *args: {})
    want = run()
    assert got[0].dtype == torch.bfloat16
    for g, w, name in zip(got[:3], want[:3], ("output", "grad x", "grad mixing weights")):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=0, atol=0, msg=name)


@pytest.mark.gpu_path
@pytest.mark.parametrize("odd", ["one BatchNorm in eval mode", "one BatchNorm with another eps"])
def test_a_call_the_kernels_cannot_take_is_the_reference_under_auto_and_an_error_under_explicit_fused(odd):
    torch.manual_seed(0)
    op = FusedMixedOp(4, 1)
    bn = op._ops[PRIMITIVES.index("sep_conv_3x3")].op[-1]
    if odd.endswith("eval mode"):
        bn.eval()
    else:
        bn.eps = 1e-3
    x, w = torch.randn(2, 4, 5, 7), torch.softmax(torch.randn(len(PRIMITIVES)), 0)
    with pytest.raises(select.FusedUnavailable, match="this MixedOp: its BatchNorms") as e:
        op(x, w)
    assert "\n" not in str(e.value)
    op.decision = select.Decision("auto", "fused", ("test",))  # auto: the reference twin, same result
    twin = ReferenceMixedOp(4, 1)
    twin.load_state_dict(op.state_dict())
    twin._ops[PRIMITIVES.index("sep_conv_3x3")].op[-1].train(bn.training).eps = bn.eps
    torch.testing.assert_close(op(x, w), twin(x, w))
    # nothing ran twice: the running statistics and counters are the twin's
    for (name, a), b in zip(op.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


def test_conv_candidates_name_their_stages_and_keep_their_state_dict_keys():
    """SepConv/DilConv stages by name (what the fused path reads) are the Sequential's entries, whose indices stay
    the state_dict keys (DARTS checkpoints)."""
    from milenas_fast.space.primitives import DilConv, SepConv

    sep, dil = SepConv(4, 4, 3, 1, 1, affine=False), DilConv(4, 4, 3, 2, 2, 2, affine=False)
    assert [sep.dw1, sep.pw1, sep.bn1, sep.dw2, sep.pw2, sep.bn] == [sep.op[i] for i in (1, 2, 3, 5, 6, 7)]
    assert [dil.dw, dil.pw, dil.bn] == [dil.op[i] for i in (1, 2, 3)]
    bn = ["running_mean", "running_var", "num_batches_tracked"]
    assert list(sep.state_dict()) == (["op.1.weight", "op.2.weight"] + [f"op.3.{k}" for k in bn]
                                      + ["op.5.weight", "op.6.weight"] + [f"op.7.{k}" for k in bn])
    assert list(dil.state_dict()) == ["op.1.weight", "op.2.weight"] + [f"op.3.{k}" for k in bn]
