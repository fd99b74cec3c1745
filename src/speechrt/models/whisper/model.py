"""The Whisper network: audio encoder and text decoder with static, preallocated caches.

Decoding runs in three calls, all free of host syncs (graph-safe once caches exist):

* ``set_audio(features)`` computes every layer's cross-attention K/V ONCE per audio window;
* ``prefill(tokens)`` runs the initial tokens and writes the self-attention cache [0, T);
* ``step(tokens, positions)`` runs one token per row at ``positions`` and writes the cache there.

Batch rows are grouped by audio: row ``b`` belongs to audio ``b // group`` (beams or samples of
one audio are adjacent), so cross-attention folds a group into the query axis instead of copying
the audio K/V per beam. LayerNorm runs in FP32 whatever the weight dtype; attention uses
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechrt.errors import AudioError
from speechrt.models.whisper.config import WhisperDims


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in FP32, returned in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:  # (..., D)
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Sinusoidal positions, (length, channels): sin over the first half, cos over the second."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))  # (C/2,)
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]  # (length, C/2)
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class FeedForward(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Projections of multi-head attention (the key projection has no bias)."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, H, T, D/H) (a view)."""
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, -1).permute(0, 2, 1, 3)

    def merge(self, x: Tensor) -> Tensor:
        """(B, H, T, D/H) -> output projection of (B, T, D)."""
        return self.wo(x.permute(0, 2, 1, 3).flatten(start_dim=2))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: self-attention then feed-forward."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.attn_norm = LayerNorm(dim)
        self.attn = Attention(dim, n_head)
        self.ffn_norm = LayerNorm(dim)
        self.ffn = FeedForward(dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        h = self.attn_norm(x)
        a = self.attn
        out = F.scaled_dot_product_attention(a.heads(a.wq(h)), a.heads(a.wk(h)), a.heads(a.wv(h)))
        x = x + a.merge(out)
        return x + self.ffn(self.ffn_norm(x))


class AudioEncoder(nn.Module):
    """Two conv1d + GELU (the second with stride 2), sinusoid positions, pre-LN blocks, LN."""

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        d = dims.n_audio_state
        self.n_ctx = dims.n_audio_ctx
        self.conv1 = nn.Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("pos_emb", sinusoids(dims.n_audio_ctx, d))
        self.layers = nn.ModuleList(
            EncoderLayer(d, dims.n_audio_head) for _ in range(dims.n_audio_layer)
        )
        self.norm = LayerNorm(d)

    def forward(self, mel: Tensor) -> Tensor:
        """mel: (B, n_mels, 2 * n_audio_ctx) -> audio features (B, n_audio_ctx, n_audio_state)."""
        if mel.ndim != 3 or mel.shape[-1] != 2 * self.n_ctx:
            raise AudioError(
                f"encoder expects (B, n_mels, {2 * self.n_ctx}) mel, got {tuple(mel.shape)}"
            )
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x))
        x = x.permute(0, 2, 1)  # (B, T, D)
        x = (x + self.pos_emb).to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class KVCache(nn.Module):
    """Static key/value buffers, (max_batch, H, max_len, D/H) each."""

    def __init__(self, max_batch: int, n_head: int, max_len: int, head_dim: int, like: Tensor):
        super().__init__()
        shape = (max_batch, n_head, max_len, head_dim)
        opts = {"dtype": like.dtype, "device": like.device}
        self.register_buffer("k", torch.zeros(shape, **opts), persistent=False)
        self.register_buffer("v", torch.zeros(shape, **opts), persistent=False)


@dataclass
class _Pass:
    """How a decoder pass reads its context.

    kind: "full" (no cache; ``audio`` given), "prefill" (write [0, T)) or "step" (write at
    ``positions`` and attend under ``mask`` (B, 1, 1, L)); ``cross_qk`` collects pre-softmax
    cross-attention scores per layer in "full" passes when not None.
    """

    kind: str
    audio: Tensor | None = None
    positions: Tensor | None = None
    mask: Tensor | None = None
    cross_qk: list[Tensor] | None = None


class DecoderLayer(nn.Module):
    """Pre-LN block: causal self-attention (cached), cross-attention (cached), feed-forward."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.self_attn_norm = LayerNorm(dim)
        self.self_attn = Attention(dim, n_head)
        self.cross_attn_norm = LayerNorm(dim)
        self.cross_attn = Attention(dim, n_head)
        self.ffn_norm = LayerNorm(dim)
        self.ffn = FeedForward(dim)
        self.cache: KVCache | None = None
        self.cross_cache: KVCache | None = None
        self.n_audio = 0

    def forward(self, x: Tensor, p: _Pass) -> Tensor:  # (B, T, D)
        x = x + self._self_attend(self.self_attn_norm(x), p)
        x = x + self._cross_attend(self.cross_attn_norm(x), p)
        return x + self.ffn(self.ffn_norm(x))

    def _self_attend(self, h: Tensor, p: _Pass) -> Tensor:
        a = self.self_attn
        q, k, v = a.heads(a.wq(h)), a.heads(a.wk(h)), a.heads(a.wv(h))  # (B, H, T, Dh)
        b, t = h.shape[0], h.shape[1]
        if p.kind == "full":
            return a.merge(F.scaled_dot_product_attention(q, k, v, is_causal=t > 1))
        ck, cv = self.cache.k[:b], self.cache.v[:b]  # (B, H, L, Dh)
        if p.kind == "prefill":
            ck[:, :, :t].copy_(k)
            cv[:, :, :t].copy_(v)
            out = F.scaled_dot_product_attention(q, ck[:, :, :t], cv[:, :, :t], is_causal=t > 1)
            return a.merge(out)
        index = p.positions.view(b, 1, 1, 1).expand(b, a.n_head, 1, k.shape[-1])  # (B, H, 1, Dh)
        ck.scatter_(2, index, k)
        cv.scatter_(2, index, v)
        n = p.mask.shape[-1]
        out = F.scaled_dot_product_attention(q, ck[:, :, :n], cv[:, :, :n], attn_mask=p.mask)
        return a.merge(out)

    def _cross_attend(self, h: Tensor, p: _Pass) -> Tensor:
        a = self.cross_attn
        if p.kind == "full":
            k, v = a.heads(a.wk(p.audio)), a.heads(a.wv(p.audio))  # (A, H, S, Dh)
        else:
            k, v = self.cross_cache.k[: self.n_audio], self.cross_cache.v[: self.n_audio]
        b, t, d = h.shape
        n_audio = k.shape[0]
        q = a.heads(a.wq(h).reshape(n_audio, (b // n_audio) * t, d))  # (A, H, G*T, Dh)
        if p.cross_qk is not None:
            scale = (d // a.n_head) ** -0.25
            p.cross_qk.append(((q * scale) @ (k * scale).transpose(-1, -2)).float())
        out = F.scaled_dot_product_attention(q, k, v)  # (A, H, G*T, Dh)
        return a.merge(out).reshape(b, t, d)

    def set_audio(self, audio: Tensor) -> None:
        """Compute and store cross-attention K/V of audio features (A, S, D)."""
        a = self.cross_attn
        n = audio.shape[0]
        self.cross_cache.k[:n].copy_(a.heads(a.wk(audio)))
        self.cross_cache.v[:n].copy_(a.heads(a.wv(audio)))
        self.n_audio = n

    def reorder(self, source: Tensor) -> None:
        """Self-attention cache rows <- rows ``source`` (B,) (beam search)."""
        b = source.shape[0]
        for buf in (self.cache.k, self.cache.v):
            buf[:b].copy_(buf[:b].index_select(0, source))


class TextDecoder(nn.Module):
    """Token + learned position embedding, cross-attending blocks, LN, tied output projection."""

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        d = dims.n_text_state
        self.n_ctx = dims.n_text_ctx
        self.tok_emb = nn.Embedding(dims.n_vocab, d)
        self.pos_emb = nn.Parameter(torch.empty(dims.n_text_ctx, d))
        self.layers = nn.ModuleList(
            DecoderLayer(d, dims.n_text_head) for _ in range(dims.n_text_layer)
        )
        self.norm = LayerNorm(d)

    def run(self, x: Tensor, p: _Pass) -> Tensor:
        """Embedded tokens (B, T, D) -> logits (B, T, V) in FP32."""
        x = x.to(self.tok_emb.weight.dtype)
        for layer in self.layers:
            x = layer(x, p)
        x = self.norm(x)
        return (x @ torch.transpose(self.tok_emb.weight.to(x.dtype), 0, 1)).float()

    def embed(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """tokens (B, T) at positions [0, T), or (B, 1) at ``positions`` (B,) -> (B, T, D)."""
        if positions is None:
            return self.tok_emb(tokens) + self.pos_emb[: tokens.shape[-1]]
        return self.tok_emb(tokens) + self.pos_emb[positions][:, None]  # (B, 1, D)


class WhisperNet(nn.Module):
    """Encoder + decoder with ``setup_caches`` / ``set_audio`` / ``prefill`` / ``step``.

    ``alignment_heads`` (n_text_layer, n_text_head) bool marks the cross-attention heads used
    for word timestamps (default: every head of the second half of the layers).
    """

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims)
        self.decoder = TextDecoder(dims)
        heads = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
        heads[dims.n_text_layer // 2 :] = True
        self.register_buffer("alignment_heads", heads, persistent=False)
        self.max_batch = 0
        self.max_audio = 0

    # --- encoder ------------------------------------------------------------------------
    def embed_audio(self, mel: Tensor) -> Tensor:
        """(B, n_mels, 2 * n_audio_ctx) -> (B, n_audio_ctx, n_audio_state)."""
        return self.encoder(mel)

    # --- cached decoding ----------------------------------------------------------------
    def setup_caches(
        self, max_batch: int, max_len: int | None = None, max_audio: int | None = None
    ):
        """Allocate self-attention caches for ``max_batch`` rows of ``max_len`` tokens (default
        n_text_ctx) and cross-attention caches for ``max_audio`` audios (default max_batch)."""
        dims, like = self.dims, self.decoder.tok_emb.weight
        max_len = max_len or dims.n_text_ctx
        max_audio = max_audio or max_batch
        head_dim = dims.n_text_state // dims.n_text_head
        for layer in self.decoder.layers:
            layer.cache = KVCache(max_batch, dims.n_text_head, max_len, head_dim, like)
            layer.cross_cache = KVCache(
                max_audio, dims.n_text_head, dims.n_audio_ctx, head_dim, like
            )
        self.max_batch, self.max_audio = max_batch, max_audio

    def ensure_caches(self, batch: int, n_audio: int) -> None:
        """(Re)allocate caches if they hold fewer than ``batch`` rows or ``n_audio`` audios."""
        if batch > self.max_batch or n_audio > self.max_audio:
            self.setup_caches(max(batch, self.max_batch), None, max(n_audio, self.max_audio))

    def set_audio(self, audio_features: Tensor) -> None:
        """Store cross-attention K/V of (A, n_audio_ctx, D) features; rows then group by audio."""
        for layer in self.decoder.layers:
            layer.set_audio(audio_features.to(self.decoder.tok_emb.weight.dtype))

    def prefill(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) at positions [0, T) -> logits (B, T, V) FP32; fills the cache."""
        return self.decoder.run(self.decoder.embed(tokens), _Pass("prefill"))

    def step(self, tokens: Tensor, positions: Tensor, kv_len: int | None = None) -> Tensor:
        """tokens (B, 1) at positions (B,) -> logits (B, V) FP32; no host sync.

        Attention reads the first ``kv_len`` cache entries (default: all), masked per row to
        ``<= positions[b]``; ``kv_len`` must exceed every position. A static ``kv_len`` bucket
        keeps the step graph-safe; ``max(positions) + 1`` reproduces an unpadded cache exactly.
        """
        kv_len = kv_len or self.decoder.layers[0].cache.k.shape[2]
        keys = torch.arange(kv_len, device=tokens.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, kv_len)
        p = _Pass("step", positions=positions, mask=mask)
        return self.decoder.run(self.decoder.embed(tokens, positions), p)[:, 0]

    def reorder_cache(self, source: Tensor) -> None:
        """Self-attention caches: row b <- row source[b] (source: (B,) long)."""
        for layer in self.decoder.layers:
            layer.reorder(source)

    # --- uncached -----------------------------------------------------------------------
    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) of tokens (B, T) on features (A, S, D), B % A == 0."""
        p = _Pass("full", audio=audio_features.to(self.decoder.tok_emb.weight.dtype))
        return self.decoder.run(self.decoder.embed(tokens), p)

    def cross_attention_scores(
        self, tokens: Tensor, audio_features: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """Logits (B, T, V) and per-layer pre-softmax cross-attention scores (A, H, B/A*T, S)."""
        scores: list[Tensor] = []
        p = _Pass(
            "full", audio=audio_features.to(self.decoder.tok_emb.weight.dtype), cross_qk=scores
        )
        return self.decoder.run(self.decoder.embed(tokens), p), scores

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        """mel (B, n_mels, 2*n_audio_ctx), tokens (B, T) -> logits (B, T, V)."""
        return self.logits(tokens, self.embed_audio(mel))


def cast_(net: WhisperNet, dtype: torch.dtype) -> WhisperNet:
    """Cast weights to ``dtype`` in place, keeping LayerNorm parameters in FP32."""
    net.to(dtype)
    for module in net.modules():
        if isinstance(module, LayerNorm):
            module.float()
    return net
