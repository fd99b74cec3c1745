"""Attention visibility described by lengths and a few integers, never by stored [B, T, T] masks.

Kernels read :class:`AttentionSpec` fields directly; the torch path asks for :meth:`dense`, which
builds the boolean mask on the fly from the same description (so both paths share one definition).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Which keys each query sees.

    key_lengths: (B,) valid keys per row (keys ``j >= key_lengths[b]`` are hidden).
    causal: key j visible to query i only if ``j <= i + query_offset``.
    chunk_size / num_left_chunks: WeNet's chunk mask (``subsequent_chunk_mask``); query i sees keys
        in ``[max((i//c - left)*c, 0), min((i//c + 1)*c, Tk))``; ``num_left_chunks < 0`` = all left.
    query_offset: position of query 0 among the keys (streaming: number of cached keys).
    """

    key_lengths: torch.Tensor
    causal: bool = False
    chunk_size: int = 0
    num_left_chunks: int = -1
    query_offset: int = 0

    def dense(self, tq: int, tk: int) -> torch.Tensor:
        """Boolean visibility (B, tq, tk), True = visible.

        A query row with no visible key is made fully visible, as WeNet does
        (``add_optional_chunk_mask``); such rows only occur for padded queries.
        """
        device = self.key_lengths.device
        kpos = torch.arange(tk, device=device)
        visible = (kpos[None, :] < self.key_lengths[:, None])[:, None, :]  # (B, 1, tk)
        qpos = torch.arange(tq, device=device)[:, None] + self.query_offset  # (tq, 1)
        if self.causal:
            visible = visible & (kpos[None, :] <= qpos)[None]
        if self.chunk_size > 0:
            c = self.chunk_size
            chunk_idx = torch.div(qpos, c, rounding_mode="floor")
            hi = torch.clamp((chunk_idx + 1) * c, max=tk)
            win = kpos[None, :] < hi
            if self.num_left_chunks >= 0:
                lo = torch.clamp((chunk_idx - self.num_left_chunks) * c, min=0)
                win = win & (kpos[None, :] >= lo)
            visible = visible & win[None]
        visible = visible.expand(self.key_lengths.shape[0], tq, tk)
        empty = ~visible.any(dim=-1, keepdim=True)
        return visible | empty


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
