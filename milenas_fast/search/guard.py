"""A run-time guard around the first iterations of a search: a fast component that fails there switches
itself off with ONE warning and the same iteration is redone from the state it started from (none applied
twice, none lost). Explicitly requested components stay strict: their failure ends the run (ConfigError).

Before each guarded iteration the guard takes a snapshot (the caller's `snapshot()`: weights, α, BatchNorm
buffers, both optimisers' state, the validation stream position, RNG, …). If the iteration raises, it
restores the snapshot, turns off the first suspect still on (the components are listed in order of
suspicion; one the iteration did not engage is suspected only when no engaged one is left), and retries.
With nothing left to turn off the error propagates: it is a real bug, not a fast path's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError, one_line

log = logging.getLogger("milenas_fast")


@dataclass
class Component:
    name: str                               # e.g. "CUDA graph"
    fallback: str                           # what runs instead, e.g. "the eager loop"
    off: Callable[[str], None]              # switch it off, given why (one line)
    engaged: Callable[[], bool] = lambda: True  # whether the next iteration uses it
    strict: bool = False                    # explicitly requested: failure is fatal


class Guard:
    def __init__(self, components: list[Component], snapshot: Callable[[], object],
                 restore: Callable[[object], None], iterations: int):
        """Guard the first `iterations` successful iterations (counted again after each fallback, so the
        configuration that remains gets its own guarded start)."""
        self.components = list(components)
        self.snapshot, self.restore, self.iterations = snapshot, restore, iterations
        self.left = iterations if self.components else 0

    def __call__(self, iteration: Callable[[], object]):
        if self.left <= 0:
            return iteration()
        state = self.snapshot()
        while True:
            engaged = [c for c in self.components if c.engaged()]
            try:
                out = iteration()
            except Exception as e:  # noqa: BLE001 — any failure of a fast component is handled the same way
                from ..distributed import is_collective_failure

                if is_collective_failure(e):  # a lost rank, not a fast component: no fallback can help
                    raise
                suspect = (engaged or self.components or [None])[0]
                if suspect is None:
                    raise
                self.restore(state)
                if suspect.strict:
                    raise ConfigError(f"{suspect.name} was requested explicitly and failed ({one_line(e)})") from e
                log.warning("%s failed (%s); switched off, using %s from this iteration on (redone)",
                            suspect.name, one_line(e), suspect.fallback)
                suspect.off(one_line(e))
                self.components.remove(suspect)
                self.left = self.iterations
                continue
            self.left -= 1
            return out
