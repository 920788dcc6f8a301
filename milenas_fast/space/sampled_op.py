"""HardSampledMixedOp(C, stride): the drop-in beside MixedOp for sampling searches (GDAS, MiLeNAS-Gumbel).

`forward(x, weights)` takes a hard one-hot row with straight-through gradients (search/sampler.py makes one)
and runs ONLY the chosen candidate, scaled by its weight: the value is op_k(x), and the weight's gradient
⟨∂L/∂out, op_k(x)⟩ flows through the straight-through row to every logit of the edge. The other entries of
the row get a zero gradient, as in the authors' code, which skips them (MixedOp would give them
⟨∂L/∂out, op_j(x)⟩, which needs the ops not run); their candidates' parameters get none and their BatchNorm
statistics stay unchanged.

Which candidate: `index` when the caller passes it (the supernet hands over the host indices of the whole
forward, read back in one transfer), else the row's argmax, read with one host synchronisation per call
(for DARTS-family code calling `op(h, weights[k])`).

Same constructor, `_ops` and state_dict keys as MixedOp; always the reference candidate modules (the fused
kernel computes all candidates at once, which sampling exists to avoid).
"""
from __future__ import annotations

from ..ops import select
from .mixed_op import MixedOp


class HardSampledMixedOp(MixedOp):
    impl = "reference"

    def _resolve(self) -> None:
        self._fused_index = self.kernels = None
        self.decision = select.Decision("reference", "reference", ("one sampled candidate per edge",))

    def forward(self, x, weights, index: int | None = None):
        if index is None:
            index = int(weights.argmax())
        return weights[index] * self._ops[index](x)
