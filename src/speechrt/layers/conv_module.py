"""The Conformer convolution module: pointwise conv + GLU, depthwise conv, norm, activation,
pointwise conv.

Padding (``pad_mode``):
  * ``"zero"`` (default): GLU outputs of padded frames are zero, so valid outputs never depend on
    how much padding a batch has (batch-invariant; equals WeNet run on each utterance alone).
  * ``"wenet"``: WeNet zeroes the *input* of pointwise_conv1, whose bias then leaks ``GLU(bias1)``
    into the depthwise window of the last valid frames. Reproduces WeNet's padded-batch outputs
    bit for bit; used by parity tests against WeNet batch references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechrt.layers.ffn import make_activation
from speechrt.layers.masks import lengths_to_mask
from speechrt.layers.norms import LayerNorm


class ConvModule(nn.Module):
    """(B, T, C) -> (B, T, C). ``norm`` is ``"batch_norm"`` or ``"layer_norm"``."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        activation: str = "swish",
        norm: str = "batch_norm",
        causal: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        if not causal and (kernel_size - 1) % 2:
            raise ValueError(f"a non-causal conv module needs an odd kernel, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.causal = causal
        self.lorder = kernel_size - 1 if causal else 0
        self.pw1 = nn.Conv1d(channels, 2 * channels, 1, bias=bias)
        self.dw = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            padding=0 if causal else (kernel_size - 1) // 2,
            groups=channels,
            bias=bias,
        )
        self.norm_type = norm
        self.norm = nn.BatchNorm1d(channels) if norm == "batch_norm" else LayerNorm(channels)
        self.act = make_activation(activation)
        self.pw2 = nn.Conv1d(channels, channels, 1, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None,
        cache: torch.Tensor | None = None,
        pad_mode: str = "zero",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), lengths (B,) or None (all valid), cache (B, C, K-1): the last K-1 *inputs*
        of the previous chunk (causal streaming; WeNet's ``cnn_cache``). A causal module left-pads
        its input with zeros before pointwise_conv1, as WeNet does, so the left context of the
        first frame is GLU(bias1), not zero. Returns (y (B, T, C), new_cache (B, C, K-1) or empty).
        """
        x = x.transpose(1, 2)  # (B, C, T)
        t = x.shape[2]
        valid = None
        if lengths is not None:
            valid = lengths_to_mask(lengths, t).unsqueeze(1)  # (B, 1, T)
            x = x.masked_fill(~valid, 0.0)
        if self.lorder > 0:
            if cache is None or cache.shape[2] == 0:
                x = F.pad(x, (self.lorder, 0))
            else:
                x = torch.cat([cache.to(x.dtype), x], dim=2)
            new_cache = x[:, :, -self.lorder :]
        else:
            new_cache = x.new_zeros(0, 0, 0)
        x = F.glu(self.pw1(x), dim=1)  # (B, C, lorder + T)
        if valid is not None and pad_mode == "zero" and self.lorder == 0:
            # Non-causal: padded frames would leak GLU(bias1) into the last valid frames.
            x = x.masked_fill(~valid, 0.0)
        x = self.dw(x)  # (B, C, T)
        if self.norm_type == "layer_norm":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.norm(x)
        x = self.pw2(self.act(x))
        if valid is not None:
            x = x.masked_fill(~valid, 0.0)
        return x.transpose(1, 2), new_cache
