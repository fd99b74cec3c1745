"""Linear layer with its activation in the GEMM epilogue: ``act(x @ W^T + b)`` in one kernel.

The first GEMM of a feed-forward block, ``F.linear`` followed by SiLU/ReLU/GELU, writes the
(rows, hidden) output once instead of three times (GEMM store, activation load and store). Tiles
of (BLOCK_M, BLOCK_N) outputs in a grouped order (GROUP_M row tiles share the weight columns
they read, so those stay in L2), a K loop of ``tl.dot`` with float32 accumulation (IEEE float32
products for float32 inputs, tensor cores for float16/bfloat16), then bias and activation in
float32 and one rounding to the input dtype.

``W`` is read in ``nn.Linear`` layout (N, K). :func:`linear_act_ref` is the plain-torch
reference (``act(F.linear(x, W, b))``) that tests and benchmarks import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._activations import ACTIVATIONS, activate
from speechrt.kernels._utils import (
    MISSING_TL,
    MISSING_TRITON,
    as_rows,
    cdiv,
    check_float,
    check_launch,
    dot_precision,
    interpreting,
    next_power_of_2,
    out_or_empty,
)

try:  # Triton is optional: the reference works without it, the launcher needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

__all__ = ["ACTIVATIONS", "CONFIGS", "LinearConfig", "linear_act", "linear_act_ref"]

# Activation codes of the epilogue (a constexpr).


@dataclass(frozen=True)
class LinearConfig:
    """Launch configuration: tile sizes, grouped-order width, warps, pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        tiles = f"m{self.block_m}n{self.block_n}k{self.block_k}g{self.group_m}"
        return f"{tiles}w{self.num_warps}s{self.num_stages}"


# Candidates for float16/bfloat16 on an H200 (bench/conv_front_micro.py sweeps them at the
# Conformer FFN shape (rows, 256) x (2048, 256)).
CONFIGS: tuple[LinearConfig, ...] = (
    LinearConfig(128, 128, 64, 8, 8, 3),
    LinearConfig(128, 256, 64, 8, 8, 3),
    LinearConfig(128, 128, 64, 8, 4, 4),
    LinearConfig(128, 256, 32, 8, 8, 4),
    LinearConfig(64, 256, 64, 8, 4, 4),
    LinearConfig(256, 128, 64, 8, 8, 3),
    LinearConfig(128, 64, 64, 8, 4, 4),
    LinearConfig(64, 128, 64, 8, 4, 4),
)
# Float32 (IEEE dots on CUDA cores): small tiles (64 x 128 with 4 warps spills registers).
CONFIGS_FP32: tuple[LinearConfig, ...] = (
    LinearConfig(64, 64, 32, 8, 4, 2),
    LinearConfig(64, 128, 32, 8, 8, 2),
)


@triton.jit
def _linear_act_kernel(
    X,  # (M, K), row stride stride_xm, unit column stride
    W,  # (N, K), row stride stride_wn, unit column stride
    BIAS,  # (N,) (HAS_BIAS)
    Y,  # (M, N), row stride stride_ym
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M consecutive row tiles walk the column tiles together.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = W + cols.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)  # w: (BLOCK_K, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = activate(acc, ACT)
    y = Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _default_config(
    m: int, n: int, k: int, dtype: torch.dtype, device: torch.device
) -> LinearConfig:
    """Tiles: 128 x 128 x 64, 8 warps, 3 stages -- fastest of the sweep at every measured row
    count (256..16384 rows x 2048 x 256, fp16, H200: 1.0-1.43x cuBLAS linear + separate SiLU)."""
    if interpreting():  # few, large programs: the interpreter's cost is per program and op
        bm = max(16, min(256, next_power_of_2(m)))
        bn = max(16, min(256, next_power_of_2(n)))
        return LinearConfig(bm, bn, max(16, min(128, next_power_of_2(k))), 8, 4, 1)
    if dtype == torch.float32:
        return CONFIGS_FP32[0]
    return LinearConfig(128, 128, 64, 8, 8, 3)


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "swish",
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: LinearConfig | None = None,
) -> torch.Tensor:
    """``act(x @ weight^T + bias)`` with the activation applied in the GEMM epilogue.

    Args:
        x: (..., K) float32/float16/bfloat16.
        weight: (N, K) in x's dtype (``nn.Linear`` layout); bias: (N,) or None.
        activation: one of :data:`ACTIVATIONS` (swish = silu, gelu is the erf form).
        out: optional preallocated contiguous (..., N) output in ``out_dtype``.
        out_dtype: output dtype (default x's): e.g. float32 keeps a branch that feeds a float32
            residual stream unrounded.
        config: launch configuration (benchmarks sweep :data:`CONFIGS`); None picks one.
    Returns:
        (..., N) in ``out_dtype``; accumulation, bias and activation in float32.
    """
    if activation not in ACTIVATIONS:
        raise UnsupportedOptionError(
            f"activation '{activation}' has no fused linear kernel ({', '.join(ACTIVATIONS)})"
        )
    check_float("x", x)
    x2d = as_rows(x)  # (M, K)
    m, k = x2d.shape
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be (N, {k}), got {tuple(weight.shape)}")
    n = weight.shape[0]
    if weight.dtype != x.dtype:
        raise ValueError(f"weight is {weight.dtype} but x is {x.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    y = out_or_empty(out, (*x.shape[:-1], n), out_dtype or x.dtype, x.device)
    check_launch(_linear_act_kernel, *(t for t in (x2d, weight, bias) if t is not None))
    if m == 0 or n == 0:
        return y
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    cfg = config or _default_config(m, n, k, x.dtype, x.device)
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
    _linear_act_kernel[grid](
        x2d, weight, bias if bias is not None else weight, y,
        m, n, k, x2d.stride(0), weight.stride(0), n,
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation],
        **dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


_TORCH_ACT = {
    "identity": lambda h: h,
    "swish": F.silu,
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
}


def linear_act_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "swish",
    upcast: bool = False,
) -> torch.Tensor:
    """Plain torch ``act(F.linear(x, weight, bias))`` in x's dtype (float32 with ``upcast``).

    x (..., K), weight (N, K), bias (N,) or None -> (..., N).
    """
    act = _TORCH_ACT.get(activation)
    if act is None:
        raise UnsupportedOptionError(f"unknown activation '{activation}'")
    if upcast:
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
    return act(F.linear(x, weight, bias))
