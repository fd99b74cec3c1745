"""GEMM with a float32 result from half-precision inputs (no rounding of the accumulator).

A branch that joins a float32 residual stream (``h = residual + x @ W^T``) loses bits when the
GEMM writes its result in float16/bfloat16 first: for bfloat16 that rounding (8 mantissa bits)
is as large as the input rounding itself. cuBLAS can store its float32 accumulator directly:
PyTorch exposes it as ``torch.mm(a, b, out_dtype=torch.float32)`` on CUDA builds. Where that
overload is missing (CPU builds, older releases) the inputs are upcast -- exact, since every
half value is a float32 value -- and multiplied in float32, which gives the same result up to
summation order.
"""

from __future__ import annotations

import torch

__all__ = ["linear_fp32_out", "mm_fp32_out_supported"]

_SUPPORTED: dict[tuple[str, torch.dtype], bool] = {}


def mm_fp32_out_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for ``dtype`` inputs on
    ``device`` (probed once per device type and dtype with a tiny product; call it outside
    CUDA-graph capture, e.g. when an engine is built)."""
    key = (torch.device(device).type, dtype)
    if key not in _SUPPORTED:
        if dtype == torch.float32:
            _SUPPORTED[key] = True
        else:
            a = torch.zeros(2, 2, dtype=dtype, device=device)
            try:
                ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
            _SUPPORTED[key] = ok
    return _SUPPORTED[key]


def linear_fp32_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` as float32: x (..., K), weight (N, K) in x's dtype -> (..., N) float32."""
    if weight.dtype != x.dtype:
        raise ValueError(f"weight is {weight.dtype} but x is {x.dtype}")
    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    if x.dtype == torch.float32:
        y = x2d @ weight.t()
    elif mm_fp32_out_supported(x.device, x.dtype):
        y = torch.mm(x2d, weight.t(), out_dtype=torch.float32)
    else:
        y = x2d.float() @ weight.t().float()
    return y.view(*x.shape[:-1], weight.shape[0])
