"""Length buckets: pad a batch up to a (batch, length) bucket so a captured graph can serve it.

Padded rows get length 0 and padded frames are masked by lengths, so padding never changes the
valid outputs (the kernels take ``[B]`` lengths; the conv module zeroes padded GLU outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Buckets:
    """Round batch sizes up to ``batch_sizes`` and lengths up to a multiple of ``length_step``
    (lengths above ``max_length`` round to multiples of ``4 * length_step``)."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
    length_step: int = 64
    max_length: int = 1024

    def batch(self, b: int) -> int:
        """The bucket of a batch of ``b``: the first size >= b; above the largest, the next
        multiple of the largest (so batches of 65..128 share one bucket, not one graph each)."""
        for size in self.batch_sizes:
            if b <= size:
                return size
        top = self.batch_sizes[-1]
        return -(-b // top) * top

    def length(self, t: int) -> int:
        step = self.length_step if t <= self.max_length else 4 * self.length_step
        return max(step, -(-t // step) * step)

    def key(self, b: int, t: int) -> tuple[int, int]:
        return self.batch(b), self.length(t)


def pad_to(feats: torch.Tensor, lengths: torch.Tensor, b: int, t: int):
    """(B0, T0, F) -> (b, t, F) zero-padded; lengths (B0,) -> (b,) with zeros for new rows."""
    b0, t0, f = feats.shape
    if (b0, t0) == (b, t):
        return feats, lengths
    out = feats.new_zeros(b, t, f)
    out[:b0, :t0] = feats
    lens = lengths.new_zeros(b)
    lens[:b0] = lengths
    return out, lens
