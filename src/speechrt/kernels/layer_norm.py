"""LayerNorm and fused residual-add + LayerNorm: Triton kernel, launchers and torch references.

``add_layer_norm`` fuses the Conformer's ``h = residual + 0.5 * ffn(x)`` with the next pre-norm
``y = LayerNorm(h)`` in one read of each input. Statistics are accumulated in float32 whatever
the input dtype; rows of any width D are handled with masks (one row must fit in a tile:
D <= 16384).
"""

import torch
import torch.nn.functional as F

from speechrt.kernels._pdl import pdl_enter, pdl_kwargs
from speechrt.kernels._utils import (
    MISSING_TL,
    MISSING_TRITON,
    as_rows,
    cdiv,
    check_float,
    check_launch,
    next_power_of_2,
    out_or_empty,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the launchers raise UnsupportedOptionError instead
    triton, tl = MISSING_TRITON, MISSING_TL

MAX_BLOCK_D = 16384
# Rows per program and warps for rows of at most 256 elements (the Conformer's D = 256); wider
# rows take 4096 // BLOCK_D rows (at most 16) and one warp per 512 elements. H200, FP16 branch +
# float32 stream, D = 256, add + LayerNorm: 3.68 us at 4,032 rows vs 3.99 with 16 rows and 8
# warps, equal at 16,320 (13.9 us; bench/results/2026-11-23_h200_s11/). Read at each launch.
NARROW_TILE = (4, 4)


@triton.jit
def _normalize(x, col_ok, D, eps, W, B, cols, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """LayerNorm of the float32 rows of x (BLOCK_M, BLOCK_D), zero outside col_ok; returns the
    affine output in float32 (zero outside col_ok)."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    y = xc * (1.0 / tl.sqrt(var + eps))[:, None]
    if HAS_W:
        y *= tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _layer_norm_kernel(
    X,  # (rows, D) input, row stride stride_x
    R,  # (rows, D) residual (read only when HAS_RESIDUAL)
    XB,  # (D,) bias added to X before scaling (HAS_XBIAS)
    W,  # (D,) LayerNorm weight (HAS_W)
    B,  # (D,) LayerNorm bias (HAS_B)
    W2,  # (D,) second LayerNorm's weight (HAS_LN2 and HAS_W2)
    B2,  # (D,) second LayerNorm's bias (HAS_LN2 and HAS_B2)
    H,  # (rows, D) new residual stream (HAS_RESIDUAL), the first LayerNorm's output (HAS_LN2),
    # or the input in another dtype (STORE_INPUT)
    Y,  # (rows, D) normalised output (of the second LayerNorm with HAS_LN2)
    stride_x,
    stride_r,
    stride_h,
    stride_y,
    n_rows,
    D,
    eps,
    eps2,
    scale,
    HAS_RESIDUAL: tl.constexpr,
    HAS_XBIAS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_LN2: tl.constexpr,
    HAS_W2: tl.constexpr,
    HAS_B2: tl.constexpr,
    STORE_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_INPUT:  # the input as H's dtype (a half-precision stream widened to float32)
        tl.store(H + rows * stride_h + cols[None, :], x.to(H.dtype.element_ty), mask=mask)
        x = x.to(H.dtype.element_ty).to(tl.float32)
    if HAS_RESIDUAL:
        if HAS_XBIAS:
            x += tl.load(XB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        r = tl.load(R + rows * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (r + scale * x).to(H.dtype.element_ty)
        if not HAS_LN2:
            tl.store(H + rows * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)  # normalise exactly the stored residual stream
    y = _normalize(x, col_ok, D, eps, W, B, cols, HAS_W, HAS_B)
    if HAS_LN2:  # the first LayerNorm's output is stored, and normalised as stored
        s = y.to(H.dtype.element_ty)
        tl.store(H + rows * stride_h + cols[None, :], s, mask=mask)
        y = _normalize(s.to(tl.float32), col_ok, D, eps2, W2, B2, cols, HAS_W2, HAS_B2)
    tl.store(Y + rows * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _check_param(name: str, p: torch.Tensor | None, d: int) -> None:
    if p is not None and (tuple(p.shape) != (d,) or p.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous ({d},) tensor, got {tuple(p.shape)}")


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    x_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: float,
    h_out: torch.Tensor | None,
    y_out: torch.Tensor | None,
    y_dtype: torch.dtype | None = None,
    ln2: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
    input_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    w2, b2, eps2 = ln2 if ln2 is not None else (None, None, 0.0)
    tensors = (x, residual, x_bias, weight, bias, w2, b2)
    check_launch(_layer_norm_kernel, *(t for t in tensors if t is not None))
    check_float("x", x)
    d = x.shape[-1]
    block_d = next_power_of_2(d)
    if block_d > MAX_BLOCK_D:
        raise ValueError(f"layer_norm supports rows of at most {MAX_BLOCK_D} elements, got {d}")
    params = (("x_bias", x_bias), ("weight", weight), ("bias", bias), ("ln2 weight", w2))
    for name, p in (*params, ("ln2 bias", b2)):
        _check_param(name, p, d)
    x2d = as_rows(x)  # (rows, D)
    n_rows = x2d.shape[0]
    y = out_or_empty(y_out, tuple(x.shape), y_dtype or x.dtype, x.device, "y_out")
    y2d = y.view(-1, d)  # (rows, D)
    h = h2d = r2d = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x {tuple(x.shape)}")
        check_float("residual", residual)
        r2d = as_rows(residual)  # (rows, D)
        h = out_or_empty(h_out, tuple(x.shape), residual.dtype, x.device, "h_out")
        h2d = h.view(-1, d)  # (rows, D)
    elif input_dtype is not None:
        h = torch.empty(tuple(x.shape), dtype=input_dtype, device=x.device)
        h2d = h.view(-1, d)  # (rows, D)
    if n_rows == 0:
        return h, y
    if block_d <= 256:
        block_m, warps = NARROW_TILE
    else:
        block_m = max(1, min(16, 4096 // block_d))
        warps = min(16, max(1, block_m * block_d // 512))
    _layer_norm_kernel[(cdiv(n_rows, block_m),)](
        x2d,
        r2d if r2d is not None else x2d,
        x_bias if x_bias is not None else x2d,
        weight if weight is not None else x2d,
        bias if bias is not None else x2d,
        w2 if w2 is not None else x2d,
        b2 if b2 is not None else x2d,
        h2d if h2d is not None else y2d,
        y2d,
        x2d.stride(0),
        r2d.stride(0) if r2d is not None else 0,
        h2d.stride(0) if h2d is not None else 0,
        y2d.stride(0),
        n_rows,
        d,
        float(eps),
        float(eps2),
        float(scale),
        HAS_RESIDUAL=residual is not None,
        HAS_XBIAS=x_bias is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_LN2=ln2 is not None,
        HAS_W2=w2 is not None,
        HAS_B2=b2 is not None,
        STORE_INPUT=residual is None and input_dtype is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=warps,
        **pdl_kwargs(x.device, cdiv(n_rows, block_m)),
    )
    return h, y


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    out: torch.Tensor | None = None,
    y_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim with float32 statistics.

    Args:
        x: (..., D) float32/float16/bfloat16, unit stride on the last dim.
        weight, bias: (D,) or None.
        out: optional contiguous (..., D) tensor of the output dtype to write into.
        y_dtype: dtype of y (default x's), e.g. float32 statistics of a half stream out as half.
    Returns:
        y: (..., D) in ``y_dtype`` (default x's dtype).
    """
    return _launch(x, None, None, weight, bias, eps, 1.0, None, out, y_dtype)[1]


def widen_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    dtype: torch.dtype = torch.float32,
    y_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x.to(dtype), layer_norm(x.to(dtype)))`` in one kernel: a stream that starts in half
    precision (the encoder's input layer) stored in float32 as it is normalised.

    Returns:
        s: (..., D) x in ``dtype``; y: (..., D) LayerNorm(s) in ``y_dtype`` (default x's).
    """
    s, y = _launch(x, None, None, weight, bias, eps, 1.0, None, None, y_dtype, input_dtype=dtype)
    return s, y


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    x_bias: torch.Tensor | None = None,
    scale: float = 1.0,
    h_out: torch.Tensor | None = None,
    y_out: torch.Tensor | None = None,
    y_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then LayerNorm: ``h = residual + scale * (x + x_bias)``, ``y = LN(h)``.

    Sums run in float32; h is rounded to residual's dtype and y normalises that rounded h, so
    ``y == layer_norm(h)`` up to float32 rounding. A float32 residual with a half x keeps the
    residual stream in float32. ``h_out=residual`` updates the residual stream in place.

    Args:
        x: (..., D) branch output (e.g. an FFN's Linear without its bias).
        residual: (..., D) residual stream, same shape as x.
        weight, bias: (D,) LayerNorm affine parameters, or None.
        x_bias: optional (D,) bias added to x before scaling.
        scale: multiplier of the branch (0.5 for the Conformer's macaron FFNs).
    Returns:
        h: (..., D) new residual stream in residual's dtype.
        y: (..., D) LayerNorm(h) in ``y_dtype`` (default x's dtype).
    """
    h, y = _launch(x, residual, x_bias, weight, bias, eps, scale, h_out, y_out, y_dtype)
    return h, y


def add_double_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    ln1: tuple[torch.Tensor | None, torch.Tensor | None, float],
    ln2: tuple[torch.Tensor | None, torch.Tensor | None, float],
    *,
    x_bias: torch.Tensor | None = None,
    scale: float = 1.0,
    s_out: torch.Tensor | None = None,
    y_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and two LayerNorms in a row, one kernel: ``s = LN1(residual + scale * (x +
    x_bias))``, ``y = LN2(s)``. The Conformer block's last sublayer ends with norm_final, whose
    output is the next block's residual stream (s), which that block normalises at once
    (norm_ff_macaron, or the encoder's final norm after the last block: y). The sum h is not
    stored.

    Sums and statistics run in float32; s is rounded to residual's dtype and y normalises that
    rounded s, so ``y == layer_norm(s)`` up to float32 rounding.

    Args:
        x, residual: (..., D) branch output and residual stream, as :func:`add_layer_norm`.
        ln1, ln2: (weight (D,) or None, bias (D,) or None, eps) of the two LayerNorms.
        x_bias, scale: as :func:`add_layer_norm`.
        s_out: optional contiguous (..., D) tensor of residual's dtype to write s into.
    Returns:
        s: (..., D) LN1(h) in residual's dtype.
        y: (..., D) LN2(s) in ``y_dtype`` (default x's dtype).
    """
    w, b, eps = ln1
    s, y = _launch(x, residual, x_bias, w, b, eps, scale, s_out, None, y_dtype, ln2=ln2)
    return s, y


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain-torch LayerNorm; ``upcast`` computes in float32 and casts back to x's dtype."""
    dtype = x.dtype
    if upcast:
        x = x.float()
    weight = weight.to(x.dtype) if weight is not None else None
    bias = bias.to(x.dtype) if bias is not None else None
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(dtype)


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    x_bias: torch.Tensor | None = None,
    scale: float = 1.0,
    upcast: bool = False,
    y_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``add_layer_norm``; ``upcast`` adds in float32 and normalises the h that
    was cast back to residual's dtype (as the kernel does); y in ``y_dtype`` (default x's)."""
    h_dtype, y_dtype = residual.dtype, y_dtype or x.dtype
    if upcast:
        x, residual = x.float(), residual.float()
        x_bias = x_bias.float() if x_bias is not None else None
    if x_bias is not None:
        x = x + x_bias.to(x.dtype)
    h = (residual + scale * x).to(h_dtype)
    y = layer_norm_ref(h.float() if upcast else h, weight, bias, eps)
    return h, y.to(y_dtype)


def add_double_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    ln1: tuple[torch.Tensor | None, torch.Tensor | None, float],
    ln2: tuple[torch.Tensor | None, torch.Tensor | None, float],
    *,
    x_bias: torch.Tensor | None = None,
    scale: float = 1.0,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``add_double_layer_norm``: the add, LN1 rounded to residual's dtype (as the
    kernel stores it), LN2 of that; ``upcast`` computes in float32."""
    _, s = add_layer_norm_ref(
        x, residual, *ln1, x_bias=x_bias, scale=scale, upcast=upcast, y_dtype=residual.dtype
    )
    y = layer_norm_ref(s.float() if upcast else s, *ln2)
    return s, y.to(x.dtype)
