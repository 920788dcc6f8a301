"""`--sampler gumbel`: hard Gumbel-softmax samples of α with the straight-through estimator (MiLeNAS-GDAS).

Per forward: y = softmax((α + G) / τ) with G ~ Gumbel(0, 1); the row is one_hot(argmax y) in value and y in
gradient (one_hot + y − y.detach(): exact zeros and ones forward). One sample per cell (`cell`, as the
authors' code draws) or one per cell type shared by all its cells (`type`, as GDAS draws). τ falls linearly
per epoch from τ_max towards τ_min (tau_at).

Host synchronisation: all cells' indices are read back in ONE transfer per forward (the supernet passes them
to HardSampledMixedOp, which runs only the chosen candidate); the authors' code tests every mixing weight
on the host, 896 synchronisations per forward. Needing none would mean running every candidate: which
module runs is decided on the host. The same reason keeps CUDA graphs and torch.compile off here.

Noise comes from the sampler's own generator on the run's device, seeded from --seed; its state is part of
the checkpoint (and of the guard's snapshot), so resume continues the same sample sequence.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F


def tau_at(epoch: int, epochs: int, tau_max: float, tau_min: float, authors: bool = False) -> float:
    """Linear per epoch from tau_max at the first epoch to tau_min at the last. The authors' formula
    (`authors`, for --authors_code) divides by `epochs` instead, so their last epoch stops short of tau_min
    (1.18 after 50 epochs at 10 → 1)."""
    span = epochs if authors else epochs - 1
    return tau_max - (tau_max - tau_min) * epoch / span if span else tau_max


def gumbel_noise(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel(0, 1) noise shaped like `logits`: −log E with E ~ Exp(1), E kept above 0 so that it is finite."""
    exp = torch.empty_like(logits).exponential_(generator=generator)
    return -exp.clamp_(min=torch.finfo(logits.dtype).tiny).log()


def hard_gumbel(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None):
    """(straight-through one-hot rows, their indices on the device) for logits [..., K]."""
    soft = F.softmax((logits + gumbel_noise(logits, generator)) / tau, dim=-1)
    index = soft.argmax(dim=-1)
    hard = torch.zeros_like(soft).scatter_(-1, index.unsqueeze(-1), 1.0)
    return hard + (soft - soft.detach()), index


class GumbelSampler:
    """Set as `Network.sampler`: called once per forward, returns one (weights, host indices) pair per cell."""

    def __init__(self, share: str, seed: int, device: torch.device, tau: float):
        if share not in ("cell", "type"):
            raise ValueError(f"gumbel share must be cell or type, got {share!r}")
        self.share, self.tau = share, tau
        # a stream of its own: the global RNG, seeded with `seed` too, initialised the weights and α
        self.generator = torch.Generator(device).manual_seed((seed * 1_000_003 + 11) % 2**63)

    def __call__(self, net) -> tuple[list[torch.Tensor], list[list[int]]]:
        alpha_normal, alpha_reduce = net.arch_parameters()
        kinds = [int(cell.reduction) for cell in net.cells]
        if self.share == "cell":
            rows, which = [alpha_reduce if k else alpha_normal for k in kinds], range(len(kinds))
        else:
            rows, which = [alpha_normal, alpha_reduce], kinds
        with torch.autocast(device_type=alpha_normal.device.type, enabled=False):
            weights, index = hard_gumbel(torch.stack(rows).float(), self.tau, self.generator)
        host = index.tolist()  # the forward's one host synchronisation
        samples = weights.unbind(0)
        return [samples[i] for i in which], [host[i] for i in which]

    def state_dict(self) -> dict:
        return {"share": self.share, "tau": self.tau, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> bool:
        """False when the saved generator state is another device type's (a run resumed on another kind of
        device): the noise then continues from a new stream seeded from that state, deterministically."""
        self.tau = state["tau"]
        try:
            self.generator.set_state(state["generator"])
            return True
        except RuntimeError:
            self.generator.manual_seed(zlib.crc32(state["generator"].numpy().tobytes()))
            return False
