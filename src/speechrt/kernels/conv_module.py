"""Conformer convolution module core: GLU -> depthwise conv1d over time -> norm -> activation.

Input is the output of ``pointwise_conv1`` (a GEMM done by the caller), laid out (B, T, 2C);
output is (B, T, C), ready for ``pointwise_conv2``. One kernel reads each GLU input K times
(once per tap, from cache) and never materialises the GLU output.

Padding, given ``lengths`` (B,):
- ``pad_mode="zero"``: GLU outputs of frames t >= lengths[b] count as 0, so valid outputs do
  not depend on how much padding a batch has.
- ``pad_mode="wenet"``: frames in [lengths[b], T) use GLU(x2[t]) as given (WeNet zeroes the
  module input before ``pointwise_conv1``, so they carry GLU(bias1)); frames outside [0, T) are
  0. WeNet's *causal* module pads its input (not the GLU output) on the left, so its left
  context is GLU(bias1) frames: pass ``cache`` filled with those to reproduce it.
Output rows t >= lengths[b] are written as zeros in both modes.

Norm ``"batch"`` expects BatchNorm folded into the depthwise weight/bias (``fold_batch_norm``);
``"layer"`` applies LayerNorm over C per frame after the depthwise conv.
"""

import torch
import torch.nn.functional as F

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._pdl import pdl_enter, pdl_kwargs
from speechrt.kernels._utils import (
    MISSING_TL,
    MISSING_TRITON,
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

ACTIVATIONS = {"identity": 0, "swish": 1, "relu": 2, "gelu": 3}
NORMS = ("batch", "layer")
PAD_MODES = ("zero", "wenet")
MAX_LAYER_NORM_C = 4096


@triton.jit
def _glu_dwconv_kernel(
    X,  # (B, T, 2C) pointwise_conv1 output; unit stride on the last dim
    W,  # (C, K) depthwise weight (BatchNorm folded in for norm="batch")
    BIAS,  # (C,) depthwise bias
    LEN,  # (B,) valid frames per row (HAS_LEN)
    CACHE,  # (B, C, K-1) GLU outputs of the frames before this chunk (HAS_CACHE)
    LNW,  # (C,) LayerNorm weight (LAYER_NORM)
    LNB,  # (C,) LayerNorm bias (LAYER_NORM)
    OUT,  # (B, T, C)
    T,
    C,
    stride_xb,
    stride_xt,
    stride_wc,
    stride_wk,
    stride_cb,
    stride_cc,
    stride_ck,
    stride_ob,
    stride_ot,
    ln_eps,
    K: tl.constexpr,
    PAD_LEFT: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_CACHE: tl.constexpr,
    ZERO_PAD: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    ACT: tl.constexpr,
    GLU: tl.constexpr,  # X holds (value, gate) halves; else X is the GLU output (B, T, C)
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    pid_b = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    length = T
    if HAS_LEN:
        length = tl.minimum(tl.load(LEN + pid_b).to(tl.int32), T)
    # GLU inputs of frame s are valid in [0, end); "zero" pads from the length on.
    if ZERO_PAD:
        end = length
    else:
        end = T
    x_row = X + pid_b.to(tl.int64) * stride_xb
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        s = t + (k - PAD_LEFT)  # input frame of tap k, (BLOCK_T,)
        m = ((s >= 0) & (s < end))[:, None] & c_ok[None, :]
        ptr = x_row + s.to(tl.int64)[:, None] * stride_xt + c[None, :]
        u = tl.load(ptr, mask=m, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_C), 0 masked
        if GLU:
            u = u * tl.sigmoid(tl.load(ptr + C, mask=m, other=0.0).to(tl.float32))
        if HAS_CACHE:
            cm = (s < 0)[:, None] & c_ok[None, :]
            cptr = CACHE + pid_b.to(tl.int64) * stride_cb + c[None, :] * stride_cc
            u += tl.load(cptr + (s + K - 1)[:, None] * stride_ck, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(W + c * stride_wc + k * stride_wk, mask=c_ok, other=0.0).to(tl.float32)
        acc += u * w[None, :]
    acc += tl.load(BIAS + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if LAYER_NORM:  # the whole of C is in this tile
        mean = tl.sum(tl.where(c_ok[None, :], acc, 0.0), axis=1) / C
        xc = tl.where(c_ok[None, :], acc - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / C
        lnw = tl.load(LNW + c, mask=c_ok, other=0.0).to(tl.float32)
        lnb = tl.load(LNB + c, mask=c_ok, other=0.0).to(tl.float32)
        acc = xc * (1.0 / tl.sqrt(var + ln_eps))[:, None] * lnw[None, :] + lnb[None, :]
    if ACT == 1:
        acc = acc * tl.sigmoid(acc)
    elif ACT == 2:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 3:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    acc = tl.where((t < length)[:, None], acc, 0.0)
    o_ptr = OUT + pid_b.to(tl.int64) * stride_ob + t.to(tl.int64)[:, None] * stride_ot + c[None, :]
    tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=(t < T)[:, None] & c_ok[None, :])


def fold_batch_norm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm1d that follows a depthwise conv into the conv.

    ``BN(conv(u)) = conv'(u)`` with ``w' = w * s`` and ``b' = (b - mean) * s + beta`` where
    ``s = gamma / sqrt(var + eps)``. Computed in float64, returned in weight's dtype.

    Args:
        weight: (C, K) or (C, 1, K) depthwise weight; bias: (C,) or None.
        running_mean, running_var, gamma, beta: (C,) BatchNorm statistics and affine (None = 1/0).
    Returns:
        (w', b'): (C, K) and (C,).
    """
    c = weight.shape[0]
    w = weight.reshape(c, -1).double()  # (C, K)
    s = (running_var.double() + eps).rsqrt()
    if gamma is not None:
        s = s * gamma.double()
    b = bias.double() if bias is not None else torch.zeros_like(s)
    b = (b - running_mean.double()) * s
    if beta is not None:
        b = b + beta.double()
    return (w * s[:, None]).to(weight.dtype), b.to(weight.dtype)


def _check_options(
    c: int, k: int, causal: bool, norm: str, activation: str, pad_mode: str, cache, return_cache
) -> None:
    if norm not in NORMS:
        raise UnsupportedOptionError(f"conv module norm must be one of {NORMS}, got {norm!r}")
    if activation not in ACTIVATIONS:
        raise UnsupportedOptionError(
            f"conv module activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}"
        )
    if pad_mode not in PAD_MODES:
        raise UnsupportedOptionError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if not causal and k % 2 == 0:
        raise UnsupportedOptionError(f"a non-causal depthwise conv needs an odd kernel, got {k}")
    if (cache is not None or return_cache) and not causal:
        raise UnsupportedOptionError("a conv cache is only defined for the causal conv module")
    if norm == "layer" and c > MAX_LAYER_NORM_C:
        raise UnsupportedOptionError(f"norm='layer' supports C <= {MAX_LAYER_NORM_C}, got {c}")


def _glu_frames(
    x2: torch.Tensor, lengths: torch.Tensor | None, start: int, pad_mode: str, glu: bool = True
):
    """GLU outputs of frames [start, T) as (B, C, T - start) float32, zeroed per pad_mode
    (``glu`` False: x2 already holds them)."""
    u = x2[:, start:].float()
    if glu:
        u = F.glu(u, dim=-1)  # (B, T', C)
    if lengths is not None and pad_mode == "zero":
        t = torch.arange(start, x2.shape[1], device=x2.device)
        u = u * (t[None, :] < lengths[:, None].to(x2.device))[..., None]
    return u.transpose(1, 2)  # (B, C, T')


def _new_cache(x2, lengths, cache, k: int, pad_mode: str, glu: bool = True) -> torch.Tensor:
    """Last K-1 GLU frames of [cache | this chunk] as (B, C, K-1)."""
    b, t, c2 = x2.shape
    dtype = cache.dtype if cache is not None else x2.dtype
    tail = _glu_frames(x2, lengths, max(0, t - (k - 1)), pad_mode, glu)  # (B, C, <=K-1)
    if tail.shape[2] < k - 1:
        prev = (
            cache.float()
            if cache is not None
            else torch.zeros(b, c2 // 2 if glu else c2, k - 1, device=x2.device)
        )
        tail = torch.cat([prev, tail], dim=2)[:, :, tail.shape[2] :]  # (B, C, K-1)
    return tail.to(dtype)


def glu_depthwise_conv(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lengths: torch.Tensor | None,
    *,
    causal: bool,
    norm: str = "batch",
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    activation: str = "swish",
    pad_mode: str = "zero",
    cache: torch.Tensor | None = None,
    return_cache: bool = False,
    out: torch.Tensor | None = None,
    glu: bool = True,
    block: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused GLU + depthwise conv1d over time + norm + activation (module docstring: padding).

    Args:
        x2: (B, T, 2C) output of pointwise_conv1, unit stride on the last dim; with ``glu``
            False its GLU output (B, T, C) instead (computed in the GEMM's epilogue by
            ``linear_act(..., "glu")``).
        weight: (C, K) or (C, 1, K) depthwise weight; bias: (C,).
        lengths: (B,) int valid frames per row, or None for all T.
        causal: left padding K-1 (any K) instead of symmetric (K-1)//2 (odd K).
        norm: "batch" (folded into weight/bias) or "layer" (ln_weight, ln_bias (C,), ln_eps).
        activation: "swish", "relu", "gelu" (exact) or "identity".
        pad_mode: "zero" or "wenet".
        cache: (B, C, K-1) GLU outputs preceding this chunk (causal only), else zeros.
        return_cache: also return the new (B, C, K-1) cache (dtype of cache, else of x2).
        out: optional contiguous (B, T, C) tensor of x2's dtype.
        block: (BLOCK_T, BLOCK_C) launch tiles, powers of two (benchmarks sweep them; BLOCK_C
            is the whole of C for norm="layer"); None picks them.
    Returns:
        y: (B, T, C) in x2's dtype, zero at frames t >= lengths[b]; and the cache if asked.
    """
    tensors = (x2, weight, bias, lengths, cache, ln_weight, ln_bias)
    check_launch(_glu_dwconv_kernel, *(t_ for t_ in tensors if t_ is not None))
    check_float("x2", x2)
    if x2.dim() != 3 or (glu and x2.shape[2] % 2 != 0) or x2.stride(2) != 1:
        want = "(B, T, 2C)" if glu else "(B, T, C)"
        raise ValueError(f"x2 must be {want} with unit last stride, got {tuple(x2.shape)}")
    b, t, c = x2.shape[0], x2.shape[1], x2.shape[2] // (2 if glu else 1)
    w = weight.reshape(c, -1)  # (C, K)
    k = w.shape[1]
    _check_options(c, k, causal, norm, activation, pad_mode, cache, return_cache)
    if tuple(bias.shape) != (c,):
        raise ValueError(f"bias must be ({c},), got {tuple(bias.shape)}")
    if norm == "layer" and (ln_weight is None or ln_bias is None):
        raise ValueError("norm='layer' needs ln_weight and ln_bias")
    if cache is not None and tuple(cache.shape) != (b, c, k - 1):
        raise ValueError(f"cache must be ({b}, {c}, {k - 1}), got {tuple(cache.shape)}")
    if lengths is not None and tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must be ({b},), got {tuple(lengths.shape)}")
    bias = bias.contiguous()
    lengths = lengths.contiguous() if lengths is not None else None
    if norm == "layer":
        ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    y = out_or_empty(out, (b, t, c), x2.dtype, x2.device)
    if b * t * c > 0:
        _launch(
            x2,
            w,
            bias,
            lengths,
            cache,
            ln_weight,
            ln_bias,
            ln_eps,
            y,
            causal,
            norm,
            activation,
            pad_mode,
            glu,
            block,
        )
    if return_cache:
        return y, _new_cache(x2, lengths, cache, k, pad_mode, glu)
    return y


def _launch(
    x2,
    w,
    bias,
    lengths,
    cache,
    ln_weight,
    ln_bias,
    ln_eps,
    y,
    causal,
    norm,
    activation,
    pad_mode,
    glu,
    block,
) -> None:
    b, t, c = y.shape
    k = w.shape[1]
    layer = norm == "layer"
    # Tuned on an H200 at B=64, T=256, C=256, K=15 (Triton 3.6). The GLU output as input (no
    # sigmoid per tap, half the bytes) is fastest with whole 256-channel rows and 4 frames:
    # 10.8 / 23.4 us at 64 x 63 / 64 x 255 frames vs 16.8 / 43.1 with the 8 x 64 tiles.
    if layer:  # one program holds all of C
        block_c = next_power_of_2(c)
        block_t = max(1, min(16, 4096 // block_c))
    elif glu:
        block_c, block_t = min(next_power_of_2(c), 64), 8
    else:
        block_c, block_t = min(next_power_of_2(c), 256), 4
    if block is not None:
        block_t, block_c = block
        if layer and block_c < c:
            raise ValueError(f"norm='layer' needs BLOCK_C >= C = {c}, got {block_c}")
    grid = (cdiv(t, block_t), b, cdiv(c, block_c))
    has_cache = cache is not None and k > 1
    _glu_dwconv_kernel[grid](
        x2,
        w,
        bias,
        lengths if lengths is not None else bias,
        cache if has_cache else bias,
        ln_weight if layer else bias,
        ln_bias if layer else bias,
        y,
        t,
        c,
        x2.stride(0),
        x2.stride(1),
        w.stride(0),
        w.stride(1),
        *(cache.stride() if has_cache else (0, 0, 0)),
        y.stride(0),
        y.stride(1),
        float(ln_eps),
        K=k,
        PAD_LEFT=k - 1 if causal else (k - 1) // 2,
        HAS_LEN=lengths is not None,
        HAS_CACHE=has_cache,
        ZERO_PAD=pad_mode == "zero",
        LAYER_NORM=layer,
        ACT=ACTIVATIONS[activation],
        GLU=glu,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=8 if block_t * block_c >= 2048 else 4,
        **pdl_kwargs(y.device, grid[0] * grid[1] * grid[2]),
    )


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swish":
        return F.silu(y)
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    return y


def glu_depthwise_conv_ref(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lengths: torch.Tensor | None,
    *,
    causal: bool,
    norm: str = "batch",
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    activation: str = "swish",
    pad_mode: str = "zero",
    cache: torch.Tensor | None = None,
    return_cache: bool = False,
    upcast: bool = False,
    glu: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch (F.glu + F.conv1d(groups=C) + norm + activation) ``glu_depthwise_conv``.

    ``upcast`` computes in float32 and casts the outputs back to x2's (cache's) dtype; ``glu``
    False: x2 is the GLU output (B, T, C).
    """
    dtype, cdtype = x2.dtype, (cache.dtype if cache is not None else x2.dtype)
    b, t, c = x2.shape[0], x2.shape[1], x2.shape[2] // (2 if glu else 1)
    w = weight.reshape(c, 1, -1)  # (C, 1, K)
    k = w.shape[2]
    _check_options(c, k, causal, norm, activation, pad_mode, cache, return_cache)
    if upcast:
        x2, w, bias = x2.float(), w.float(), bias.float()
        cache = cache.float() if cache is not None else None
        ln_weight = ln_weight.float() if ln_weight is not None else None
        ln_bias = ln_bias.float() if ln_bias is not None else None
    u = F.glu(x2, dim=-1) if glu else x2  # (B, T, C)
    if lengths is not None:
        valid = torch.arange(t, device=x2.device)[None, :] < lengths[:, None].to(x2.device)
        if pad_mode == "zero":
            u = u.masked_fill(~valid[..., None], 0.0)
    u = u.transpose(1, 2)  # (B, C, T)
    if causal:
        left = cache.to(u.dtype) if cache is not None else u.new_zeros(b, c, k - 1)
        u = torch.cat([left, u], dim=2)  # (B, C, K-1+T)
        new_cache = u[:, :, u.shape[2] - (k - 1) :]  # (B, C, K-1)
        y = F.conv1d(u, w.to(u.dtype), bias.to(u.dtype), groups=c)
    else:
        new_cache = None
        y = F.conv1d(u, w.to(u.dtype), bias.to(u.dtype), padding=(k - 1) // 2, groups=c)
    y = y.transpose(1, 2)  # (B, T, C)
    if norm == "layer":
        y = F.layer_norm(y, (c,), ln_weight.to(y.dtype), ln_bias.to(y.dtype), ln_eps)
    y = _activate(y, activation)
    if lengths is not None:
        y = y.masked_fill(~valid[..., None], 0.0)
    y = y.to(dtype)
    if return_cache:
        return y, new_cache.to(cdtype)
    return y
