"""Split-K skinny linear on tensor cores, for decode steps of 1..16+ rows.

``y = act(LN(x) @ W^T + b)``, stored or added to a float32 residual, like
:mod:`speechrt.kernels.skinny_linear` (whose launcher calls :func:`launch_split` for a
``split`` config). A decode GEMM of 16 rows streams a 3-13 MB weight: it is latency-bound
unless the whole weight is in flight at once, which one program per column block walking K
cannot do (cuBLAS reached ~0.7-1 TB/s at 16 rows on the H200). Here program ``(n, s, m)`` owns
``BLOCK_N`` output columns of ``BLOCK_M`` (16) rows over ONE chunk ``s`` of ``BLOCK_K``
elements of K: it loads its whole weight tile ``(BLOCK_N, BLOCK_K)`` first (before the PDL
wait, so it overlaps the previous kernel), then x's chunk, and multiplies once with ``tl.dot``
(rows padded to 16). With ``cdiv(K, BLOCK_K)`` chunks, every weight byte has its own program.

Chunks of one column block are summed by the last program of the block to finish (an
acquire-release counter per (column block, row block), reset by that program, so a caller's
zeroed workspace stays zeroed): it reads every chunk's float32 partial in chunk order (the sum
is deterministic) and runs the epilogue. One chunk: the program runs the epilogue itself.

LayerNorm without a pre-pass (each program sees one chunk of the row): the LayerNorm is folded
through the GEMM. With ``g``/``beta`` its affine, ``mu``/``r`` the row's mean and 1/std,

    LN(x) @ W^T + b = r * ((x * g) @ W^T - mu * c) + d,   c = W @ g,  d = b + W @ beta,

and the same holds with x shifted by any per-row constant s (mu becomes mu - s). A chunk
multiplies ``(x - x[0]) * g`` (the row's first element as s, rounded to the weight dtype) and
accumulates float32 sums of ``x - x[0]`` and its square; the epilogue has the whole row's
statistics. ``c`` and ``d`` (float32, (N,) each) come from :func:`fold_layer_norm`, computed
once per weight by the caller. The product rounds ``(x - x[0]) * g`` instead of ``LN(x)``: an
error that scales with the row's spread, not its mean, but not the reference's bits
(``skinny_linear_ref``): bfloat16 results are about 1.5x its rounding error.
"""

from __future__ import annotations

import torch

from speechrt.kernels._activations import activate
from speechrt.kernels._pdl import gdc_launch_dependents, gdc_wait, pdl_kwargs
from speechrt.kernels._utils import (
    MISSING_TL,
    MISSING_TRITON,
    cdiv,
    check_counters,
    dot_precision,
)

try:  # Triton is optional: the reference works without it, the launcher needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

__all__ = ["bias_act_store", "fold_layer_norm", "launch_split"]


# fmt: off
@triton.jit
def _skinny_split_kernel(
    X,  # (M, K), row stride stride_xm, unit column stride
    W,  # (N, K), row stride stride_wn, unit column stride
    BIAS,  # (N,): the bias, or d of the LayerNorm fold (HAS_BIAS)
    LN_W,  # (K,) float32 LayerNorm weight g (HAS_LN_W)
    FOLD_C,  # (N,) float32 c = W @ g (HAS_LN)
    R,  # (M, N) float32 residual, row stride stride_rm, updated in place (HAS_RESIDUAL)
    Y,  # (M, N) output, row stride stride_ym (not HAS_RESIDUAL)
    PART,  # (chunks, M_PAD, N) float32 partial products (SPLIT)
    STATS,  # (chunks, column blocks, M_PAD, 2) float32 partial row sums (SPLIT and HAS_LN)
    COUNT,  # (column blocks * row blocks,) int32 zeros (SPLIT)
    M, N, K, m_pad,
    stride_xm, stride_wn, stride_rm, stride_ym,
    eps, n_chunks,
    HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_W: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,  # chunks whose partials the combining program loads at once
    USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    pid_m = tl.program_id(2)
    n_blocks = tl.num_programs(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < N
    k_ok = ks < K
    # this program's whole weight tile in flight before anything waits
    w = tl.load(W + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :],
                mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
    if HAS_LN_W:
        g = tl.load(LN_W + ks, mask=k_ok, other=0.0)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm
    x_mask = row_ok[:, None] & k_ok[None, :]
    x = tl.load(x_rows + ks[None, :], mask=x_mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_K)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = s1
    if HAS_LN:  # the chunk centred on the row's first element, and its partial sums
        shift = tl.load(X + rows.to(tl.int64) * stride_xm, mask=row_ok, other=0.0).to(tl.float32)
        x = tl.where(x_mask, x - shift[:, None], 0.0)  # centred: rounding scales with x - x[0]
        s1 = tl.sum(x, axis=1)
        s2 = tl.sum(x * x, axis=1)
        if HAS_LN_W:
            x = x * g[None, :]
    a = x.to(W.dtype.element_ty)
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), zero, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(w), zero, input_precision=INPUT_PRECISION)
    if SPLIT:
        part = PART + (chunk * m_pad + rows)[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(part, acc, mask=col_ok[None, :])
        if HAS_LN:
            st = STATS + ((chunk * n_blocks + pid_n) * m_pad + rows).to(tl.int64) * 2
            tl.store(st, s1)
            tl.store(st + 1, s2)
        tl.debug_barrier()  # every thread's partial stores are done
        slot = COUNT + pid_m * n_blocks + pid_n
        done = tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu")
        if done == n_chunks - 1:  # the last chunk of this block: sum all in chunk order
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            s2 = s1
            for c0 in range(0, n_chunks, BLOCK_S):  # BLOCK_S chunks' partials per load
                c = c0 + tl.arange(0, BLOCK_S)
                c_ok = c < n_chunks
                idx = (c[:, None, None] * m_pad + rows[None, :, None]).to(tl.int64) * N
                parts = tl.load(PART + idx + cols[None, None, :], cache_modifier=".cg",
                                mask=c_ok[:, None, None] & col_ok[None, None, :], other=0.0)
                acc += tl.sum(parts, axis=0)  # (BLOCK_M, BLOCK_N)
                if HAS_LN:
                    sums = STATS + ((c[:, None] * n_blocks + pid_n) * m_pad
                                    + rows[None, :]).to(tl.int64) * 2  # (BLOCK_S, BLOCK_M)
                    ok = c_ok[:, None]
                    s1 += tl.sum(tl.load(sums, cache_modifier=".cg", mask=ok, other=0.0), 0)
                    s2 += tl.sum(tl.load(sums + 1, cache_modifier=".cg", mask=ok, other=0.0), 0)
            _epilogue(acc, s1, s2, BIAS, FOLD_C, R, Y, rows, row_ok,
                      cols, col_ok, K, stride_rm, stride_ym, eps, HAS_BIAS, HAS_LN,
                      HAS_RESIDUAL, ACT)
            tl.atomic_xchg(slot, 0, sem="relaxed", scope="gpu")  # zeroed for the next launch
    else:
        _epilogue(acc, s1, s2, BIAS, FOLD_C, R, Y, rows, row_ok, cols,
                  col_ok, K, stride_rm, stride_ym, eps, HAS_BIAS, HAS_LN, HAS_RESIDUAL, ACT)


@triton.jit
def _epilogue(acc, s1, s2, BIAS, FOLD_C, R, Y, rows, row_ok, cols, col_ok, K,
              stride_rm, stride_ym, eps, HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr):
    """The LayerNorm fold (row statistics from the sums of x - x[0]), bias, activation, store."""
    if HAS_LN:
        m1 = s1 / K
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 / K - m1 * m1, 0.0) + eps)
        c = tl.load(FOLD_C + cols, mask=col_ok, other=0.0)
        acc = rstd[:, None] * (acc - m1[:, None] * c[None, :])  # the mean minus the shift
    bias_act_store(acc, BIAS, R, Y, rows, row_ok, cols, col_ok, stride_rm, stride_ym, HAS_BIAS,
                   HAS_RESIDUAL, ACT)


@triton.jit
def bias_act_store(acc, BIAS, R, Y, rows, row_ok, cols, col_ok, stride_rm, stride_ym,
                   HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr):
    """The skinny GEMMs' epilogue of a float32 (rows, cols) tile: + bias, activation, then
    ``R += acc`` (float32 residual) or a store to Y in its dtype."""
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = activate(acc, ACT)
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        r = R + rows.to(tl.int64)[:, None] * stride_rm + cols[None, :]
        tl.store(r, tl.load(r, mask=mask, other=0.0) + acc, mask=mask)
    else:
        y = Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
        tl.store(y, acc.to(Y.dtype.element_ty), mask=mask)
# fmt: on


def fold_layer_norm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, d)``, float32 (N,) each, folding a LayerNorm's affine through ``weight`` (N, K):
    ``c = weight @ ln_weight`` (ones if None) and ``d = bias + weight @ ln_bias`` (zeros if
    None), so that ``LN(x) @ weight^T + bias = rstd * ((x * ln_weight) @ weight^T - mean * c)
    + d``. One float32 GEMV over the weight: compute it once per weight, not per call."""
    w = weight.detach().float()
    c = w.sum(dim=1) if ln_weight is None else w @ ln_weight.detach().float()
    d = torch.zeros_like(c) if bias is None else bias.detach().float().clone()
    if ln_bias is not None:
        d += w @ ln_bias.detach().float()
    return c.contiguous(), d.contiguous()


def launch_split(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ln: tuple[torch.Tensor | None, torch.Tensor | None, float] | None,
    fold: tuple[torch.Tensor, torch.Tensor] | None,
    y2d: torch.Tensor,
    residual: bool,
    act: int,
    block_n: int,
    block_k: int,
    num_warps: int,
    counters: torch.Tensor | None,
) -> None:
    """Launch the split-K kernel: x2d (M, K), weight (N, K) with unit column strides, y2d
    (M, N) the output or (``residual``) the float32 residual; ``fold`` = :func:`fold_layer_norm`
    of (weight, bias, ln) when ``ln`` is given (computed here when None); ``counters``: a
    zeroed int32 workspace of at least cdiv(N, block_n) * cdiv(M, 16) elements, left zeroed
    (None: a fresh one); launches that share it must not overlap (one stream never does)."""
    m, k = x2d.shape
    n = weight.shape[0]
    block_m = 16
    n_blocks, m_blocks, chunks = cdiv(n, block_n), cdiv(m, block_m), cdiv(k, block_k)
    m_pad = m_blocks * block_m
    has_ln = ln is not None
    if has_ln and fold is None:
        fold = fold_layer_norm(weight, bias, ln[0], ln[1])
    split = chunks > 1
    part = stats = count = weight  # unused pointers: any tensor
    if split:
        part = torch.empty((chunks, m_pad, n), dtype=torch.float32, device=x2d.device)
        if has_ln:
            stats = torch.empty((chunks, n_blocks, m_pad, 2), dtype=torch.float32,
                                device=x2d.device)  # fmt: skip
        need = n_blocks * m_blocks
        if counters is None:
            counters = torch.zeros(need, dtype=torch.int32, device=x2d.device)
        else:
            check_counters(counters, need, x2d.device)
        count = counters
    ln_w = ln[0] if has_ln else None
    bias_arg = fold[1] if has_ln else bias
    # fmt: off
    _skinny_split_kernel[(n_blocks, chunks, m_blocks)](
        x2d, weight,
        bias_arg if bias_arg is not None else weight,
        ln_w if ln_w is not None else weight,
        fold[0] if has_ln else weight,
        y2d, y2d, part, stats, count,
        m, n, k, m_pad,
        x2d.stride(0), weight.stride(0), y2d.stride(0), y2d.stride(0),
        ln[2] if has_ln else 0.0, chunks,
        HAS_BIAS=bias_arg is not None, HAS_LN=has_ln, HAS_LN_W=ln_w is not None,
        HAS_RESIDUAL=residual, ACT=act, SPLIT=split, **dot_precision(weight.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_S=min(max(2, triton.next_power_of_2(chunks)), max(2, 8192 // (block_m * block_n))),
        **pdl_kwargs(x2d.device),
        num_warps=num_warps, num_stages=1,
    )
    # fmt: on
