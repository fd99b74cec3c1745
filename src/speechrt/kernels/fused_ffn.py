"""A whole feed-forward block, its residual add and the next LayerNorm in one kernel.

The Conformer's FFN sublayer is ``z = act(y @ W1^T + b1)`` (rows x H hidden), then
``h = x + scale * (z @ W2^T + b2)`` and the next pre-norm ``y' = LayerNorm(h)``. Run as
:func:`~speechrt.kernels.linear_act.linear_act` then
:func:`~speechrt.kernels.linear_add_layer_norm.linear_add_layer_norm`, the (rows, H) hidden
tensor is written once and read once (H = 2048 at D = 256: 8x the bytes of the stream). Here it
never leaves the chip: one program owns BLOCK_M whole rows (D <= 256, BLOCK_N the next power of
two >= D, masked columns) and walks H in chunks of BLOCK_H::

    a = y[rows, :]                                  (BLOCK_M, BLOCK_N), loaded once
    for each chunk c of H:
        z = act(a @ W1[c, :]^T + b1[c])             float32 accumulator, tl.dot
        z = round(z, compute dtype)                 as linear_act stores its output
        acc += z @ W2[:, c]^T                       (BLOCK_M, BLOCK_N) float32
    epilogue: + b2, * scale, + x (float32, in place), two-pass float32 LayerNorm -> y'

so the result equals ``linear_act`` followed by ``linear_add_layer_norm`` up to the order of the
float32 sums. The epilogue is :func:`~speechrt.kernels.linear_add_layer_norm.
add_layer_norm_epilogue`, shared with that kernel. Each program reads all of W1 and W2 (from L2),
so the kernel needs many rows to fill the GPU: ``rows / BLOCK_M`` programs, one per SM at most.
:func:`ffn_add_layer_norm_ref` is the plain-torch reference tests and benchmarks import.
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
    sm_count,
)
from speechrt.kernels.linear_act import linear_act_ref
from speechrt.kernels.linear_add_layer_norm import (
    MAX_D,
    add_layer_norm_epilogue,
    check_residual_and_params,
)

try:  # Triton is optional: the reference works without it, the launcher needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

__all__ = [
    "ACTIVATIONS",
    "CONFIGS",
    "MAX_D",
    "FfnConfig",
    "default_config",
    "ffn_add_layer_norm",
    "ffn_add_layer_norm_ref",
]


@dataclass(frozen=True)
class FfnConfig:
    """Launch configuration: rows per program, hidden chunk, warps, pipeline stages."""

    block_m: int
    block_h: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"m{self.block_m}h{self.block_h}w{self.num_warps}s{self.num_stages}"


# Candidates for float16/bfloat16 at D <= 256 (BLOCK_N = 256), swept by bench/ffn_micro.py.
# The (BLOCK_M, 256) float32 accumulator takes BLOCK_M * 256 / (32 * warps) registers a thread.
# Compiled offline for sm_90 (Triton 3.9 + ptxas: registers a thread, spill bytes, shared
# memory): 64-row tiles with 8 warps take ~230 registers without spills (wgmma, cp.async
# pipeline; h64 s2 160 KiB, h64 s3 224 KiB, h32 s3 128 KiB); with 4 warps they spill ~480
# bytes; 128-row tiles spill ~630 bytes with 8 warps and ~700 with 16 (128 registers); 32-row
# tiles run mma.sync (wgmma needs 64 rows), 245 registers, no spills; BLOCK_H 128 fits one stage
# only (s2: 288 KiB). Measured on the H200 (session 4): the spilling 128-row h32 s3 entry is the
# fastest at 16,384 rows (0.147 ms at H=2048), 32-row h64 s3 below ~17k rows.
CONFIGS: tuple[FfnConfig, ...] = (
    FfnConfig(64, 64, 8, 2),
    FfnConfig(64, 32, 8, 3),
    FfnConfig(64, 32, 8, 4),
    FfnConfig(64, 64, 8, 3),
    FfnConfig(64, 32, 8, 2),
    FfnConfig(32, 32, 4, 3),
    FfnConfig(32, 32, 4, 4),
    FfnConfig(32, 64, 4, 3),
    FfnConfig(128, 32, 8, 3),
    FfnConfig(64, 128, 8, 1),
)
# Float32 (IEEE dots on CUDA cores): 32 x 32 with 8 warps (164 registers) and 16-row tiles
# (4 warps: 202) compile without spills; 32 x 32 with 4 warps spills.
CONFIGS_FP32: tuple[FfnConfig, ...] = (
    FfnConfig(32, 32, 8, 2),
    FfnConfig(16, 32, 4, 2),
)


@triton.jit
def _ffn_add_ln_kernel(
    YIN,  # (M, D) FFN input, row stride stride_ym, unit column stride
    W1,  # (H, D) first linear, row stride stride_w1, unit column stride
    B1,  # (H,) (HAS_B1)
    W2,  # (D, H) second linear, row stride stride_w2, unit column stride
    B2,  # (D,) (HAS_B2)
    R,  # (M, D) float32 residual stream, contiguous; updated in place
    LW,  # (D,) LayerNorm weight (HAS_LW)
    LB,  # (D,) LayerNorm bias (HAS_LB)
    Y,  # (M, D) normalised output, contiguous
    M,
    D,
    H,
    stride_ym,
    stride_w1,
    stride_w2,
    eps,
    scale,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    HAS_LW: tl.constexpr,
    HAS_LB: tl.constexpr,
    ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < D
    a_ptr = YIN + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    a = tl.load(a_ptr, mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
    if UPCAST:
        a = a.to(tl.float32)
    w1_cols = W1 + cols[:, None]  # W1^T chunk: (BLOCK_N, BLOCK_H), element [n, j] = W1[h0+j, n]
    w2_rows = W2 + cols.to(tl.int64)[None, :] * stride_w2  # W2^T chunk: (BLOCK_H, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        w1 = tl.load(
            w1_cols + hs.to(tl.int64)[None, :] * stride_w1,
            mask=col_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        w2 = tl.load(w2_rows + hs[:, None], mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            w1, w2 = w1.to(tl.float32), w2.to(tl.float32)
        z = tl.dot(a, w1, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_H) float32
        if HAS_B1:  # masked hidden columns stay act(0) = 0 and meet zero W2 rows
            z += tl.load(B1 + hs, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        z = activate(z, ACT).to(YIN.dtype.element_ty)  # the rounding of linear_act's output
        if UPCAST:
            z = z.to(tl.float32)
        acc = tl.dot(z, w2, acc, input_precision=INPUT_PRECISION)
    add_layer_norm_epilogue(
        acc, rows, cols, M, D, B2, R, LW, LB, Y, eps, scale, HAS_B2, HAS_LW, HAS_LB
    )


def default_config(m: int, d: int, h: int, dtype: torch.dtype, device: torch.device) -> FfnConfig:
    """The launch configuration used when none is given, for ``m`` rows, width ``d`` and hidden
    ``h``: the H200 sweep's best (bench/ffn_micro.py, BENCHMARKS.md session 4) -- 128-row tiles
    with 32-wide hidden chunks (8 warps, 3 stages) when they fill the SMs (16,384 rows: 0.147 ms
    at D=256, H=2048), else 32-row tiles with 64-wide chunks (4 warps, 3 stages)."""
    if interpreting():  # few, large programs: the interpreter's cost is per program and op
        bm = max(16, min(64, next_power_of_2(m)))
        return FfnConfig(bm, max(16, min(128, next_power_of_2(h))), 4, 1)
    if dtype == torch.float32:
        return CONFIGS_FP32[0]
    if cdiv(m, 128) < sm_count(device):
        return FfnConfig(32, 64, 4, 3)
    return FfnConfig(128, 32, 8, 3)


def _check_inputs(
    y: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    x: torch.Tensor,
    b1: torch.Tensor | None,
    params: dict[str, torch.Tensor | None],
    activation: str,
) -> None:
    """Shapes and dtypes; UnsupportedOptionError for D > MAX_D or an unknown activation."""
    if activation not in ACTIVATIONS:
        raise UnsupportedOptionError(
            f"activation '{activation}' has no fused FFN kernel ({', '.join(ACTIVATIONS)})"
        )
    check_float("y", y)
    d = y.shape[-1]
    if d > MAX_D:
        raise UnsupportedOptionError(
            f"ffn_add_layer_norm needs the model width D <= {MAX_D} (one tile), got {d}"
        )
    if w1.dim() != 2 or w1.shape[1] != d:
        raise ValueError(f"w1 must be (H, {d}), got {tuple(w1.shape)}")
    h = w1.shape[0]
    if tuple(w2.shape) != (d, h):
        raise ValueError(f"w2 must be ({d}, {h}) (D, H), got {tuple(w2.shape)}")
    for name, w in (("w1", w1), ("w2", w2)):
        if w.dtype != y.dtype:
            raise ValueError(f"{name} is {w.dtype} but y is {y.dtype}")
    if b1 is not None and (tuple(b1.shape) != (h,) or b1.stride(0) != 1):
        raise ValueError(f"b1 must be a contiguous ({h},) tensor, got {tuple(b1.shape)}")
    check_residual_and_params("x", x, tuple(y.shape), params)


def ffn_add_layer_norm(
    y: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    b2: torch.Tensor | None = None,
    scale: float = 1.0,
    activation: str = "swish",
    y_dtype: torch.dtype | None = None,
    config: FfnConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x += scale * (act(y @ w1^T + b1) @ w2^T + b2)`` in place and ``LayerNorm(x)``, one
    kernel; the (rows, H) hidden activations never go through memory.

    Args:
        y: (..., D) float32/float16/bfloat16 FFN input (the pre-norm output), D <= 256.
        w1: (H, D), b1: (H,) or None -- the first linear (``nn.Linear`` layout), y's dtype.
        w2: (D, H) in y's dtype; b2: optional (D,) -- the second linear.
        x: (..., D) contiguous float32 residual stream; overwritten with the new stream.
        ln_weight, ln_bias: (D,) LayerNorm affine parameters, or None; eps its epsilon.
        scale: branch multiplier (0.5 for the Conformer's macaron FFNs).
        activation: one of :data:`ACTIVATIONS` (swish = silu, gelu is the erf form).
        y_dtype: dtype of the normalised output (default y's dtype).
        config: launch configuration (benchmarks sweep :data:`CONFIGS`); None picks one.
    Returns:
        x: the residual stream itself, (..., D) float32.
        y': (..., D) LayerNorm(x) in ``y_dtype``. Both GEMMs accumulate in float32; the hidden
        activations are rounded to y's dtype (as :func:`~speechrt.kernels.linear_act.linear_act`
        stores them); the statistics are float32.
    """
    params = {"b2": b2, "ln_weight": ln_weight, "ln_bias": ln_bias}
    _check_inputs(y, w1, w2, x, b1, params, activation)
    h, d = w1.shape
    y2d = as_rows(y)  # (M, D)
    m = y2d.shape[0]
    out = out_or_empty(None, tuple(x.shape), y_dtype or y.dtype, y.device)
    tensors = (y2d, w1, w2, x, b1, *params.values())
    check_launch(_ffn_add_ln_kernel, *(t for t in tensors if t is not None))
    if m == 0 or d == 0:
        return x, out
    w1, w2 = (w if w.stride(1) == 1 else w.contiguous() for w in (w1, w2))
    cfg = config or default_config(m, d, h, y.dtype, y.device)
    _ffn_add_ln_kernel[(cdiv(m, cfg.block_m),)](
        y2d, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, x,
        ln_weight if ln_weight is not None else w2, ln_bias if ln_bias is not None else w2, out,
        m, d, h, y2d.stride(0), w1.stride(0), w2.stride(0), float(eps), float(scale),
        HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        HAS_LW=ln_weight is not None, HAS_LB=ln_bias is not None,
        ACT=ACTIVATIONS[activation], **dot_precision(y.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=max(16, next_power_of_2(d)), BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return x, out


def ffn_add_layer_norm_ref(
    y: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    b2: torch.Tensor | None = None,
    scale: float = 1.0,
    activation: str = "swish",
    y_dtype: torch.dtype | None = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, x left untouched: float32 ``linear -> act``, the hidden rounded to y's dtype
    (the kernel's one rounding), float32 ``linear -> add -> LayerNorm``. ``upcast`` computes
    everything in float64 without rounding the hidden: the exact FFN of the given inputs, the
    most exact value a test can compare with.

    y (..., D), w1 (H, D), b1 (H,) or None, w2 (D, H), b2 (D,) or None, x (..., D) ->
    new stream (..., D) float32, LayerNorm of it (..., D) in ``y_dtype`` (default y's dtype;
    float32 with ``upcast``).
    """
    work = torch.float64 if upcast else torch.float32

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(work)

    hidden = linear_act_ref(cast(y), cast(w1), cast(b1), activation)  # (..., H) in work
    if not upcast:
        hidden = hidden.to(y.dtype).to(work)
    h = x.to(work) + scale * F.linear(hidden, cast(w2), cast(b2))
    out = F.layer_norm(h, (h.shape[-1],), cast(ln_weight), cast(ln_bias), eps)
    return h.float(), out.float() if upcast else out.to(y_dtype or y.dtype)
