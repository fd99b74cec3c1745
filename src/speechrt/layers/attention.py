"""Multi-head attention, plain and WeNet relative-position, with an optional key/value cache.

WeNet's ``RelPositionMultiHeadedAttention`` (no ``rel_shift``) scores query i against key j as
``((q_i + u) . k_j + (q_i + v) . p_j) / sqrt(d_k)`` where ``p = linear_pos(pe)`` holds one vector
per key position. Expanding it, ``q_i . (k_j + p_j) + (u . k_j + v . p_j)``: ordinary attention
over keys ``k + p`` with one additive bias per key. The torch path here and the Triton kernel
both use that form.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from speechrt.layers.masks import AttentionSpec


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked softmax attention in float32 (torch path).

    q (B, H, Tq, Dk), k/v (B, H, Tk, Dk), key_bias (B, H, 1, Tk) or None -> (B, H, Tq, Dk).
    Hidden keys get probability exactly 0 (WeNet: ``-inf`` fill, softmax, then zero fill).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1))  # (B, H, Tq, Tk)
    if key_bias is not None:
        scores = scores + key_bias.float()
    scores = scores * scale
    visible = spec.dense(q.shape[-2], k.shape[-2]).unsqueeze(1)  # (B, 1, Tq, Tk)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention; with ``rel_pos=True`` it is WeNet's relative-position variant.

    ``forward(query, memory, spec, pos=None, cache=None)``:
      query (B, Tq, D); memory (B, Tk, D) keys/values source (= query for self-attention);
      pos (Tc + Tk, D) sinusoid rows of every key position (cached keys first) when rel_pos;
      cache (B, H, Tc, 2*Dk) previous keys and values (WeNet's ``att_cache`` layout) or None.
    Returns (out (B, Tq, D), new_cache (B, H, Tc + Tk, 2*Dk)).
    """

    def __init__(self, d_model: int, n_head: int, rel_pos: bool = False, bias: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by {n_head} heads")
        self.n_head = n_head
        self.d_k = d_model // n_head
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.k = nn.Linear(d_model, d_model, bias=bias)
        self.v = nn.Linear(d_model, d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        self.rel_pos = rel_pos
        if rel_pos:
            self.pos = nn.Linear(d_model, d_model, bias=False)
            self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
            self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, self.d_k).transpose(1, 2)  # (B, H, T, Dk)

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor,
        spec: AttentionSpec,
        pos: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._heads(self.q(query))
        k = self._heads(self.k(memory))
        v = self._heads(self.v(memory))
        if cache is not None and cache.shape[2] > 0:
            k_cache, v_cache = cache.split(self.d_k, dim=-1)
            k = torch.cat([k_cache, k], dim=2)
            v = torch.cat([v_cache, v], dim=2)
        new_cache = torch.cat([k, v], dim=-1)
        key_bias = None
        if self.rel_pos:
            if pos is None:
                raise ValueError("relative-position attention needs pos")
            p = self.pos(pos.to(query.dtype))  # (Tk, D)
            p = p.view(1, -1, self.n_head, self.d_k).transpose(1, 2)  # (1, H, Tk, Dk)
            u = self.pos_bias_u.view(1, self.n_head, 1, self.d_k)
            w = self.pos_bias_v.view(1, self.n_head, 1, self.d_k)
            key_bias = ((k * u).sum(-1) + (p * w).sum(-1)).unsqueeze(2)  # (B, H, 1, Tk)
            k = k + p
        x = attend(q, k, v, spec, key_bias)  # (B, H, Tq, Dk)
        b, _, tq, _ = x.shape
        x = x.transpose(1, 2).reshape(b, tq, self.n_head * self.d_k)  # (B, Tq, D)
        return self.out(x), new_cache
