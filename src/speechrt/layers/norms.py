"""LayerNorm for networks whose norms stay float32 while the rest is half precision.

:func:`speechrt.engine.precision.cast_keeping_norms` stores a half-precision network with its
normalisation layers in float32 (the fused engines read those exact values). PyTorch's CUDA
LayerNorm refuses a float16 input with float32 parameters, so the torch modules use this one:
parameters in another dtype than the input are cast to it at use, which gives exactly what the
network cast as a whole computes (the same rounding of each parameter). BatchNorm takes mixed
dtypes as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose weight and bias may be in another dtype than its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w is not None and w.dtype != x.dtype:
            w = w.to(x.dtype)
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
