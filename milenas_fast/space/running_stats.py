"""BatchNorm running-statistics updates for the fused MixedOp: nn.BatchNorm2d's rule, in a few foreach launches.

`update` applies one MixedOp's updates now, or collects them while a `batched_running_stats` is open
(Network.forward opens one per forward: a few launches for the whole supernet instead of two per MixedOp).
No Triton here: the supernet imports this module whatever the MixedOp implementation.
"""
from __future__ import annotations

import torch


def update(bns: list, mean: torch.Tensor, unbiased: torch.Tensor, counters: list[torch.Tensor]) -> None:
    """nn.BatchNorm2d's running-statistics update for each BN k (None: no BN) from batch mean[k] and unbiased
    var[k], and +1 on `counters` (other BNs' num_batches_tracked): now, or when the enclosing
    `batched_running_stats` closes."""
    tracked = [k for k, bn in enumerate(bns)
               if bn is not None and bn.track_running_stats and bn.running_mean is not None]
    item = (counters + [bns[k].num_batches_tracked for k in tracked if bns[k].num_batches_tracked is not None],
            [(bns[k], mean[k], unbiased[k]) for k in tracked])
    if _batch.updates is None:
        _apply([item])
        return
    ids = {id(bn) for bn, _, _ in item[1]}
    if ids & _batch.bns:  # a module called twice in one forward: its first update goes first
        _apply(_batch.updates)
        _batch.updates, _batch.bns = [], set()
    _batch.updates.append(item)
    _batch.bns |= ids


def _apply(updates: list) -> None:
    """ONE foreach add for every counter, ONE lerp per momentum for every running mean and var together
    (r + f·(s − r) = (1 − f)·r + f·s), as nn.BatchNorm2d updates them (momentum or cumulative average,
    unbiased variance)."""
    with torch.no_grad():
        counters = [c for u in updates for c in u[0]]
        if counters:
            torch._foreach_add_(counters, 1)
        groups: dict[float, list] = {}
        for _, lerps in updates:
            for bn, m, v in lerps:
                factor = bn.momentum
                if factor is None:  # cumulative average (a host read of the counter, as nn.BatchNorm2d does)
                    factor = 1.0 / float(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 0.0
                groups.setdefault(float(factor), []).append((bn, m, v))
        for factor, items in groups.items():
            stats = [bn.running_mean for bn, _, _ in items] + [bn.running_var for bn, _, _ in items]
            new = [m for _, m, _ in items] + [v for _, _, v in items]
            torch._foreach_lerp_(stats, [n.to(r.dtype) for n, r in zip(new, stats)], factor)


# Why a module-level collector and not an argument: Network.forward opens it around its cells, and the MixedOps it
# serves are called as DARTS calls them, op(x, weights), by code (patched models, hooks) that cannot hand it on.
# It is open only inside one forward (the `with` restores it), so no choice leaks into later calls.
class _Batch:
    updates: list | None = None  # collected by an open batched_running_stats
    bns: set = set()


_batch = _Batch()


class batched_running_stats:
    """Within it, the fused MixedOps' running-statistics updates are collected and applied on exit by one
    foreach add and one lerp per momentum for all of them, not per MixedOp (Network.forward opens one).
    Nested: the outer one applies. Compiled code (torch.compile) updates per call as before. On an
    exception nothing collected is applied."""

    def __enter__(self):
        self.outer = _batch.updates is None and not torch.compiler.is_compiling()
        if self.outer:
            _batch.updates, _batch.bns = [], set()
        return self

    def __exit__(self, kind, *_):
        if self.outer:
            updates, _batch.updates, _batch.bns = _batch.updates, None, set()
            if kind is None and updates:
                _apply(updates)
        return False
