"""Linear layer with the residual add and the next LayerNorm in the GEMM epilogue.

Every Conformer sublayer ends with ``branch = z @ W^T`` followed by
``h = residual + scale * (branch + b)`` and the next pre-norm ``y = LayerNorm(h)``. When the model
width D fits one tile (D <= 256: the WeNet Conformer's 256), one program owns whole output rows,
so the bias, scale, residual add and LayerNorm run on the float32 accumulator: no (M, D) branch
tensor goes through memory and no LayerNorm kernel is launched.

Each program computes (BLOCK_M, BLOCK_N) outputs, BLOCK_N the next power of two >= D (masked
columns), with a K loop of ``tl.dot`` (float32 accumulation; tensor cores for float16/bfloat16,
IEEE float32 products for float32). The epilogue updates the float32 residual stream in place
and writes ``y`` with two-pass float32 statistics of the stored h; that epilogue,
:func:`add_layer_norm_epilogue`, also ends :mod:`speechrt.kernels.fused_ffn`'s kernel.
:func:`linear_add_layer_norm_ref` is the plain-torch reference tests and benchmarks import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speechrt.errors import UnsupportedOptionError
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
    sm_count,
)

try:  # Triton is optional: the reference works without it, the launcher needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

__all__ = [
    "CONFIGS",
    "MAX_D",
    "AddLnConfig",
    "add_layer_norm_epilogue",
    "check_residual_and_params",
    "linear_add_layer_norm",
    "linear_add_layer_norm_ref",
]

MAX_D = 256  # one N tile holds a whole row


@dataclass(frozen=True)
class AddLnConfig:
    """Launch configuration: rows per program, K step, warps, pipeline stages (N = the row)."""

    block_m: int
    block_k: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"m{self.block_m}k{self.block_k}w{self.num_warps}s{self.num_stages}"


# Candidates for float16/bfloat16 at D = 256 (bench/conv_front_micro.py --part addln sweeps
# them). Shared memory per stage is (BLOCK_M + 256) * BLOCK_K * 2 bytes; all stay <= 164 KiB.
CONFIGS: tuple[AddLnConfig, ...] = (
    AddLnConfig(64, 64, 4, 3),
    AddLnConfig(64, 64, 8, 3),
    AddLnConfig(32, 64, 4, 4),
    AddLnConfig(32, 128, 4, 2),
    AddLnConfig(64, 32, 4, 4),
    AddLnConfig(64, 128, 8, 2),
    AddLnConfig(128, 64, 8, 3),
    AddLnConfig(128, 32, 8, 4),
)
# Float32 (IEEE dots on CUDA cores): a small row tile keeps the 256-wide accumulator in registers.
CONFIGS_FP32: tuple[AddLnConfig, ...] = (
    AddLnConfig(32, 32, 4, 2),
    AddLnConfig(16, 32, 4, 2),
)


@triton.jit
def add_layer_norm_epilogue(
    acc,  # (BLOCK_M, BLOCK_N) float32 branch accumulator (columns >= D are zero)
    rows,  # (BLOCK_M,) row indices of the tile
    cols,  # (BLOCK_N,) column indices, 0..BLOCK_N-1
    M,
    D,
    BIAS,  # (D,) branch bias (HAS_BIAS)
    R,  # (M, D) float32 residual stream, contiguous; updated in place
    LW,  # (D,) LayerNorm weight (HAS_LW)
    LB,  # (D,) LayerNorm bias (HAS_LB)
    Y,  # (M, D) normalised output, contiguous
    eps,
    scale,
    HAS_BIAS: tl.constexpr,
    HAS_LW: tl.constexpr,
    HAS_LB: tl.constexpr,
):
    """GEMM epilogue shared by the fused kernels: ``h = r + scale * (acc + bias)`` stored in
    place, ``y = LayerNorm(h)`` with two-pass float32 statistics of the stored h."""
    row_ok = rows < M
    col_ok = cols < D
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    r = tl.load(R + offs, mask=mask, other=0.0)
    h = r + scale * acc
    tl.store(R + offs, h, mask=mask)
    mean = tl.sum(tl.where(mask, h, 0.0), axis=1) / D
    hc = tl.where(mask, h - mean[:, None], 0.0)
    var = tl.sum(hc * hc, axis=1) / D
    y = hc * (1.0 / tl.sqrt(var + eps))[:, None]
    if HAS_LW:
        y *= tl.load(LW + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LB:
        y += tl.load(LB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _linear_add_ln_kernel(
    Z,  # (M, K), row stride stride_zm, unit column stride
    W,  # (D, K), row stride stride_wn, unit column stride
    BIAS,  # (D,) (HAS_BIAS)
    R,  # (M, D) float32 residual stream, contiguous; updated in place
    LW,  # (D,) LayerNorm weight (HAS_LW)
    LB,  # (D,) LayerNorm bias (HAS_LB)
    Y,  # (M, D) normalised output, contiguous
    M,
    D,
    K,
    stride_zm,
    stride_wn,
    eps,
    scale,
    HAS_BIAS: tl.constexpr,
    HAS_LW: tl.constexpr,
    HAS_LB: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < D
    z_rows = Z + rows.to(tl.int64)[:, None] * stride_zm
    w_cols = W + cols.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(z_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)  # w: (BLOCK_K, BLOCK_N)
    add_layer_norm_epilogue(
        acc, rows, cols, M, D, BIAS, R, LW, LB, Y, eps, scale, HAS_BIAS, HAS_LW, HAS_LB
    )


def _default_config(m: int, k: int, dtype: torch.dtype, device: torch.device) -> AddLnConfig:
    """64 x 64 K steps, 4 warps, 3 stages; 32-row tiles when 64-row ones would leave SMs idle.
    A starting point, not yet measured on the H200 (bench/conv_front_micro.py --part addln)."""
    if interpreting():  # few, large programs: the interpreter's cost is per program and op
        bm = max(16, min(128, next_power_of_2(m)))
        return AddLnConfig(bm, max(16, min(128, next_power_of_2(k))), 4, 1)
    if dtype == torch.float32:
        return CONFIGS_FP32[0]
    if cdiv(m, 64) < sm_count(device):
        return AddLnConfig(32, 64, 4, 4)
    return CONFIGS[0]


def _check_inputs(
    z: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    params: dict[str, torch.Tensor | None],
) -> None:
    """Shapes and dtypes; raises UnsupportedOptionError for D > MAX_D, ValueError otherwise."""
    check_float("z", z)
    k = z.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be (D, {k}), got {tuple(weight.shape)}")
    d = weight.shape[0]
    if d > MAX_D:
        raise UnsupportedOptionError(
            f"linear_add_layer_norm needs the output width D <= {MAX_D} (one tile), got {d}"
        )
    if weight.dtype != z.dtype:
        raise ValueError(f"weight is {weight.dtype} but z is {z.dtype}")
    check_residual_and_params("residual", residual, (*z.shape[:-1], d), params)


def check_residual_and_params(
    name: str,
    residual: torch.Tensor,
    shape: tuple[int, ...],
    params: dict[str, torch.Tensor | None],
) -> None:
    """The epilogue's operands (:func:`add_layer_norm_epilogue`): ``residual`` a contiguous
    float32 tensor of ``shape`` (..., D), each of ``params`` None or a contiguous (D,) vector."""
    if residual.dtype != torch.float32 or not residual.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous float32 tensor, got a "
            f"{'' if residual.is_contiguous() else 'non-contiguous '}{residual.dtype} one"
        )
    if tuple(residual.shape) != tuple(shape):
        raise ValueError(f"{name} must be {tuple(shape)} (rows, D), got {tuple(residual.shape)}")
    d = shape[-1]
    for pname, p in params.items():
        if p is not None and (tuple(p.shape) != (d,) or p.stride(0) != 1):
            raise ValueError(f"{pname} must be a contiguous ({d},) tensor, got {tuple(p.shape)}")


def linear_add_layer_norm(
    z: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    y_dtype: torch.dtype | None = None,
    config: AddLnConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + scale * (z @ weight^T + bias)`` in place, ``y = LayerNorm(h)``, one kernel.

    Args:
        z: (..., K) float32/float16/bfloat16 branch input (e.g. an FFN's hidden activations).
        weight: (D, K) in z's dtype (``nn.Linear`` layout), D <= 256.
        residual: (..., D) contiguous float32 residual stream; overwritten with h.
        ln_weight, ln_bias: (D,) LayerNorm affine parameters, or None.
        bias: optional (D,) bias of the linear layer; scale: branch multiplier (0.5 macaron).
        y_dtype: dtype of y (default z's dtype).
        config: launch configuration (benchmarks sweep :data:`CONFIGS`); None picks one.
    Returns:
        h: ``residual`` itself, (..., D) float32.
        y: (..., D) LayerNorm(h) in ``y_dtype``; GEMM accumulation and statistics in float32.
    """
    params = {"bias": bias, "ln_weight": ln_weight, "ln_bias": ln_bias}
    _check_inputs(z, weight, residual, params)
    d, k = weight.shape
    z2d = as_rows(z)  # (M, K)
    m = z2d.shape[0]
    y = out_or_empty(None, tuple(residual.shape), y_dtype or z.dtype, z.device)
    check_launch(
        _linear_add_ln_kernel, z, weight, residual, *(p for p in params.values() if p is not None)
    )
    if m == 0 or d == 0:
        return residual, y
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    cfg = config or _default_config(m, k, z.dtype, z.device)
    _linear_add_ln_kernel[(cdiv(m, cfg.block_m),)](
        z2d, weight, bias if bias is not None else weight, residual,
        ln_weight if ln_weight is not None else weight,
        ln_bias if ln_bias is not None else weight, y,
        m, d, k, z2d.stride(0), weight.stride(0), float(eps), float(scale),
        HAS_BIAS=bias is not None, HAS_LW=ln_weight is not None, HAS_LB=ln_bias is not None,
        **dot_precision(z.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=max(16, next_power_of_2(d)), BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return residual, y


def linear_add_layer_norm_ref(
    z: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    y_dtype: torch.dtype | None = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, residual left untouched: ``F.linear`` in z's dtype (the unfused engine's
    cuBLAS GEMM), then add and LayerNorm in float32; ``upcast`` computes everything in float64.

    z (..., K), weight (D, K), residual (..., D) -> h (..., D) float32, y (..., D) in ``y_dtype``
    (default z's dtype; float32 with ``upcast``, the most exact value a test can compare with).
    """
    work = torch.float64 if upcast else torch.float32
    if upcast:
        branch = F.linear(z.double(), weight.double())
    else:
        branch = F.linear(z, weight).to(work)
    if bias is not None:
        branch = branch + bias.to(work)
    h = residual.to(work) + scale * branch
    lw = ln_weight.to(work) if ln_weight is not None else None
    lb = ln_bias.to(work) if ln_bias is not None else None
    y = F.layer_norm(h, (h.shape[-1],), lw, lb, eps)
    if upcast:
        return h.float(), y.float()
    return h.float(), y.to(y_dtype or z.dtype)
