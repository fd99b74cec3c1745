"""Row-wise log_softmax, and output projection fused with log_softmax; float32 outputs.

``log_softmax`` reads a row once to build an online (max, sum-exp), then once more to write;
rows that fit one tile (V <= 8192) are read once. ``linear_log_softmax`` tiles rows x vocab:
the first kernel computes logits with ``tl.dot`` (float32 accumulation, IEEE for float32
inputs), writes them into the output and keeps each tile's (max, sum-exp) per row; the second
combines those statistics into the log-sum-exp and subtracts it in place. Logits never pass
through half precision, so half inputs whose logits overflow float16 are still exact.
"""

import torch
import torch.nn.functional as F

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

MAX_ONE_TILE = 8192  # widest row kept in registers by log_softmax
LOOP_BLOCK = 4096  # tile width when a row is read in several tiles


@triton.jit
def _finite_or_zero(m):
    """A running max to shift by: 0 where it is still -inf, so exp(-inf - shift) = 0, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _log_softmax_kernel(
    X,  # (rows, V), row stride stride_x, unit last stride
    Y,  # (rows, V) float32
    stride_x,
    stride_y,
    V,
    BLOCK_V: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK_V)
    if ONE_TILE:
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        s = tl.sum(tl.where(mask, tl.exp(x - m), 0.0), axis=0)
        tl.store(y_row + cols, (x - m) - tl.log(s), mask=mask)
    else:
        m_i = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # per-lane running max
        s_i = tl.zeros((BLOCK_V,), tl.float32)  # per-lane sum of exp(x - m_i)
        for start in range(0, V, BLOCK_V):
            x = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf"))
            x = x.to(tl.float32)
            m_i_new = tl.maximum(m_i, x)
            shift = _finite_or_zero(m_i_new)  # lanes that saw only -inf keep s_i = 0
            s_i = s_i * tl.exp(m_i - shift) + tl.exp(x - shift)
            m_i = m_i_new
        m = _finite_or_zero(tl.max(m_i, axis=0))
        s = tl.sum(s_i * tl.exp(m_i - m), axis=0)
        log_s = tl.log(s)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + start + cols, (x - m) - log_s, mask=mask)


@triton.jit
def _linear_logits_kernel(
    X,  # (N, D), row stride stride_xn
    W,  # (V, D), row stride stride_wv
    BIAS,  # (V,) (HAS_BIAS)
    OUT,  # (N, V) float32 logits
    TMAX,  # (N, n_tiles) float32 max of each vocab tile
    TSUM,  # (N, n_tiles) float32 sum of exp(logit - tile max)
    N,
    V,
    D,
    stride_xn,
    stride_wv,
    stride_on,
    stride_tn,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_v = tl.program_id(1)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rv = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, v_ok = rm < N, rv < V
    x_ptr = X + rm.to(tl.int64)[:, None] * stride_xn + rk[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptr = W + rv.to(tl.int64)[None, :] * stride_wv + rk[:, None]  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = k0 + rk < D
        a = tl.load(x_ptr + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + k0, mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + rv, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    rm64 = rm.to(tl.int64)
    tl.store(OUT + rm64[:, None] * stride_on + rv[None, :], acc, mask=m_ok[:, None] & v_ok[None, :])
    logits = tl.where(v_ok[None, :], acc, float("-inf"))
    t_max = tl.max(logits, axis=1)  # (BLOCK_M,)
    p = tl.exp(logits - _finite_or_zero(t_max)[:, None])
    tl.store(TMAX + rm64 * stride_tn + pid_v, t_max, mask=m_ok)
    tl.store(TSUM + rm64 * stride_tn + pid_v, tl.sum(p, axis=1), mask=m_ok)


@triton.jit
def _subtract_lse_kernel(
    OUT,  # (N, V) float32 logits, rewritten in place as log-probabilities
    TMAX,  # (N, n_tiles)
    TSUM,  # (N, n_tiles)
    V,
    n_tiles,
    stride_on,
    stride_tn,
    BLOCK_TILES: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tiles = tl.arange(0, BLOCK_TILES)
    t_ok = tiles < n_tiles
    t_max = tl.load(TMAX + row * stride_tn + tiles, mask=t_ok, other=float("-inf"))
    t_sum = tl.load(TSUM + row * stride_tn + tiles, mask=t_ok, other=0.0)
    m = _finite_or_zero(tl.max(t_max, axis=0))
    s = tl.sum(t_sum * tl.exp(t_max - m), axis=0)
    log_s = tl.log(s)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ptr = OUT + row * stride_on + cols
    tl.store(ptr, (tl.load(ptr, mask=cols < V, other=0.0) - m) - log_s, mask=cols < V)


def log_softmax(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax over the last dim in float32.

    Args:
        x: (..., V) float32/float16/bfloat16, unit stride on the last dim.
        out: optional contiguous (..., V) float32 tensor.
    Returns:
        (..., V) float32 log-probabilities.
    """
    check_launch(_log_softmax_kernel, x)
    check_float("x", x)
    v = x.shape[-1]
    y = out_or_empty(out, tuple(x.shape), torch.float32, x.device)
    x2d = as_rows(x)  # (rows, V)
    y2d = y.view(-1, v)  # (rows, V)
    if x2d.shape[0] == 0 or v == 0:
        return y
    one_tile = next_power_of_2(v) <= MAX_ONE_TILE
    block = next_power_of_2(v) if one_tile else LOOP_BLOCK
    _log_softmax_kernel[(x2d.shape[0],)](
        x2d,
        y2d,
        x2d.stride(0),
        y2d.stride(0),
        v,
        BLOCK_V=block,
        ONE_TILE=one_tile,
        num_warps=min(16, max(1, block // 256)),
    )
    return y


def linear_log_softmax(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log_softmax(x @ weight.T + bias)`` in float32 without a half-precision logits tensor.

    Args:
        x: (N, D) float32/float16/bfloat16, unit stride on the last dim.
        weight: (V, D) same dtype as x, unit stride on the last dim; bias: (V,) or None.
        out: optional contiguous (N, V) float32 tensor.
    Returns:
        (N, V) float32 log-probabilities.
    """
    check_launch(_linear_logits_kernel, *(t for t in (x, weight, bias) if t is not None))
    check_float("x", x)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need x (N, D) and weight (V, D), got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} != x dtype {x.dtype}")
    (n, d), v = x.shape, weight.shape[0]
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must be ({v},), got {tuple(bias.shape)}")
    x, weight = as_rows(x), as_rows(weight)
    bias = bias.contiguous() if bias is not None else None
    y = out_or_empty(out, (n, v), torch.float32, x.device)
    if n == 0 or v == 0:
        return y
    # Tuned on an H200 at D=256, V=4233 for N=640 and N=1 (Triton 3.6, half inputs).
    if n <= 16:  # decoding steps: a GEMV, spread the vocabulary over more programs
        block_m, block_n, block_k = 16, 64, 128
    else:
        block_m, block_n, block_k = 64, 128, 64
    if x.dtype == torch.float32:
        block_k = 32
    n_tiles = cdiv(v, block_n)
    t_max, t_sum = torch.empty((2, n, n_tiles), dtype=torch.float32, device=x.device)
    _linear_logits_kernel[(cdiv(n, block_m), n_tiles)](
        x,
        weight,
        bias if bias is not None else x,
        y,
        t_max,
        t_sum,
        n,
        v,
        d,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        t_max.stride(0),
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=3,
    )
    block_v = min(1024, next_power_of_2(v))
    _subtract_lse_kernel[(n, cdiv(v, block_v))](
        y,
        t_max,
        t_sum,
        v,
        n_tiles,
        y.stride(0),
        t_max.stride(0),
        BLOCK_TILES=next_power_of_2(n_tiles),
        BLOCK_V=block_v,
        num_warps=4,
    )
    return y


def log_softmax_ref(x: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """Plain-torch log_softmax over the last dim, returned as float32; ``upcast`` computes in
    float32, otherwise in x's dtype."""
    return F.log_softmax(x.float() if upcast else x, dim=-1).float()


def linear_log_softmax_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, upcast: bool = False
) -> torch.Tensor:
    """Plain-torch ``log_softmax(F.linear(x, weight, bias))`` as float32; ``upcast`` computes
    the projection in float32, otherwise in x's dtype (half logits can overflow)."""
    if upcast:
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
    return log_softmax_ref(F.linear(x, weight, bias), upcast=upcast)
