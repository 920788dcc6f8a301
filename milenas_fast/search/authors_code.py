"""`--authors_code`: the authors' validation batches. Their loop calls `next(iter(valid_queue))` every step:
a new DataLoader iterator, i.e. a freshly shuffled pass of which only the first batch is used (a batch drawn
with replacement across steps). Here each step is the first batch of the next pass's plan: the same
distribution, deterministic, and resumable from the stream's (pass, position) state. The other differences
live where they act: α clipped (step.StepRule.clipped), λ_valid ignored (StepRule.alpha_terms), the genotype
logged before the epoch's training (loop._run)."""
from __future__ import annotations

from ..data import BatchStream


class FreshIteratorStream(BatchStream):
    """One batch per pass: every call starts a new plan and returns its first batch."""

    def __next__(self):
        batch = super().__next__()
        self.pass_index, self.position, self._it = self.pass_index + 1, 0, None
        return batch
