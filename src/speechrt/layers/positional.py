"""Sinusoid positional encodings, computed once per (length, dim, device, dtype) and cached.

WeNet stores the same table in its checkpoints (``*.pe``, (1, 5000, d)); we derive it with the same
float32 arithmetic instead of loading it, so any length works and nothing depends on the table size.
"""

from __future__ import annotations

import math

import torch

_CACHE: dict[tuple, torch.Tensor] = {}


def sinusoid_table(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Return the (length, dim) table: even columns sin(pos*div), odd columns cos(pos*div).

    ``div = exp(arange(0, dim, 2) * -(ln(10000) / dim))``, all in float32 as WeNet computes it.
    """
    key = (length, dim, str(device), dtype)
    table = _CACHE.get(key)
    if table is None:
        with torch.inference_mode(False):  # a cached table must stay usable by autograd (training)
            table = _build(length, dim, device, dtype)
        _CACHE[key] = table
    return table


def _build(length: int, dim: int, device, dtype) -> torch.Tensor:
    pos = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe.to(device=device, dtype=dtype)


def positions(offset: int, size: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rows ``offset .. offset+size-1`` of the table, shape (size, dim)."""
    if offset < 0:
        raise ValueError(f"positional offset must be >= 0, got {offset}")
    # Grow the cached table in powers of two so streaming offsets rarely rebuild it.
    need = offset + size
    length = 1 << max(12, (need - 1).bit_length())
    return sinusoid_table(length, dim, device, dtype)[offset:need]
