"""The fused forward of MixedOp: the same maths as the module forwards, in fewer, larger steps.

1. `stencil` reads the edge input once and emits the first stage of sep3/sep5/dil3/dil5 (ReLU → depthwise,
   stride s) and both 3×3 pools (branches of absent candidates are not computed).
2. The conv candidates are finished with the module's own parameters and buffers: their first 1×1 convolutions
   in ONE `pointwise` launch; for sep convs the inner BatchNorm, then ReLU → second depthwise of BOTH sep convs
   in one Triton pass (`relu_depthwise_pair`), then both second 1×1 convolutions in one `pointwise`; so
   parameters, inner running statistics and state_dict are the reference's. In training mode the inner BNs'
   statistics are merged from the first `pointwise` launch's tile statistics by the second stages' launch, which
   normalises as it loads (`relu_depthwise_pair_bn_tiles`: no statistics launch, the BN outputs never written).
3. Every candidate's LAST BatchNorm (non-affine) is folded: its batch statistics (train: ONE `bn_stats`
   kernel) or running statistics (eval) become `mean`/`rstd`, and ONE `edge_reduce` computes
   Σ_k w_k (y_k − mean_k) rstd_k over the pre-BN outputs, a list (no stack) in the module's (PRIMITIVES) order
   with `none` left out, so the mixing weights are a slice (`weights[1:]` for the DARTS list; its gradient one
   cat, or none per edge when the Cell slices all its edges' rows at once: space/mixing_weights.py). Identity
   (stride 1 skip) enters in its own row with mean 0, rstd 1. Running statistics are updated as nn.BatchNorm2d
   does (momentum or cumulative average, unbiased variance, num_batches_tracked), for a whole Network forward at
   once (space/running_stats.py). The gradient flows through the batch statistics (bn_fold's written-out
   backward), so every gradient is the reference's.

The stages are an `Edge`'s methods, and `run` takes them for many edges at once: the supernet's fused Cell hands
it the edges leaving the states that are ready, and steps 1, 2's 1×1 convolutions and 3's statistics then take
one launch per stage for all of them (`stencil_group`, the pairs, `pointwise` and `bn_stats` take tuples of
pointers), and so do the stencil's and the pairs' backward (input and filter gradients, the inner BNs' backward).
Each edge_reduce (forward and backward) stays per edge. A lone MixedOp is a group of one (`fused_forward`).

Only non-affine search MixedOps over (a subset of) the DARTS primitives are fused; `unsupported(mod)`
says why one is not.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import factorized_reduce, select
from ..ops.bn_fold import MAX_STATS, bn_stats, folded_reduce, running_rstd, stats_mask
from ..ops.pointwise import MAX_K, pointwise, stats_tile as pointwise_stats_tile
from ..ops.stencil import MAX_EDGES, relu_depthwise_pair, relu_depthwise_pair_bn_tiles, stencil_group
from . import mixing_weights, weight_cast
from .primitives import PRIMITIVES, FactorizedReduce
from .running_stats import update as _update_running_stats

_SEP = ("sep_conv_3x3", "sep_conv_5x5")  # relu_depthwise_pair's order
_STENCIL_SLOT = {"sep_conv_3x3": 0, "sep_conv_5x5": 1, "dil_conv_3x3": 2, "dil_conv_5x5": 3,
                 "max_pool_3x3": 4, "avg_pool_3x3": 5}


def unsupported(mod: nn.Module) -> str:
    """'' when `mod` (a MixedOp) can take the fused path, else the reason it cannot."""
    names = tuple(mod.primitives)
    unknown = [p for p in names if p not in PRIMITIVES]
    if unknown:
        return f"primitives {unknown} have no fused kernel"
    if all(p == "none" for p in names):
        return "only `none` candidates"
    twice = sorted({p for p in names if names.count(p) > 1})
    if twice:  # the stencil has one branch per conv primitive, edge_reduce at most 8 candidates
        return f"primitives listed twice ({', '.join(twice)})"
    for m in mod._ops.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            return "affine BatchNorm (the fused path folds non-affine search BatchNorms only)"
    return ""


def _last_bn(name: str, op: nn.Module) -> nn.BatchNorm2d | None:
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        return op[1]
    if name.startswith(("sep_conv", "dil_conv")):
        return op.bn
    if isinstance(op, FactorizedReduce):
        return op.bn
    return None  # identity


def _inner_bn(bn: nn.Module, y: torch.Tensor, counters: list[torch.Tensor]) -> torch.Tensor:
    """bn(y) for a sep conv's inner BatchNorm, without nn.BatchNorm2d's own `num_batches_tracked += 1` launch:
    a training-mode counter is appended to `counters` instead (it joins the running-statistics update). With momentum
    None the counter sets the average's factor, so such a BN runs as itself."""
    if not (type(bn) is nn.BatchNorm2d and bn.training and bn.track_running_stats and bn.momentum is not None
            and bn.num_batches_tracked is not None):
        return bn(y)
    counters.append(bn.num_batches_tracked)
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps)


def _pair_bn(seps: dict, h: torch.Tensor | None) -> bool:
    """Whether both sep convs' inner BatchNorms can be folded into their second stage
    (`relu_depthwise_pair_bn_tiles`): plain nn.BatchNorm2d's in training mode with one eps, more than one value
    per channel, not compiled."""
    if len(seps) != 2 or torch.compiler.is_compiling() or h.shape[0] * h.shape[2] * h.shape[3] <= 1:
        return False
    bns = [seps[n].bn1 for n in _SEP]
    return all(type(bn) is nn.BatchNorm2d and bn.training for bn in bns) and bns[0].eps == bns[1].eps


def _pointwise(todo: dict, stats=()) -> tuple[dict, dict]:
    """({key: conv(x)} for {key: (x, 1×1 conv module)}; {key: (tile statistics, row)} for the keys in `stats`):
    one `pointwise` launch for all convolutions of one input shape and dtype (up to its MAX_K), apart for inputs that
    want no gradient (an α-only pass's edges from a frozen stem: their outputs would then want one, and their
    backward would run). The weights go as they are (under autocast the kernels round fp32 weights to the inputs'
    dtype, as autocast would, and return fp32 weight gradients: no casts either way). The outputs named by `stats`
    (first in their launch: the low bits of its bitmask) also leave their tile statistics."""
    want = set(stats)

    def kind(key):
        x, m = todo[key]
        return x.shape, x.dtype, x.requires_grad, m.weight.shape, m.weight.dtype

    out, tiles = {}, {}
    for _, chunk in _launches([k for k in stats if k in todo] + [k for k in todo if k not in want], kind, MAX_K):
        mask = stats_mask(r for r, k in enumerate(chunk) if k in want)
        res = pointwise([todo[k][0] for k in chunk], [todo[k][1].weight for k in chunk], mask)
        out.update(zip(chunk, res))
        tiles.update((k, (res[-1], r)) for r, k in enumerate(chunk) if k in want)
    return out, tiles


def _launches(items: list, kind, most: int) -> list[tuple]:
    """(kind, chunk) per launch: `items` of one kind(item) together, in order, at most `most` per launch."""
    parts: dict = {}
    for it in items:
        parts.setdefault(kind(it), []).append(it)
    return [(k, g[c:c + most]) for k, g in parts.items() for c in range(0, len(g), most)]


class Edge:
    """One fused MixedOp's forward, in the stages `run` takes for many edges at once (a fused Cell groups the edges
    that leave the same states: one launch per stage for all of them, where each edge would take its own: the
    pointwise stages, the last BatchNorms' statistics). After `run`, `finish(acc)` gives the edge's output (plus
    acc)."""

    def __init__(self, mod: nn.Module, x: torch.Tensor, weights: torch.Tensor, mixing: torch.Tensor | None = None):
        self.mod, self.x, self.weights, self.mixing = mod, x, weights, mixing
        names = tuple(mod.primitives)
        self.ks = mixing_weights.order(names)
        self.bns = [_last_bn(names[k], mod._ops[k]) for k in self.ks]  # per candidate row; None for the identity
        folded = [bn for bn in self.bns if bn is not None]
        # Checked before anything runs: a call handed to the reference must not have updated running statistics.
        self.use_batch = [bn.training or bn.running_mean is None for bn in folded]
        eps = {bn.eps for bn in folded}
        self.why = ""  # why the reference twin must take it
        if any(self.use_batch) and not all(self.use_batch):  # some in train, some in eval mode: only a user does that
            self.why = "its BatchNorms are partly in training and partly in eval mode"
        elif len(eps) > 1:  # one eps per kernel launch; DARTS's BNs all have 1e-5
            self.why = f"its BatchNorms have different eps ({sorted(eps)})"
        self.eps = eps.pop() if len(eps) == 1 else 0.0

    def stencil_args(self) -> tuple | None:
        """The first stages' stencil call: (filters w3, w5, wd3, wd5 (None: absent), stride, pools, with the
        identity), or None where no candidate needs it."""
        names, ops = tuple(self.mod.primitives), self.mod._ops
        filters: list = [None] * 4
        for name, op in zip(names, ops):
            if name.startswith(("sep_conv", "dil_conv")):
                filters[_STENCIL_SLOT[name]] = (op.dw1 if name.startswith("sep") else op.dw).weight
        pools = any(n in ("max_pool_3x3", "avg_pool_3x3") for n in names)
        if not pools and all(f is None for f in filters):
            return None
        # The identity candidate (stride 1 skip) is x; taken as the stencil's first output, its gradient joins dx
        # in the stencil's input-gradient kernel (no add per edge and backward pass).
        return tuple(filters), self.mod.stride, pools, any(bn is None for bn in self.bns)

    def stage1(self, outputs: tuple | None) -> dict:
        """Takes the stencil's outputs (those of `stencil_args`' call; None: none needed); returns the conv
        candidates' first 1×1 convolutions to run: {name: (input, module)}."""
        names, ops = tuple(self.mod.primitives), self.mod._ops
        self.identity, self.stage = self.x, None
        if outputs is not None:
            if any(bn is None for bn in self.bns):  # the identity candidate came first (`stencil_args`)
                self.identity, *self.stage = outputs
            else:
                self.stage = list(outputs)
        self.convs = [(name, op) for name, op in zip(names, ops) if name.startswith(("sep_conv", "dil_conv"))]
        self.seps = {name: op for name, op in self.convs if name.startswith("sep_conv")}
        self.fold = _pair_bn(self.seps, self.stage[_STENCIL_SLOT[_SEP[0]]] if self.seps else None)
        return {name: (self.stage[_STENCIL_SLOT[name]], op.pw1 if name.startswith("sep") else op.pw)
                for name, op in self.convs}

    def folded_seps(self) -> tuple:
        """The first stage outputs whose tile statistics the pair needs (the inner BNs folded)."""
        return _SEP if self.fold else ()

    def pair_args(self, first: dict, tiles: dict) -> tuple | None:
        """The folded pair's `relu_depthwise_pair_bn_tiles` arguments (h3, w3, h5, w5, tile statistics, rows, tile,
        eps), or None where the inner BNs are not folded. `tiles`: {name: (tile statistics, row)} of the folded sep
        convs' first stage outputs (`_pointwise`)."""
        if not self.fold:
            return None
        seps = self.seps
        h3, h5 = (first[n] for n in _SEP)
        (st, r3), (st5, r5) = (tiles[n] for n in _SEP)
        assert st is st5, "one launch's tile statistics for both sep convs (one shape and dtype)"
        return (h3, seps[_SEP[0]].dw2.weight, h5, seps[_SEP[1]].dw2.weight, st, (r3, r5),
                pointwise_stats_tile(h3), seps[_SEP[0]].bn1.eps)

    def pair(self, first: dict, tiles: dict, counters: list, folded: tuple | None = None) -> dict:
        """The sep convs' second stages: ReLU → depthwise of both in one Triton launch (fp32 filters, as the
        first's); returns their 1×1 convolutions to run. `folded`: the folded pair's (y3, y5, mean, var) where a
        group call (`_pairs`) computed them."""
        self.first, seps = first, self.seps
        f3, f5 = (seps[n].dw2.weight if n in seps else None for n in _SEP)
        if self.fold:
            # both inner BNs in training mode: their statistics merged from the first pointwise's tile statistics
            # by the second stages' launch, which normalises as it loads (the BN outputs are never written);
            # running statistics with the others'
            if folded is None:
                args = self.pair_args(first, tiles)
                folded = relu_depthwise_pair_bn_tiles(*([a] for a in args[:6]), *args[6:],
                                                      max_tile=self.mod.kernels.max_tile)[0]
            y3, y5, mean_i, var_i = folded
            _update_running_stats([seps[n].bn1 for n in _SEP], mean_i, var_i, [])
        else:
            mid = {name: _inner_bn(op.bn1, first[name], counters) for name, op in seps.items()}
            y3, y5 = relu_depthwise_pair(mid.get(_SEP[0]), f3, mid.get(_SEP[1]), f5,
                                         max_tile=self.mod.kernels.max_tile)
        return {name: (y, seps[name].pw2) for name, y in zip(_SEP, (y3, y5)) if y is not None}

    def candidates(self, second: dict, counters: list) -> int:
        """The pre-BN candidate outputs (`self.ys`, in the module's order: the identity x, or x as the stencil's
        output), read where they are (no stack); returns the `stats` bitmask of the rows whose batch statistics
        `bn_stats` must give (training mode), else 0, the statistics then set here from the running ones."""
        mod, x, bns = self.mod, self.x, self.bns
        names, ops = tuple(mod.primitives), mod._ops
        cw = weight_cast.cast_weights(weight_cast.conv_modules(ops), x.device.type)
        cands = []
        for k, bn in zip(self.ks, bns):
            name, op = names[k], ops[k]
            if bn is None:
                y = self.identity
            elif name in ("max_pool_3x3", "avg_pool_3x3"):
                y = self.stage[_STENCIL_SLOT[name]]
            elif name.startswith("sep_conv"):
                y = second[name]
            elif name.startswith("dil_conv"):
                y = self.first[name]
            else:  # stride-2 skip
                y = factorized_reduce.pre_bn(op, x, cw.get(id(op.conv_1)), cw.get(id(op.conv_2)))
            cands.append(y)
        outs = [y for y, bn in zip(cands, bns) if bn is not None]
        self.dtype = outs[0].dtype if outs else x.dtype
        for y in outs[1:]:
            self.dtype = torch.promote_types(self.dtype, y.dtype)
        self.ys = [y if y.dtype == self.dtype else y.to(self.dtype) for y in cands]
        self.counters = counters
        rows = stats_mask(r for r, bn in enumerate(bns) if bn is not None)  # the rows with a folded BatchNorm
        self.stats = rows if self.use_batch and self.use_batch[0] else 0
        if self.stats:
            y = self.ys[0]
            if y.shape[0] * y.shape[2] * y.shape[3] <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                                 f"{list(outs[0].shape)}")
        else:
            if counters:  # inner BNs in training mode, last ones in eval mode: only their counters
                _update_running_stats([], None, None, counters)
            self.mean, self.rstd = _running_stats(mod, bns, rows, self.eps)
        return self.stats

    def batch_stats(self, mean: torch.Tensor, rstd: torch.Tensor, unbiased: torch.Tensor) -> None:
        """This edge's rows of a `bn_stats` launch; the running statistics updated from them."""
        self.mean, self.rstd = mean, rstd
        _update_running_stats(self.bns, mean, unbiased, self.counters)

    def finish(self, acc: torch.Tensor | None = None) -> torch.Tensor:
        """ONE edge_reduce over the candidates with their BatchNorms folded (+ acc)."""
        mod, ys = self.mod, self.ys
        w = (mixing_weights.candidate_weights(self.weights, mod._fused_index, mod._weight_zeros)
             if self.mixing is None else self.mixing)
        if acc is not None and (acc.shape != ys[0].shape or acc.dtype != self.dtype):  # only a user hands those
            return acc + folded_reduce(ys, w, self.mean, self.rstd, self.stats, None, self.mod.kernels)
        return folded_reduce(ys, w, self.mean, self.rstd, self.stats, acc, self.mod.kernels)


def _bn_stats(edges: list[Edge]) -> None:
    """The batch statistics of `edges`' folded BatchNorms: ONE `bn_stats` launch per candidate shape, dtype and
    eps (whole edges, up to its MAX_STATS candidates)."""
    parts: dict = {}
    for e in edges:
        parts.setdefault((e.ys[0].shape, e.dtype, e.eps), []).append(e)
    for group in parts.values():
        chunk: list[Edge] = []
        for e in group + [None]:
            if chunk and (e is None or sum(len(c.ys) for c in chunk) + len(e.ys) > MAX_STATS):
                ys = [y for c in chunk for y in c.ys]
                offsets = [sum(len(c.ys) for c in chunk[:i]) for i in range(len(chunk))]
                with torch.no_grad():
                    mean, rstd, unbiased = bn_stats(ys, sum(c.stats << o for c, o in zip(chunk, offsets)),
                                                    chunk[0].eps)
                    for c, o in zip(chunk, offsets):
                        c.batch_stats(*(t[o:o + len(c.ys)] for t in (mean, rstd, unbiased)))
                chunk = []
            if e is not None:
                chunk.append(e)


def _stencils(edges: list[Edge]) -> list:
    """Each edge's first-stage stencil outputs (None where it needs none): ONE launch for the edges of one input
    shape and dtype, stride and set of branches (up to MAX_EDGES), apart for inputs that want no gradient (as in
    `_pointwise`: else their outputs would want one); a lone edge is a group of one."""
    calls = [e.stencil_args() for e in edges]

    def kind(i):
        x, (filters, stride, pools, identity) = edges[i].x, calls[i]
        return (x.shape, x.dtype, x.requires_grad, edges[i].mod.kernels.max_tile, stride, pools, identity,
                tuple(f is not None for f in filters))

    out: list = [None] * len(edges)
    for (*_, tile, stride, pools, identity, _), chunk in _launches([i for i, c in enumerate(calls) if c], kind,
                                                                  MAX_EDGES):
        for i, o in zip(chunk, stencil_group([edges[i].x for i in chunk], [calls[i][0] for i in chunk],
                                             stride, pools, identity, max_tile=tile)):
            out[i] = o
    return out


def _pairs(calls: list, max_tiles: list) -> list:
    """The folded pairs' (y3, y5, mean, var) for the `Edge.pair_args` calls (None: not folded): one group call for
    the pairs of one shape and dtype, eps and tile (up to MAX_EDGES), apart for those that want no gradient (as in
    `_pointwise`); None where a lone pair takes its own op (`Edge.pair`). `max_tiles`: each edge's stencil tile."""
    def kind(i):
        h3, w3, h5, w5, _, _, tile, eps = calls[i]
        return h3.shape, h3.dtype, any(t.requires_grad for t in (h3, w3, h5, w5)), max_tiles[i], tile, eps

    out: list = [None] * len(calls)
    for (*_, tile, eps), chunk in _launches([i for i, c in enumerate(calls) if c], kind, MAX_EDGES):
        if len(chunk) > 1:
            args = [calls[i] for i in chunk]
            res = relu_depthwise_pair_bn_tiles(*([a[j] for a in args] for j in range(6)), tile, eps,
                                               max_tile=max_tiles[chunk[0]])
            for i, r in zip(chunk, res):
                out[i] = r
    return out


def run(edges: list[Edge]) -> None:
    """Every stage of `edges` up to their edge_reduce (`Edge.finish`), each stage in ONE launch for all of them (the
    pointwise stages and the statistics: inputs of one shape and dtype)."""
    firsts = [e.stage1(out) for e, out in zip(edges, _stencils(edges))]
    todo = {(i, n): v for i, f in enumerate(firsts) for n, v in f.items()}
    first, tiles = _pointwise(todo, [(i, n) for i, e in enumerate(edges) for n in e.folded_seps()])
    counters = [[] for _ in edges]
    firsts = [{n: first[(i, n)] for n in f} for i, f in enumerate(firsts)]
    tiles = [{n: tiles[(i, n)] for n in e.folded_seps()} for i, e in enumerate(edges)]
    folded = _pairs([e.pair_args(f, t) for e, f, t in zip(edges, firsts, tiles)],
                    [e.mod.kernels.max_tile for e in edges])
    seconds = [e.pair(f, t, c, p) for e, f, t, c, p in zip(edges, firsts, tiles, counters, folded)]
    second = _pointwise({(i, n): v for i, s in enumerate(seconds) for n, v in s.items()})[0]
    batch = [e for i, (e, s, c) in enumerate(zip(edges, seconds, counters))
             if e.candidates({n: second[(i, n)] for n in s}, c)]
    _bn_stats(batch)


def grouped(mod: nn.Module, x: torch.Tensor, weights: torch.Tensor, mixing: torch.Tensor) -> Edge | None:
    """The edge for a fused Cell's group (`run`), or None where the MixedOp's own forward must take it (the reference
    twin: not fused, a dtype the kernels lack, BatchNorms the kernels cannot fold)."""
    if mod._fused_index is None or x.dtype not in select.FUSED_DTYPES:
        return None
    edge = Edge(mod, x, weights, mixing)
    return None if edge.why else edge


def fused_forward(mod: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                  mixing: torch.Tensor | None = None, acc: torch.Tensor | None = None) -> torch.Tensor:
    """`mixing`: weights[mod._fused_index] in fp32 when the caller has taken it already (the Cell, for all its
    edges at once: space/mixing_weights.py). `acc`: added to the output by edge_reduce (the Cell's node sum)."""
    edge = Edge(mod, x, weights, mixing)
    if edge.why:
        return _reference(mod, x, weights, acc, edge.why)
    run([edge])
    return edge.finish(acc)


def _running_stats(mod: nn.Module, bns: list, rows: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval mode: mean/rstd [K, C] fp32 from the running statistics, the identity's row exactly 0 / 1, in two
    kernels: ONE stack of every row's running mean and var (the identity's: zeros), mean a view of it, and
    ONE `running_rstd`."""
    zero, one = mod._identity_stats
    if not rows:
        return zero[None], one[None]
    st = torch.stack([bn.running_mean if bn is not None else zero for bn in bns]
                     + [bn.running_var if bn is not None else zero for bn in bns]).float()
    return st[:len(bns)], running_rstd(st[len(bns):], rows, eps)


def identity_stats(C: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity candidate's constant mean 0 and rstd 1 ([C] fp32), built once per placement."""
    return torch.zeros(C, device=device), torch.ones(C, device=device)


def _reference(mod, x, weights, acc, why: str):
    """A call the fused kernels cannot take: the reference twin (same maths), or, under an explicit
    `--impl fused`, the one-line FusedUnavailable error (explicit requests never fall back silently)."""
    if mod.decision.requested == "fused":
        select.require_fused(select.Decision("fused", "reference", (f"this MixedOp: {why}",)))
    out = mod.reference_forward(x, weights)
    return out if acc is None else acc + out
