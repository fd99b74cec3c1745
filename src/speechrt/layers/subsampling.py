"""Input layers of WeNet encoders: Conv2d subsampling by 4, 6 or 8, or a linear projection.

Each reduces (B, T, F) features to (B, T', D). Output frame i of a conv stack depends only on input
frames ``[i*rate, i*rate + right_context]``; WeNet marks it valid iff all of those are valid, which
gives ``T'`` by the formulas in :meth:`Subsampling.output_lengths`.

3M-ASR slices its mask as ``x_mask[:, :, :-2:2][:, :, :-2:2]`` instead (``mask="first_frame"``): an
output frame is valid iff the *first* input frame of its window is, so a padded utterance gets a few
more valid frames than WeNet gives it (up to 2 for conv2d; they see padding); an unpadded one the
same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from speechrt.errors import UnsupportedOptionError
from speechrt.layers.norms import LayerNorm


@dataclass(frozen=True)
class _Stack:
    kernels: tuple[int, ...]
    strides: tuple[int, ...]


_STACKS = {
    "conv2d": _Stack((3, 3), (2, 2)),
    "conv2d6": _Stack((3, 5), (2, 3)),
    "conv2d8": _Stack((3, 3, 3), (2, 2, 2)),
}


class Subsampling(nn.Module):
    """``input_layer`` in WeNet: conv2d (4x), conv2d6 (6x), conv2d8 (8x) or linear (1x)."""

    def __init__(self, kind: str, idim: int, odim: int, mask: str = "full_window"):
        super().__init__()
        self.kind = kind
        self.mask = mask  # "full_window" (WeNet) | "first_frame" (3M-ASR)
        if kind == "linear":
            self.proj = nn.Linear(idim, odim)
            self.norm = LayerNorm(odim, eps=1e-5)
            self.rate, self.right_context = 1, 0
            self.convs = nn.ModuleList()
            return
        if kind not in _STACKS:
            raise UnsupportedOptionError(
                f"unknown input_layer '{kind}' (supported: linear, {', '.join(_STACKS)})"
            )
        stack = _STACKS[kind]
        self.convs = nn.ModuleList()
        freq, chans, rate, ctx = idim, 1, 1, 0
        for k, s in zip(stack.kernels, stack.strides):
            self.convs.append(nn.Conv2d(chans, odim, k, s))
            freq = (freq - k) // s + 1
            ctx += (k - 1) * rate
            rate *= s
            chans = odim
        self.rate, self.right_context = rate, ctx
        self.proj = nn.Linear(odim * freq, odim)

    def output_lengths(
        self, lengths: torch.Tensor, padded_frames: int | None = None
    ) -> torch.Tensor:
        """Valid output frames for (B,) input lengths (WeNet's mask slicing, in closed form).

        With ``mask="first_frame"`` and the batch's padded length ``padded_frames`` given, 3M-ASR's
        slicing: per conv, ``min(frames out of T, ceil(L / stride))``. Without ``padded_frames``
        every convention gives WeNet's lengths (= each utterance decoded alone).
        """
        if self.kind == "linear":
            return lengths
        out = lengths
        first = self.mask == "first_frame" and padded_frames is not None
        t = padded_frames
        for conv in self.convs:
            k, s = conv.kernel_size[0], conv.stride[0]
            if first:
                t = (t - k) // s + 1
                out = torch.clamp(torch.div(out + s - 1, s, rounding_mode="floor"), max=max(t, 0))
            else:
                out = torch.div(out - k, s, rounding_mode="floor") + 1
        return out.clamp(min=0)

    def output_frames(self, t: int) -> int:
        """Number of output frames for t input frames."""
        return int(self.output_lengths(torch.tensor([t]))[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, T', D)."""
        if self.kind == "linear":
            return self.norm(self.proj(x))
        x = x.unsqueeze(1)  # (B, 1, T, F)
        for conv in self.convs:
            x = torch.relu(conv(x))
        b, c, t, f = x.shape
        return self.proj(x.transpose(1, 2).reshape(b, t, c * f))  # (B, T', D)
