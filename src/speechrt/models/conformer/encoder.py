"""WeNet Conformer / Transformer encoder, reimplemented (inference only).

Conventions (WeNet's, matched exactly): CMVN inside the encoder and applied to padding too; the
input layer scales by sqrt(d) for rel_pos/abs_pos; each block is pre-norm (``normalize_before``),
macaron FFNs are scaled by 0.5, a Conformer block ends with ``norm_final``; the encoder ends with
``after_norm``. Block and final LayerNorms use ``cfg.norm_eps`` (1e-5 in WeNet).

Both feed-forwards of a block (macaron and second) are built by :func:`make_mlp` from WeNet's
``mlp_type`` (position-wise, gated, or MoE), as WeNet builds both from one ``mlp_class``.
Variants swap the second (post-conv) feed-forward: ``Encoder(cfg, input_dim, ff_factory=f)`` builds
it with ``f(cfg)``; ``forward(..., ff_context=c)`` then calls it as ``ff(x, c)`` (e.g. the
Conformer-MoE's router side input), without ``ff_context`` as ``ff(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from speechrt.layers.attention import MultiHeadAttention
from speechrt.layers.conv_module import ConvModule
from speechrt.layers.ffn import FeedForward, GatedFeedForward
from speechrt.layers.masks import AttentionSpec
from speechrt.layers.norms import LayerNorm
from speechrt.layers.positional import positions
from speechrt.layers.subsampling import Subsampling
from speechrt.models.conformer.config import EncoderConfig, MlpConfig

LN_EPS = 1e-5


def make_mlp(d_model: int, d_hidden: int, mlp: MlpConfig) -> nn.Module:
    """The feed-forward WeNet's ``mlp_type`` names, (..., D) -> (..., D).

    moe is WeNet's ``MoEFFNLayer``: a bias-free router, the top ``n_expert_activated`` experts by
    logit, weighted by the softmax over those selected logits (= the full softmax renormalised
    over them, :class:`~speechrt.layers.moe.MoEFeedForward` ``renormalize=True``).
    """
    if mlp.kind == "gated":
        return GatedFeedForward(d_model, d_hidden, mlp.activation, mlp.bias)
    if mlp.kind == "moe":
        from speechrt.layers.moe import MoEFeedForward  # imports Triton: only for MoE models

        return MoEFeedForward(
            d_model,
            d_hidden,
            mlp.n_expert,
            top_k=mlp.n_expert_activated,
            renormalize=True,
            activation=mlp.activation,
            bias=mlp.bias,
        )
    return FeedForward(d_model, d_hidden, mlp.activation, mlp.bias)


class EncoderBlock(nn.Module):
    """One Conformer block (or a Transformer block when macaron and conv are off)."""

    def __init__(self, cfg: EncoderConfig, ff: nn.Module | None = None):
        super().__init__()
        d = cfg.output_size
        eps = cfg.norm_eps
        self.normalize_before = cfg.normalize_before
        self.ff_scale = 0.5 if cfg.macaron else 1.0
        self.ff_macaron = None
        if cfg.macaron:
            self.ff_macaron = make_mlp(d, cfg.linear_units, cfg.mlp)
            self.norm_ff_macaron = LayerNorm(d, eps=eps)
        self.attn = MultiHeadAttention(d, cfg.attention_heads, rel_pos=cfg.rel_attention)
        self.norm_attn = LayerNorm(d, eps=eps)
        self.conv = None
        if cfg.conv:
            self.conv = ConvModule(
                d, cfg.cnn_module_kernel, cfg.activation_type, cfg.cnn_module_norm, cfg.causal
            )
            self.norm_conv = LayerNorm(d, eps=eps)
            self.norm_final = LayerNorm(d, eps=eps)
        self.ff = ff if ff is not None else make_mlp(d, cfg.linear_units, cfg.mlp)
        self.norm_ff = LayerNorm(d, eps=eps)

    def _sublayer(self, x, norm, fn, scale=1.0):
        y = fn(norm(x) if self.normalize_before else x)
        x = x + scale * y
        return x if self.normalize_before else norm(x)

    def forward(
        self,
        x: torch.Tensor,
        spec: AttentionSpec,
        pos: torch.Tensor | None,
        frame_lengths: torch.Tensor | None,
        att_cache: torch.Tensor | None = None,
        cnn_cache: torch.Tensor | None = None,
        pad_mode: str = "zero",
        ff_context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (x, new_att_cache (B, H, Tc+T, 2*Dk), new_cnn_cache (B, D, K-1)).

        ff_context: side input of a swapped second FFN, called as ``self.ff(h, ff_context)``.
        """
        if self.ff_macaron is not None:
            x = self._sublayer(x, self.norm_ff_macaron, self.ff_macaron, self.ff_scale)
        new_att_cache = None

        def attn(h):
            nonlocal new_att_cache
            out, new_att_cache = self.attn(h, h, spec, pos, att_cache)
            return out

        x = self._sublayer(x, self.norm_attn, attn)
        new_cnn_cache = x.new_zeros(0, 0, 0)
        if self.conv is not None:

            def conv(h):
                nonlocal new_cnn_cache
                out, new_cnn_cache = self.conv(h, frame_lengths, cnn_cache, pad_mode)
                return out

            x = self._sublayer(x, self.norm_conv, conv)
        ff = self.ff if ff_context is None else (lambda h: self.ff(h, ff_context))
        x = self._sublayer(x, self.norm_ff, ff, self.ff_scale)
        if self.conv is not None:
            x = self.norm_final(x)
        return x, new_att_cache, new_cnn_cache


class Encoder(nn.Module):
    """Features (B, T, F) -> encoder output (B, T', D) with valid lengths (B,)."""

    def __init__(
        self,
        cfg: EncoderConfig,
        input_dim: int,
        ff_factory: Callable[[EncoderConfig], nn.Module] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        d = cfg.output_size
        self.register_buffer("cmvn_mean", torch.zeros(input_dim))
        self.register_buffer("cmvn_istd", torch.ones(input_dim))
        self.subsampling = Subsampling(cfg.input_layer, input_dim, d, cfg.subsampling_mask)
        self.layers = nn.ModuleList(
            EncoderBlock(cfg, ff_factory(cfg) if ff_factory else None)
            for _ in range(cfg.num_blocks)
        )
        self.final_norm = LayerNorm(d, eps=cfg.norm_eps)  # WeNet's after_norm

    @property
    def rate(self) -> int:
        return self.subsampling.rate

    @property
    def right_context(self) -> int:
        return self.subsampling.right_context

    def _embed(self, feats: torch.Tensor, offset: int) -> torch.Tensor:
        x = self.subsampling((feats - self.cmvn_mean) * self.cmvn_istd)
        if self.cfg.pos_enc_layer_type == "no_pos":
            return x
        x = x * math.sqrt(self.cfg.output_size)
        if self.cfg.pos_enc_layer_type == "abs_pos":
            x = x + positions(offset, x.shape[1], x.shape[2], x.device, x.dtype)
        return x

    def _pos(self, offset: int, size: int, ref: torch.Tensor) -> torch.Tensor | None:
        if not self.cfg.rel_attention:
            return None
        if self.cfg.pos_enc_layer_type == "no_pos":
            return ref.new_zeros(size, self.cfg.output_size)
        return positions(offset, size, self.cfg.output_size, ref.device, ref.dtype)

    def chunk_config(self, decoding_chunk_size: int, num_left_chunks: int) -> tuple[int, int]:
        """The chunk mask WeNet applies for these decode options: (chunk_size, left) or (0, -1)."""
        if self.cfg.use_dynamic_chunk:
            if decoding_chunk_size > 0:
                return decoding_chunk_size, num_left_chunks
            return 0, -1
        if self.cfg.static_chunk_size > 0:
            return self.cfg.static_chunk_size, num_left_chunks
        return 0, -1

    def forward(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        decoding_chunk_size: int = -1,
        num_decoding_left_chunks: int = -1,
        pad_mode: str = "zero",
        ff_context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, F) raw fbank, lengths (B,) -> (out (B, T', D), out_lengths (B,)).

        ``pad_mode="wenet"`` also applies ``cfg.subsampling_mask`` to the padded batch (its
        reference's lengths); ``"zero"`` gives every utterance its own unpadded lengths.
        ff_context (B, T', C): side input passed to every block's second FFN.
        """
        x = self._embed(feats, 0)
        padded = feats.shape[1] if pad_mode == "wenet" else None
        out_lengths = self.subsampling.output_lengths(lengths, padded)
        chunk, left = self.chunk_config(decoding_chunk_size, num_decoding_left_chunks)
        spec = AttentionSpec(out_lengths, chunk_size=chunk, num_left_chunks=left)
        pos = self._pos(0, x.shape[1], x)
        for layer in self.layers:
            x, _, _ = layer(x, spec, pos, out_lengths, pad_mode=pad_mode, ff_context=ff_context)
        if self.cfg.normalize_before:
            x = self.final_norm(x)
        return x, out_lengths

    def forward_chunk(
        self,
        feats: torch.Tensor,
        offset: int,
        required_cache_size: int,
        att_cache: torch.Tensor,
        cnn_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming step (WeNet's ``forward_chunk``), batch 1.

        feats (1, T, F) one input window; offset = encoder frames emitted so far;
        att_cache (L, H, Tc, 2*Dk) and cnn_cache (L, 1, D, K-1), empty (size 0) on the first call.
        Returns (out (1, T', D), new att_cache, new cnn_cache); the att cache keeps
        ``required_cache_size`` frames (< 0: all).
        """
        x = self._embed(feats, offset)
        tc = att_cache.shape[2] if att_cache.dim() == 4 and att_cache.shape[0] > 0 else 0
        keys = tc + x.shape[1]
        pos = self._pos(offset - tc, keys, x)
        if required_cache_size < 0:
            start = 0
        elif required_cache_size == 0:
            start = keys
        else:
            start = max(keys - required_cache_size, 0)
        spec = AttentionSpec(
            torch.full((1,), keys, device=x.device, dtype=torch.long), query_offset=tc
        )
        new_att, new_cnn = [], []
        for i, layer in enumerate(self.layers):
            a_cache = att_cache[i : i + 1] if tc > 0 else None
            c_cache = cnn_cache[i] if cnn_cache.dim() == 4 and cnn_cache.shape[0] > 0 else None
            x, a, c = layer(x, spec, pos, None, a_cache, c_cache)
            new_att.append(a[:, :, start:, :])
            new_cnn.append(c.unsqueeze(0))
        if self.cfg.normalize_before:
            x = self.final_norm(x)
        return x, torch.cat(new_att, dim=0), torch.cat(new_cnn, dim=0)

    def forward_chunk_by_chunk(
        self, feats: torch.Tensor, decoding_chunk_size: int, num_decoding_left_chunks: int = -1
    ) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """Simulated streaming over a whole utterance (1, T, F) -> ((1, T', D), windows).

        windows: per chunk (input start, input end, offset passed, output frames). Trailing input
        frames that do not fill ``right_context + 1`` frames are dropped, as in WeNet.
        """
        if decoding_chunk_size <= 0:
            raise ValueError("decoding_chunk_size must be > 0 for streaming")
        context = self.right_context + 1
        stride = self.rate * decoding_chunk_size
        window = (decoding_chunk_size - 1) * self.rate + context
        required = decoding_chunk_size * num_decoding_left_chunks
        att_cache = feats.new_zeros(0, 0, 0, 0)
        cnn_cache = feats.new_zeros(0, 0, 0, 0)
        outputs, windows, offset = [], [], 0
        for cur in range(0, feats.shape[1] - context + 1, stride):
            end = min(cur + window, feats.shape[1])
            y, att_cache, cnn_cache = self.forward_chunk(
                feats[:, cur:end], offset, required, att_cache, cnn_cache
            )
            outputs.append(y)
            windows.append((cur, end, offset, y.shape[1]))
            offset += y.shape[1]
        if not outputs:
            return feats.new_zeros(1, 0, self.cfg.output_size), windows
        return torch.cat(outputs, dim=1), windows
