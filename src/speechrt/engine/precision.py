"""Precision policy: which dtype each part of a model runs in.

GEMMs and attention run in the compute dtype (fp32, fp16 or bf16); LayerNorm statistics, softmax,
log-softmax and the residual stream stay in float32 ("FP32 where overflow threatens": the seeds'
FP16 LayerNorm overflowed), and so do scores that decoding accumulates. In bfloat16 the GEMMs
whose results join the residual stream also hand it their float32 accumulators unrounded (the
fused encoder's ``triton_add_ln`` / ``fp32_branches``): bfloat16's 8-bit output rounding flipped
a trained model's text where float16's did not.

A network stored in half precision keeps its normalisation layers (LayerNorm, BatchNorm and
GroupNorm parameters and statistics) in float32 (:func:`cast_keeping_norms`): rounding
LayerNorm's gain and bias to float16 alone moves a 24-block Conformer-MoE's output by a median
relative 1.9e-3 -- as much as rounding every GEMM weight (BENCHMARKS.md, session 11).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from speechrt.errors import UnsupportedOptionError

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)

_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'fp16' / torch.float16 / None (-> float32) to a torch dtype; anything else is an error."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _NAMES.values():
            return dtype
        raise UnsupportedOptionError(f"unsupported dtype {dtype} (fp32, fp16, bf16)")
    if dtype not in _NAMES:
        raise UnsupportedOptionError(f"unknown dtype '{dtype}' (fp32, fp16, bf16)")
    return _NAMES[dtype]


@dataclass(frozen=True)
class Precision:
    """compute: GEMM/attention dtype; residual: dtype of the residual stream (float32 default)."""

    compute: torch.dtype = torch.float32
    residual: torch.dtype = torch.float32

    @classmethod
    def of(cls, dtype: str | torch.dtype | None) -> Precision:
        return cls(compute=parse_dtype(dtype))


def cast_keeping_norms(
    net: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None
) -> nn.Module:
    """``net.to(device, dtype)`` except that normalisation layers (:data:`NORM_TYPES`) keep
    their floating-point parameters and buffers in float32, with their values as they were
    before the cast (not a round trip through ``dtype``). PyTorch's LayerNorm and BatchNorm take
    half-precision inputs with float32 parameters, and the fused engines read them as float32.
    Returns ``net``."""
    norms = [m for m in net.modules() if isinstance(m, NORM_TYPES)]
    saved = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in norms]
    net.to(device=device, dtype=dtype)
    for m, state in zip(norms, saved):
        m.to(dtype=torch.float32)
        m.load_state_dict(state)
    return net
