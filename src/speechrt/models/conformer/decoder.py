"""WeNet attention decoders (Transformer, and U2++'s bidirectional pair), inference only.

Hypotheses are grouped per utterance: tokens (B, W, L) for W hypotheses of each of B utterances.
Cross-attention keys/values are projected once per utterance and shared by its W hypotheses (the
queries of all W are stacked against the same keys), so the memory is never repeated.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from speechrt.layers.attention import MultiHeadAttention, attend
from speechrt.layers.masks import AttentionSpec
from speechrt.layers.norms import LayerNorm
from speechrt.layers.positional import positions
from speechrt.models.conformer.config import DecoderConfig
from speechrt.models.conformer.encoder import make_mlp

LN_EPS = 1e-5


class DecoderLayer(nn.Module):
    def __init__(self, d: int, cfg: DecoderConfig):
        super().__init__()
        self.normalize_before = cfg.normalize_before
        self.self_attn = MultiHeadAttention(d, cfg.attention_heads)
        self.cross_attn = MultiHeadAttention(d, cfg.attention_heads)
        self.ff = make_mlp(d, cfg.linear_units, cfg.mlp)
        self.norm1 = LayerNorm(d, eps=LN_EPS)
        self.norm2 = LayerNorm(d, eps=LN_EPS)
        self.norm3 = LayerNorm(d, eps=LN_EPS)

    def _pre(self, norm, x):
        return norm(x) if self.normalize_before else x

    def _post(self, norm, x):
        return x if self.normalize_before else norm(x)

    def cross(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mem_spec
    ) -> torch.Tensor:
        """x (B, W, L, D) attends to per-utterance kv ((B, H, T, Dk) each) -> (B, W, L, D)."""
        b, w, l, d = x.shape
        att = self.cross_attn
        q = att.q(x).view(b, w * l, att.n_head, att.d_k).transpose(1, 2)  # (B, H, W*L, Dk)
        out = attend(q, kv[0], kv[1], mem_spec)  # (B, H, W*L, Dk)
        out = out.transpose(1, 2).reshape(b, w, l, d)
        return att.out(out)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        att = self.cross_attn
        return att._heads(att.k(memory)), att._heads(att.v(memory))

    def forward(self, x, self_spec, kv, mem_spec, self_cache=None):
        """x (B, W, L, D); self_cache (B*W, H, Lc, 2*Dk) keys/values of earlier positions.

        Returns (x, new self cache (B*W, H, Lc+L, 2*Dk))."""
        b, w, l, d = x.shape
        h = self._pre(self.norm1, x).reshape(b * w, l, d)
        y, new_cache = self.self_attn(h, h, self_spec, cache=self_cache)
        x = self._post(self.norm1, x + y.view(b, w, l, d))
        x = self._post(self.norm2, x + self.cross(self._pre(self.norm2, x), kv, mem_spec))
        x = self._post(self.norm3, x + self.ff(self._pre(self.norm3, x)))
        return x, new_cache


class TransformerDecoder(nn.Module):
    """Token embedding * sqrt(d) + sinusoid positions, N layers, final LayerNorm, output Linear."""

    def __init__(self, vocab: int, d: int, cfg: DecoderConfig, num_blocks: int):
        super().__init__()
        self.d = d
        self.normalize_before = cfg.normalize_before
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(DecoderLayer(d, cfg) for _ in range(num_blocks))
        self.final_norm = LayerNorm(d, eps=LN_EPS)  # WeNet's after_norm
        self.out = nn.Linear(d, vocab)

    def project_memory(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of every layer, computed once: [(k, v)] (B, H, T, Dk)."""
        return [layer.project_memory(memory) for layer in self.layers]

    def _embed(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        x = self.embed(tokens) * math.sqrt(self.d)
        return x + positions(offset, tokens.shape[-1], self.d, x.device, x.dtype)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_before:
            x = self.final_norm(x)
        return torch.log_softmax(self.out(x).float(), dim=-1)

    def forward(
        self,
        tokens: torch.Tensor,
        token_lengths: torch.Tensor,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        memory_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced log-probs.

        tokens (B, W, L) decoder inputs ([sos, y1, ...]), token_lengths (B, W), memory_kv from
        :meth:`project_memory`, memory_lengths (B,). Returns float32 log-probs (B, W, L, V).
        """
        b, w, l = tokens.shape
        x = self._embed(tokens, 0)
        self_spec = AttentionSpec(token_lengths.reshape(b * w), causal=True)
        mem_spec = AttentionSpec(memory_lengths)
        for layer, kv in zip(self.layers, memory_kv):
            x, _ = layer(x, self_spec, kv, mem_spec)
        return self._head(x)

    def step(
        self,
        tokens: torch.Tensor,
        step: int,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        memory_lengths: torch.Tensor,
        caches: list[torch.Tensor | None],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One incremental step: tokens (B, W) at ``step`` -> (log-probs (B, W, V), caches).

        caches[i] (B*W, H, step, 2*Dk) self-attention keys/values of the earlier positions.
        """
        b, w = tokens.shape
        x = self._embed(tokens.unsqueeze(-1), step)  # (B, W, 1, D)
        self_spec = AttentionSpec(
            torch.full((b * w,), step + 1, device=tokens.device, dtype=torch.long),
            causal=True,
            query_offset=step,
        )
        mem_spec = AttentionSpec(memory_lengths)
        new_caches = []
        for layer, kv, cache in zip(self.layers, memory_kv, caches):
            x, c = layer(x, self_spec, kv, mem_spec, cache)
            new_caches.append(c)
        return self._head(x)[:, :, 0], new_caches


class AttentionDecoder(nn.Module):
    """Left-to-right decoder plus, for U2++ (``bitransformer``), a right-to-left one."""

    def __init__(self, vocab: int, d: int, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.l2r = TransformerDecoder(vocab, d, cfg, cfg.num_blocks)
        self.r2l = (
            TransformerDecoder(vocab, d, cfg, cfg.r_num_blocks)
            if cfg.kind == "bitransformer"
            else None
        )
