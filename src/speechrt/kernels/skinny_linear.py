"""Skinny linear: ``y = act(LN(x) @ W^T + b)`` for a few rows (decode steps), bandwidth-bound.

A decode step multiplies 1..16 rows by each weight matrix, so its GEMMs only stream weights:
the time is the weight bytes over memory bandwidth, plus launch overhead. This kernel streams
every weight row once and fuses what a decoder layer puts around its GEMMs, so a pre-LN
transformer layer needs one launch per GEMM:

* prologue ``ln``: LayerNorm of the input rows with float32 statistics over the full row (x is
  then the float32 residual stream); each K block is normalised on the fly and cast to the
  weight dtype before the multiply, as a separate LayerNorm kernel writing that dtype would;
* epilogue: bias, activation (``identity`` or exact erf ``gelu``) in float32, then either a
  store in ``out_dtype`` or ``residual += y`` in place on a float32 (M, N) residual stream.

Two kernels, chosen by the launch configuration:

* whole-row (``use_dot`` off, ``block_k`` 0, the default for up to 4 rows): program ``n`` loads
  its ``BLOCK_N`` weight rows over ALL of K in one tile (K padded to a power of two, the padding
  masked off) before anything else, so every byte it needs is in flight at once: a decode GEMV
  is latency-bound, and a loop over K that waits for each chunk (Triton pipelines only loads
  that feed ``tl.dot``) reached ~1 TB/s on the H200. The rows (1..4) then reuse the tile from
  registers: LayerNorm statistics from the whole row in one pass, a broadcast multiply and
  ``tl.sum`` on CUDA cores;
* K loop (``block_k`` > 0): program ``(n, m)`` owns ``BLOCK_N`` output columns of ``BLOCK_M``
  rows and walks K in ``BLOCK_K`` steps: a broadcast multiply + ``tl.sum``, or with more rows
  (``use_dot``) a pipelined ``tl.dot`` with the rows padded to 16.

Small ``BLOCK_N`` gives enough programs to fill the SMs without split-K (results are
deterministic: no atomics). Accumulation is float32 throughout. On Hopper both kernels launch
with programmatic dependent launch (``kernels._pdl``): the whole-row kernel issues its weight
loads before it waits for the previous kernel, so in a decode step they overlap that kernel.

``W`` is read in ``nn.Linear`` layout (N, K). :func:`skinny_linear_ref` is the plain-torch
reference that tests and benchmarks import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._activations import activate
from speechrt.kernels._pdl import gdc_launch_dependents, gdc_wait, pdl_kwargs
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
from speechrt.kernels.skinny_split import bias_act_store, launch_split

try:  # Triton is optional: the reference works without it, the launcher needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

__all__ = [
    "ACTIVATIONS",
    "CONFIGS",
    "SkinnyConfig",
    "default_config",
    "skinny_linear",
    "skinny_linear_ref",
]

MAX_ROW_TILE = 32768  # weight elements a whole-row program holds (BLOCK_N x next_pow2(K))
MAX_ROW_ROWS = 4  # rows the whole-row kernel takes (each reuses the weight tile)
# Default programs per SM of the whole-row kernel (0: one program per column block); a module
# attribute so that benchmarks can compare both in one process.
DEFAULT_PERSIST = 0
# Steps of more than MAX_ROW_ROWS rows (or from MANY_ROWS_FROM rows, to compare at fewer) take
# MANY_ROWS: "dot" (K loop on tensor cores, rows padded to 16) or "split" (split-K,
# kernels.skinny_split); module attributes for the same reason.
MANY_ROWS = "dot"
MANY_ROWS_FROM = MAX_ROW_ROWS + 1

# Epilogue activations (codes of speechrt.kernels._activations.activate).
ACTIVATIONS = {"identity": 0, "gelu": 3}

LnParams = tuple[torch.Tensor | None, torch.Tensor | None, float]


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch configuration.

    use_dot: ``tl.dot`` with the rows padded to 16 (else broadcast multiply + ``tl.sum``);
    block_m: at most this many rows per program (the launcher uses the next power of two of
    the row count below it, and at least 16 with ``use_dot``); block_n: output columns per
    program; block_k: K elements per loop step, or 0 (not with ``use_dot``): the whole-row
    kernel, one tile over all of K (at most :data:`MAX_ROW_TILE` weight elements per program);
    persist (whole-row kernel): 0, one program per column block, or P > 0, at most P programs
    per SM, each walking several column blocks with the next block's weights in flight;
    split: the split-K tensor-core kernel (:mod:`speechrt.kernels.skinny_split`): one program
    per (``block_n`` columns, ``block_k`` chunk of K, 16 rows); use_dot, block_m, num_stages
    and persist are then unused. See :func:`split_config`.
    """

    use_dot: bool
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    persist: int = 0
    split: bool = False

    def __str__(self) -> str:
        if self.split:
            return f"split_n{self.block_n}k{self.block_k}w{self.num_warps}"
        kind = "dot" if self.use_dot else "sum"
        k = self.block_k or "all"
        tiles = f"m{self.block_m}n{self.block_n}k{k}"
        persist = f"p{self.persist}" if self.persist else ""
        return f"{kind}_{tiles}w{self.num_warps}s{self.num_stages}{persist}"


# Candidates for bench/skinny_micro.py (float16/bfloat16 on an H200, Whisper decode shapes).
CONFIGS: tuple[SkinnyConfig, ...] = (
    *(
        SkinnyConfig(False, 4, bn, 0, w, 1, p)
        for p in (1, 2, 3)
        for bn in (2, 4, 8)
        for w in (4, 8)
    ),
    *(SkinnyConfig(False, 4, bn, 0, w, 1) for bn in (1, 2, 4, 8, 16) for w in (4, 8)),
    SkinnyConfig(False, 1, 8, 512, 4, 3),
    SkinnyConfig(False, 1, 16, 256, 4, 3),
    SkinnyConfig(False, 1, 32, 256, 4, 3),
    SkinnyConfig(False, 1, 64, 128, 4, 3),
    SkinnyConfig(False, 4, 8, 256, 4, 3),
    SkinnyConfig(False, 4, 16, 128, 4, 3),
    SkinnyConfig(True, 16, 16, 256, 4, 3),
    SkinnyConfig(True, 16, 32, 128, 4, 3),
    SkinnyConfig(True, 16, 64, 128, 4, 3),
    SkinnyConfig(True, 16, 32, 256, 8, 3),
    *(
        SkinnyConfig(True, 16, bn, bk, 4, stages)
        for bn in (16, 32)
        for bk in (128, 256)
        for stages in (4, 6)
    ),
    *(
        SkinnyConfig(True, 16, bn, bk, w, 1, split=True)
        for bn in (16, 32, 64)
        for bk in (128, 256, 512)
        for w in (4, 8)
        if bn * bk <= 16384
    ),
)


def split_config(block_n: int, block_k: int, num_warps: int = 4) -> SkinnyConfig:
    """A split-K configuration (see :class:`SkinnyConfig`)."""
    return SkinnyConfig(True, 16, block_n, block_k, num_warps, 1, split=True)


# fmt: off
@triton.jit
def _row_stats(x_rows, row_ok, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 mean and 1/std of BLOCK_M rows of K elements (two passes over the rows)."""
    total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks < K)[None, :]
        total += tl.load(x_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(total, axis=1) / K
    total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks < K)[None, :]
        xk = tl.load(x_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, xk - mean[:, None], 0.0)
        total += xc * xc
    var = tl.sum(total, axis=1) / K
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _skinny_linear_kernel(
    X,  # (M, K), row stride stride_xm, unit column stride
    W,  # (N, K), row stride stride_wn, unit column stride
    BIAS,  # (N,) (HAS_BIAS)
    LN_W, LN_B,  # (K,) float32 LayerNorm affine (HAS_LN_W / HAS_LN_B)
    R,  # (M, N) float32 residual, row stride stride_rm, updated in place (HAS_RESIDUAL)
    Y,  # (M, N) output, row stride stride_ym (not HAS_RESIDUAL)
    M, N, K,
    stride_xm, stride_wn, stride_rm, stride_ym,
    eps,
    HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_W: tl.constexpr,
    HAS_LN_B: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    w_rows = W + cols.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
    if HAS_LN:
        mean, rstd = _row_stats(x_rows, row_ok, K, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_LN:  # normalise in float32, round to the weight dtype (masked K: w is 0)
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if HAS_LN_W:
                a *= tl.load(LN_W + ks, mask=k_ok, other=0.0)[None, :]
            if HAS_LN_B:
                a += tl.load(LN_B + ks, mask=k_ok, other=0.0)[None, :]
            a = a.to(W.dtype.element_ty)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_N)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        else:  # (BLOCK_M, 1, BLOCK_K) * (1, BLOCK_N, BLOCK_K) summed over K
            prod = a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, axis=2)
    bias_act_store(acc, BIAS, R, Y, rows, row_ok, cols, col_ok, stride_rm, stride_ym, HAS_BIAS,
                   HAS_RESIDUAL, ACT)


@triton.jit
def _row_input(x_row, row_ok, ks, k_ok, K, eps, ln_w, ln_b, W,
               HAS_LN: tl.constexpr, HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr,
               ROUND: tl.constexpr):
    """One input row (K_PAD,) as the multiply reads it: LN(x) rounded to W's dtype (ROUND 0),
    to float16 (1) or bfloat16 (2) for int8 weights, or x."""
    a = tl.load(x_row + ks, mask=k_ok & row_ok, other=0.0)
    if HAS_LN:  # float32 statistics of the whole row, rounded to the weight dtype
        a = a.to(tl.float32)
        mean = tl.sum(a, axis=0) / K
        a = tl.where(k_ok, a - mean, 0.0)
        a *= 1.0 / tl.sqrt(tl.sum(a * a, axis=0) / K + eps)
        if HAS_LN_W:
            a *= ln_w
        if HAS_LN_B:
            a += ln_b
        if ROUND == 1:
            a = a.to(tl.float16)
        elif ROUND == 2:
            a = a.to(tl.bfloat16)
        else:
            a = a.to(W.dtype.element_ty)
    return a.to(tl.float32)


@triton.jit
def _skinny_rows_kernel(
    X,  # (M, K), row stride stride_xm, unit column stride
    W,  # (N, K), row stride stride_wn, unit column stride
    BIAS,  # (N,) (HAS_BIAS)
    LN_W, LN_B,  # (K,) float32 LayerNorm affine (HAS_LN_W / HAS_LN_B)
    R,  # (M, N) float32 residual, row stride stride_rm, updated in place (HAS_RESIDUAL)
    Y,  # (M, N) output, row stride stride_ym (not HAS_RESIDUAL)
    M, N, K,
    stride_xm, stride_wn, stride_rm, stride_ym,
    eps,
    HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_W: tl.constexpr,
    HAS_LN_B: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program (program_id(1) picks the row block)
    BLOCK_N: tl.constexpr, K_PAD: tl.constexpr, PERSIST: tl.constexpr, USE_PDL: tl.constexpr,
    SCALE,  # (N,) float32 per-output-channel scale of int8 weights (HAS_SCALE)
    HAS_SCALE: tl.constexpr, ROUND: tl.constexpr,
):
    """Program p owns column block p, or with PERSIST walks the blocks p, p + P, ... (P programs
    on axis 0), the next block's weight tile loaded before the current one is multiplied."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    ks = tl.arange(0, K_PAD)
    k_ok = ks < K
    lane = tl.arange(0, BLOCK_N)
    w_cols = W + ks[None, :]
    cols = pid * BLOCK_N + lane
    # every weight byte of the first block in flight first: (BLOCK_N, K_PAD)
    w = tl.load(w_cols + cols.to(tl.int64)[:, None] * stride_wn,
                mask=(cols < N)[:, None] & k_ok[None, :], other=0.0)
    ln_w = tl.zeros([K_PAD], dtype=tl.float32)
    ln_b = tl.zeros([K_PAD], dtype=tl.float32)
    if HAS_LN_W:
        ln_w = tl.load(LN_W + ks, mask=k_ok, other=0.0)
    if HAS_LN_B:
        ln_b = tl.load(LN_B + ks, mask=k_ok, other=0.0)
    if USE_PDL:  # the weights are in flight: wait for x, then let the next kernel start
        gdc_wait()
        gdc_launch_dependents()
    row0 = tl.program_id(1).to(tl.int64) * ROWS
    if not PERSIST:  # one column block per program
        _rows_block(X, w, BIAS, R, Y, M, N, K, stride_xm, stride_rm, stride_ym, eps, ln_w, ln_b,
                    W, cols, ks, k_ok, row0, ln_w, False, HAS_BIAS, HAS_LN, HAS_LN_W, HAS_LN_B,
                    HAS_RESIDUAL, ACT, ROWS, SCALE, HAS_SCALE, ROUND)
    else:
        a0 = ln_w  # unused unless ROWS == 1
        if ROWS == 1:  # the one row is normalised once for all blocks
            a0 = _row_input(X + row0 * stride_xm, (tl.zeros_like(ks) + row0) < M, ks, k_ok, K,
                            eps, ln_w, ln_b, W, HAS_LN, HAS_LN_W, HAS_LN_B, ROUND)
        for blk in range(pid, tl.cdiv(N, BLOCK_N), n_progs):
            cols = blk * BLOCK_N + lane
            nxt = cols + n_progs * BLOCK_N
            w_next = tl.load(w_cols + nxt.to(tl.int64)[:, None] * stride_wn,
                             mask=(nxt < N)[:, None] & k_ok[None, :], other=0.0)
            _rows_block(X, w, BIAS, R, Y, M, N, K, stride_xm, stride_rm, stride_ym, eps, ln_w,
                        ln_b, W, cols, ks, k_ok, row0, a0, ROWS == 1, HAS_BIAS, HAS_LN, HAS_LN_W,
                        HAS_LN_B, HAS_RESIDUAL, ACT, ROWS, SCALE, HAS_SCALE, ROUND)
            w = w_next


@triton.jit
def _rows_block(X, w, BIAS, R, Y, M, N, K, stride_xm, stride_rm, stride_ym, eps, ln_w, ln_b, W,
                cols, ks, k_ok, row0, a0, HAS_A0: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_W: tl.constexpr,
                HAS_LN_B: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
                ROWS: tl.constexpr, SCALE, HAS_SCALE: tl.constexpr, ROUND: tl.constexpr):
    """Output columns ``cols`` of rows row0 .. row0 + ROWS - 1 from the weight tile w
    (BLOCK_N, K_PAD); with HAS_A0 (one row) a0 is that row's input, computed by the caller."""
    col_ok = cols < N
    wf = w.to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(SCALE + cols, mask=col_ok, other=0.0)
    for i in tl.static_range(ROWS):
        m = row0 + i
        if HAS_A0:
            a = a0
        else:
            a = _row_input(X + m * stride_xm, (tl.zeros_like(ks) + m) < M, ks, k_ok, K,
                           eps, ln_w, ln_b, W, HAS_LN, HAS_LN_W, HAS_LN_B, ROUND)
        y = tl.sum(wf * a[None, :], axis=1)  # (BLOCK_N,)
        if HAS_SCALE:
            y *= scale
        if HAS_BIAS:
            y += bias
        y = activate(y, ACT)
        mask = col_ok & ((tl.zeros_like(cols) + m) < M)
        if HAS_RESIDUAL:
            r = R + m * stride_rm + cols
            tl.store(r, tl.load(r, mask=mask, other=0.0) + y, mask=mask)
        else:
            tl.store(Y + m * stride_ym + cols, y.to(Y.dtype.element_ty), mask=mask)
# fmt: on


def _fill_columns(n: int, widths: tuple[int, ...], programs: int) -> int:
    """The widest of ``widths`` (descending) that still gives >= ``programs`` column blocks."""
    for width in widths:
        if cdiv(n, width) >= programs:
            return width
    return widths[-1]


def default_config(m: int, n: int, k: int, device: torch.device) -> SkinnyConfig:
    """Launch configuration for (m rows) x (n, k) weights.

    Up to 4 rows: the whole-row kernel with about 16K weight elements per program (BLOCK_N =
    16384 / next_pow2(K), 1..64), narrowed until there are four programs per SM, and 8 warps
    for tiles of at most 4K elements (the H200 sweep's best at Whisper shapes); more rows (or
    K too long for one tile): :data:`MANY_ROWS`, the K loop on tensor cores (rows padded to 16,
    the widest BLOCK_N that still gives one program per SM) or the split-K kernel (chunks of
    256, 512 for K > 2048, two programs per SM). bench/skinny_micro.py measures it against
    every entry of :data:`CONFIGS` on the GPU.
    """
    if interpreting():  # few, large programs: the interpreter's cost is per program and op
        bk = max(16, min(128, next_power_of_2(k)))
        bn = max(16, min(next_power_of_2(n), 262144 // bk))
        bm = max(16, min(64, next_power_of_2(m)))
        if m <= MAX_ROW_ROWS and next_power_of_2(k) <= MAX_ROW_TILE // 16:
            bn = max(16, min(next_power_of_2(n), MAX_ROW_TILE // next_power_of_2(k)))
            return SkinnyConfig(False, MAX_ROW_ROWS, bn, 0, 4, 1)
        if m > 1 and MANY_ROWS == "split":
            return split_config(bn, bk)
        return SkinnyConfig(m > 1, bm, bn, bk, 4, 1)
    sms = sm_count(device) if device.type == "cuda" else 132
    k_pad = next_power_of_2(k)
    if m <= MAX_ROW_ROWS and m < MANY_ROWS_FROM and k_pad <= MAX_ROW_TILE:
        bn = max(1, min(64, 16384 // k_pad))
        if DEFAULT_PERSIST:
            return SkinnyConfig(False, MAX_ROW_ROWS, bn, 0, 4, 1, DEFAULT_PERSIST)
        while bn > 1 and cdiv(n, bn) < 4 * sms:
            bn //= 2
        return SkinnyConfig(False, MAX_ROW_ROWS, bn, 0, 8 if bn * k_pad <= 4096 else 4, 1)
    if MANY_ROWS == "split":
        bk = 256 if k <= 2048 else 512
        return split_config(_fill_columns(n, (64, 32, 16), 2 * sms // cdiv(k, bk)), bk)
    bn = _fill_columns(n, (64, 32, 16), sms)
    return SkinnyConfig(True, 16, bn, 256 if bn <= 32 else 128, 4, 3)


def _check_ln(ln: LnParams, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    if not isinstance(ln, tuple) or len(ln) != 3:
        raise ValueError("ln must be a (weight, bias, eps) tuple")
    ln_w, ln_b, eps = ln
    for name, p in (("ln weight", ln_w), ("ln bias", ln_b)):
        if p is None:
            continue
        if tuple(p.shape) != (k,) or p.dtype != torch.float32 or p.stride(0) != 1:
            raise ValueError(
                f"{name} must be a contiguous ({k},) float32 tensor, got {tuple(p.shape)} {p.dtype}"
            )
    return ln_w, ln_b, float(eps)


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ln: LnParams | None,
    activation: str,
    w_dtype: torch.dtype,
) -> None:
    """Shapes and dtypes; ``w_dtype``: the weight's dtype, or for int8 the activation dtype."""
    if activation not in ACTIVATIONS:
        raise UnsupportedOptionError(
            f"activation '{activation}' has no skinny linear kernel ({', '.join(ACTIVATIONS)})"
        )
    check_float("x", x)
    if weight.dtype != torch.int8:
        check_float("weight", weight)
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be (N, {k}), got {tuple(weight.shape)}")
    if ln is None and x.dtype != w_dtype:
        raise ValueError(f"weight is {w_dtype} but x is {x.dtype} (float32 x needs ln)")
    n = weight.shape[0]
    if bias is not None and (tuple(bias.shape) != (n,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous ({n},) tensor, got {tuple(bias.shape)}")


def _check_residual(residual: torch.Tensor, x: torch.Tensor, n: int) -> None:
    shape = (*x.shape[:-1], n)
    if tuple(residual.shape) != shape or residual.dtype != torch.float32:
        raise ValueError(
            f"residual must be a {shape} float32 tensor, "
            f"got {tuple(residual.shape)} {residual.dtype}"
        )
    if residual.numel() and residual.reshape(-1, n).stride(-1) != 1:
        raise ValueError("residual must have a unit stride on its last dim")
    if x.untyped_storage().data_ptr() == residual.untyped_storage().data_ptr():
        raise ValueError("x must not share memory with residual (it is updated in place)")


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ln: LnParams | None = None,
    activation: str = "identity",
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    weight_scale: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
    ln_fold: tuple[torch.Tensor, torch.Tensor] | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(LN(x) @ weight^T + bias)``, stored or added to ``residual`` in place.

    Int8 weight-only quantisation: ``weight`` int8 with ``weight_scale`` (N,) float32 computes
    ``(LN(x) @ weight^T) * weight_scale + bias`` (per-output-channel scales; the bias dtype,
    float16 or bfloat16, is the activation dtype: LN(x) is rounded to it, it is the default
    output and the dtype x must have without ``ln``). Whole-row kernel only (up to 4 rows).

    Args:
        x: (..., K) in weight's dtype, or any float dtype (float32 residual stream) with ``ln``.
        weight: (N, K) float32/float16/bfloat16 (``nn.Linear`` layout); bias: (N,) or None.
        ln: optional (ln_weight, ln_bias, eps), weight/bias (K,) float32 or None: x's rows are
            normalised with float32 statistics and cast to weight's dtype before the multiply.
        activation: "identity" or "gelu" (exact erf form, as ``F.gelu``), in float32.
        residual: optional float32 (..., N) tensor updated in place (``residual += y``) and
            returned; it must not share memory with x.
        out: optional contiguous (..., N) output of ``out_dtype`` (not with residual).
        out_dtype: dtype of the output (default weight's; e.g. float32 logits).
        config: launch configuration (benchmarks sweep :data:`CONFIGS`); None picks one.
        ln_fold: for the split-K kernel with ``ln``: ``skinny_split.fold_layer_norm(weight,
            bias, ln_weight, ln_bias)``, computed once per weight by the caller (else on every
            call, one extra float32 GEMV); the other kernels ignore it.
        counters: for the split-K kernel: a zeroed int32 workspace of at least
            cdiv(N, block_n) * cdiv(M, 16) elements, left zeroed (None: a fresh zeroed one per
            call, one more launch); launches that share it must not overlap.
    Returns:
        (..., N): residual, or y in ``out_dtype``.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got {tuple(weight.shape)}")
    act_dtype = _check_int8(weight, weight_scale, bias) if weight.dtype == torch.int8 else None
    _check_inputs(x, weight, bias, ln, activation, act_dtype or weight.dtype)
    n, k = weight.shape
    ln_w, ln_b, eps = _check_ln(ln, k) if ln is not None else (None, None, 0.0)
    x2d = as_rows(x)  # (M, K)
    m = x2d.shape[0]
    if residual is not None:
        if out is not None or out_dtype is not None:
            raise ValueError("out/out_dtype and residual are exclusive (residual is the output)")
        _check_residual(residual, x, n)
        y = residual
    else:
        out_dtype = out_dtype or act_dtype or weight.dtype
        if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
        y = out_or_empty(out, (*x.shape[:-1], n), out_dtype, x.device)
    tensors = (x2d, weight, bias, ln_w, ln_b, residual)
    check_launch(_skinny_linear_kernel, *(t for t in tensors if t is not None))
    if m == 0 or n == 0:
        return y
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    y2d = y.view(-1, n)  # (M, N)
    cfg = config or default_config(m, n, k, x.device)
    args = (
        x2d,
        weight,
        bias if bias is not None else weight,  # unused pointers: any tensor
        ln_w if ln_w is not None else weight,
        ln_b if ln_b is not None else weight,
        y2d if residual is not None else weight,
        y2d,
        m,
        n,
        k,
        x2d.stride(0),
        weight.stride(0),
        y2d.stride(0),
        y2d.stride(0),
        eps,
    )
    flags = {
        "HAS_BIAS": bias is not None, "HAS_LN": ln is not None, "HAS_LN_W": ln_w is not None,
        "HAS_LN_B": ln_b is not None, "HAS_RESIDUAL": residual is not None,
        "ACT": ACTIVATIONS[activation],
    }  # fmt: skip
    if cfg.split:
        if act_dtype is not None:
            raise UnsupportedOptionError(f"int8 weights have no split-K kernel ({cfg})")
        ln_args = (ln_w, ln_b, eps) if ln is not None else None
        launch_split(x2d, weight, bias, ln_args, ln_fold, y2d, residual is not None,
                     ACTIVATIONS[activation], cfg.block_n, cfg.block_k, cfg.num_warps,
                     counters)  # fmt: skip
        return y
    if cfg.block_k == 0:
        rnd = {None: 0, torch.float16: 1, torch.bfloat16: 2}[act_dtype]
        scale = weight_scale if weight_scale is not None else weight
        _launch_rows(args, flags, cfg, m, n, k, x.device, scale, rnd)
        return y
    if act_dtype is not None:
        raise UnsupportedOptionError(
            f"int8 weights need the whole-row kernel (up to {MAX_ROW_ROWS} rows), got {cfg}"
        )
    block_m = min(cfg.block_m, next_power_of_2(m))
    block_m = max(16, block_m) if cfg.use_dot else block_m
    grid = (cdiv(n, cfg.block_n), cdiv(m, block_m))
    _skinny_linear_kernel[grid](
        *args, **flags, USE_DOT=cfg.use_dot, **dot_precision(weight.dtype),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **pdl_kwargs(x.device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def _check_int8(weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None):
    """The activation dtype of an int8-weight call (its bias dtype), after checking the scale."""
    n = weight.shape[0]
    if scale is None or tuple(scale.shape) != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"int8 weights need weight_scale, a ({n},) float32 tensor")
    if scale.stride(0) != 1:
        raise ValueError("weight_scale must be contiguous")
    if bias is None or bias.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("int8 weights need a float16 or bfloat16 bias (the activation dtype)")
    return bias.dtype


def _launch_rows(
    args: tuple,
    flags: dict,
    cfg: SkinnyConfig,
    m: int,
    n: int,
    k: int,
    device: torch.device,
    scale: torch.Tensor,
    rnd: int,
) -> None:
    """The whole-row kernel: ``cfg.block_m`` (<= 4) rows per program, all of K in one tile."""
    k_pad = next_power_of_2(k)
    if cfg.use_dot or cfg.block_m > MAX_ROW_ROWS or cfg.block_n * k_pad > MAX_ROW_TILE:
        raise UnsupportedOptionError(
            f"whole-row skinny config {cfg} needs no tl.dot, block_m <= {MAX_ROW_ROWS} and "
            f"block_n x next_pow2(K={k}) <= {MAX_ROW_TILE}"
        )
    rows = min(cfg.block_m, m)
    blocks = cdiv(n, cfg.block_n)
    if cfg.persist and device.type == "cuda":
        blocks = min(blocks, cfg.persist * sm_count(device))
    elif cfg.persist:  # the interpreter: a few programs, each walking several blocks
        blocks = min(blocks, cfg.persist)
    grid = (blocks, cdiv(m, rows))
    _skinny_rows_kernel[grid](
        *args,
        **flags,
        ROWS=rows,
        BLOCK_N=cfg.block_n,
        K_PAD=k_pad,
        PERSIST=cfg.persist > 0,
        SCALE=scale,
        HAS_SCALE=rnd > 0,
        ROUND=rnd,
        **pdl_kwargs(device),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def skinny_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ln: LnParams | None = None,
    activation: str = "identity",
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    upcast: bool = False,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch :func:`skinny_linear`: ``F.layer_norm`` in float32 cast to weight's dtype,
    ``F.linear``, ``F.gelu``, then a store or ``residual += y`` (in place, returned).

    The GEMM, bias and activation run in weight's dtype (PyTorch's same-dtype result), or in
    float32 with ``upcast`` (the kernel's math up to summation order; the LayerNorm output is
    still rounded to weight's dtype, as the kernel defines). x (..., K), weight (N, K).
    Int8 ``weight`` with ``weight_scale``: dequantised to float32 (``weight * scale``), then
    rounded to the bias dtype unless ``upcast``.
    """
    if activation not in ACTIVATIONS:
        raise UnsupportedOptionError(f"unknown activation '{activation}'")
    if weight.dtype == torch.int8:
        weight = weight.float() * weight_scale[:, None]
        weight = weight if upcast else weight.to(bias.dtype)
        if ln is None and not upcast:
            x = x.to(weight.dtype)
    h, dtype = x, out_dtype or weight.dtype
    if ln is not None:
        ln_w, ln_b, eps = ln
        h = F.layer_norm(x.float(), (x.shape[-1],), ln_w, ln_b, eps).to(weight.dtype)
    if upcast:
        h, weight = h.float(), weight.float()
        bias = bias.float() if bias is not None else None
    y = F.linear(h, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    if residual is not None:
        return residual.add_(y.float())
    y = y.to(dtype)
    return out.copy_(y) if out is not None else y
