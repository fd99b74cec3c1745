"""Linear layer with its activation in the GEMM epilogue: ``act(x @ W^T + b)`` in one kernel.

The first GEMM of a feed-forward block, ``F.linear`` followed by SiLU/ReLU/GELU, writes the
(rows, hidden) output once instead of three times (GEMM store, activation load and store). Tiles
of (BLOCK_M, BLOCK_N) outputs in a grouped order (GROUP_M row tiles share the weight columns
they read, so those stay in L2), a K loop of ``tl.dot`` with float32 accumulation (IEEE float32
products for float32 inputs, tensor cores for float16/bfloat16), then bias and activation in
float32 and one rounding to the input dtype.

A second kernel for float16/bfloat16 on compute capability 9.0+ (the default there:
:data:`TMA_CONFIG` from K = :data:`TMA_MIN_K`, :data:`TMA_CONFIG_SMALL_K` below when its tiles
number at least half the SMs) is persistent: one program per SM walks the tiles in the same grouped
order, reads both operands and writes the output through TMA tensor descriptors, and its
flattened tile loop issues the next tile's loads under the current tile's epilogue.

On compute capability 9.x at K = 256 (the Conformer's FFN w1) ``config=None`` takes the Gluon
ping-pong GEMM of :mod:`speechrt.kernels.linear_act_pingpong` instead (see :data:`PINGPONG`).

``W`` is read in ``nn.Linear`` layout (N, K). :func:`linear_act_ref` is the plain-torch
reference (``act(F.linear(x, W, b))``) that tests and benchmarks import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels import linear_act_pingpong
from speechrt.kernels._activations import (
    ACTIVATIONS,
    activate,
    epilogue_code,
    fast_epilogue,
    sigmoid,
)
from speechrt.kernels._pdl import pdl_enter, pdl_kwargs
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
    "ACTIVATIONS",
    "CONFIGS",
    "LinearConfig",
    "interleave_glu",
    "linear_act",
    "linear_act_ref",
]

# Activation codes of the epilogue (a constexpr).


@dataclass(frozen=True)
class LinearConfig:
    """Launch configuration: tile sizes, grouped-order width, warps, pipeline stages; ``tma``
    selects the persistent tensor-descriptor kernel (one program per SM walking the tiles, loads
    of the next tile pipelined under the current tile's epilogue; float16/bfloat16 on compute
    capability 9.0+), ``split_store`` stores its epilogue in two column halves."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool = False
    split_store: bool = False

    def __str__(self) -> str:
        tiles = f"m{self.block_m}n{self.block_n}k{self.block_k}g{self.group_m}"
        tma = ("tma2" if self.split_store else "tma") if self.tma else ""
        return f"{tiles}w{self.num_warps}s{self.num_stages}{tma}"


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
    LinearConfig(128, 128, 64, 8, 8, 3, tma=True),
    LinearConfig(128, 128, 64, 8, 4, 4, tma=True),
    LinearConfig(128, 256, 64, 8, 8, 3, tma=True),
    LinearConfig(128, 256, 64, 8, 8, 3, tma=True, split_store=True),
    LinearConfig(128, 256, 64, 8, 8, 4, tma=True, split_store=True),
    LinearConfig(128, 128, 64, 8, 8, 4, tma=True, split_store=True),
    LinearConfig(256, 128, 64, 8, 8, 3, tma=True, split_store=True),
)
# Float32 (IEEE dots on CUDA cores): small tiles (64 x 128 with 4 warps spills registers).
CONFIGS_FP32: tuple[LinearConfig, ...] = (
    LinearConfig(64, 64, 32, 8, 4, 2),
    LinearConfig(64, 128, 32, 8, 8, 2),
)


@triton.jit
def _tile_coords(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of ``tile`` in grouped order: GROUP_M consecutive row tiles walk
    the column tiles together, so the weight columns they read stay in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


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
    GLU: tl.constexpr,  # 0: no GLU; 1/2: interleaved (a, gate) columns -> a * sigmoid(gate)
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
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
    if GLU:  # column 2j is a_j, 2j + 1 its gate: each thread holds both of a pair
        a, gate = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        acc = a * sigmoid(gate, GLU == 2)
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        col_ok = cols < N // 2
    else:
        acc = activate(acc, ACT)
    y = Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _linear_act_tma_kernel(
    X_DESC,  # (M, K) tensor descriptor, blocks (BLOCK_M, BLOCK_K)
    W_DESC,  # (N, K) tensor descriptor, blocks (BLOCK_N, BLOCK_K)
    Y_DESC,  # (M, N) tensor descriptor, blocks (BLOCK_M, BLOCK_N // (1 + SPLIT_STORE))
    BIAS,  # (N,) (HAS_BIAS)
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PROGRAMS: tl.constexpr,
    SPLIT_STORE: tl.constexpr,
    GLU: tl.constexpr,  # as _linear_act_kernel's: columns (2j, 2j + 1) -> a_j * sigmoid(gate_j)
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    # Persistent: program p takes tiles p, p + PROGRAMS, ...; the flattened loop lets the
    # pipeliner issue the next tile's first loads while this tile's epilogue runs. Rows and
    # columns past M, N, K read as zeros and are not stored (the descriptors clip).
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, tiles_m, tiles_n, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):
            a = X_DESC.load([row0, kt * BLOCK_K])
            w = W_DESC.load([col0, kt * BLOCK_K])
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w.T, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            cols = col0 + tl.arange(0, BLOCK_N)
            acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if GLU:  # a (BLOCK_M, BLOCK_N / 2) output tile
            a, gate = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
            Y_DESC.store([row0, col0 // 2], (a * sigmoid(gate, GLU == 2)).to(Y_DESC.dtype))
        elif SPLIT_STORE:  # two (BLOCK_M, BLOCK_N / 2) halves: half the staging registers
            acc = activate(acc, ACT)
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            Y_DESC.store([row0, col0], left.to(Y_DESC.dtype))
            Y_DESC.store([row0, col0 + BLOCK_N // 2], right.to(Y_DESC.dtype))
        else:
            Y_DESC.store([row0, col0], activate(acc, ACT).to(Y_DESC.dtype))


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether 2-D tensors can be read through tensor descriptors: 16-byte aligned base and
    row stride, unit column stride, on a GPU of compute capability 9.0+ (or the interpreter)."""
    for t in tensors:
        size = t.element_size()
        if t.stride(1) != 1 or (t.stride(0) * size) % 16 or t.data_ptr() % 16:
            return False
    device = tensors[0].device
    if device.type != "cuda":
        return interpreting()
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _launch_tma(x2d, weight, bias, y2d, act: int, cfg: LinearConfig, glu: int = 0) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x2d.shape
    n = weight.shape[0]
    store_n = cfg.block_n // 2 if (cfg.split_store or glu) else cfg.block_n
    x_desc = TensorDescriptor.from_tensor(x2d, [cfg.block_m, cfg.block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k])
    y_desc = TensorDescriptor.from_tensor(y2d, [cfg.block_m, store_n])
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    programs = min(tiles, 4 if interpreting() else sm_count(x2d.device))
    _linear_act_tma_kernel[(programs,)](
        x_desc, w_desc, y_desc, bias if bias is not None else weight, m, n, k,
        HAS_BIAS=bias is not None, ACT=act, **dot_precision(x2d.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        PROGRAMS=programs, SPLIT_STORE=cfg.split_store, GLU=glu, **pdl_kwargs(x2d.device, tiles),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


# The persistent tensor-descriptor kernel is the default for float16/bfloat16 on compute
# capability 9.0+; ``SPEECHRT_LINEAR_TMA=0`` in the environment (read at each launch, so a
# benchmark can compare both in one process) returns to the pointer kernel.
TMA_DEFAULT = True
TMA_CONFIG = LinearConfig(256, 128, 64, 8, 8, 3, tma=True, split_store=True)
# Below this K (the Conformer's K = 256 GEMMs) the descriptor kernel takes 128 x 256 tiles when
# they give at least half as many tiles as SMs: with the approximate-tanh swish
# (_activations.FAST_SWISH) it beats the pointer kernel's best tiles (H200, fp16, 256 -> 2048 +
# swish: 17.0 vs 20.1 us at 4,032 rows, 52.4 vs 63.1 at 16,320; 256 -> 256: 11.2 vs 15.8 us at
# 16,320 rows, cuBLAS 17.7).
TMA_MIN_K = 512
TMA_CONFIG_SMALL_K = LinearConfig(128, 256, 64, 8, 8, 3, tma=True, split_store=True)
# At K = 256 with at least one (64 x 256) tile per SM, ``config=None`` runs the warp-specialised
# ping-pong GEMM of :mod:`speechrt.kernels.linear_act_pingpong` (Gluon, Hopper; no GLU): its
# epilogues run under the other warpgroup's MMAs (H200 fp16, 256 -> 2048 + swish: 50.6 -> 39.2
# us at 16,320 rows, 17.1 -> 16.1 at 4,032; BENCHMARKS.md, session 10). Read at each launch.
PINGPONG = True


def _default_config(
    m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, tma: bool | None = None
) -> LinearConfig:
    """Half precision on compute capability 9.0+ (when ``tma`` allows): :data:`TMA_CONFIG`
    from K = :data:`TMA_MIN_K`, :data:`TMA_CONFIG_SMALL_K` below when its tiles number at least
    half the SMs.
    Otherwise tiles 128 x 128 x 64, 8 warps, 3 stages -- fastest of the pointer kernel's sweep at
    every measured row count (256..16384 rows x 2048 x 256, fp16, H200: 1.0-1.43x cuBLAS linear
    + separate SiLU)."""
    if tma is None:
        tma = TMA_DEFAULT and os.environ.get("SPEECHRT_LINEAR_TMA", "1") != "0"
    tma = tma and dtype != torch.float32
    if tma and device.type == "cuda" and not interpreting():
        if torch.cuda.get_device_capability(device) >= (9, 0):
            if k >= TMA_MIN_K:
                return TMA_CONFIG
            small = TMA_CONFIG_SMALL_K
            if cdiv(m, small.block_m) * cdiv(n, small.block_n) >= sm_count(device) // 2:
                return small
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
        activation: one of :data:`ACTIVATIONS` (swish = silu, gelu is the erf form), or
            ``"glu"``: ``a * sigmoid(gate)`` of the pairs of output columns (2j, 2j + 1), for a
            weight and bias laid out by :func:`interleave_glu` (the output is (..., N / 2)).
        out: optional preallocated contiguous (..., N) output (N / 2 for glu) in ``out_dtype``.
        out_dtype: output dtype (default x's): e.g. float32 keeps a branch that feeds a float32
            residual stream unrounded.
        config: launch configuration (benchmarks sweep :data:`CONFIGS`); None picks one.
    Returns:
        (..., N) in ``out_dtype``; accumulation, bias and activation in float32. Swish and
        glu's sigmoid go through the approximate tanh where the result is rounded to
        float16/bfloat16 on a GPU (:func:`~speechrt.kernels._activations.fast_epilogue`).
    """
    glu = activation == "glu"
    if not glu and activation not in ACTIVATIONS:
        raise UnsupportedOptionError(
            f"activation '{activation}' has no fused linear kernel "
            f"({', '.join((*ACTIVATIONS, 'glu'))})"
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
    if glu and n % 2:
        raise ValueError(f"a glu weight has an even number of rows (interleave_glu), got {n}")
    n_out = n // 2 if glu else n
    y = out_or_empty(out, (*x.shape[:-1], n_out), out_dtype or x.dtype, x.device)
    check_launch(_linear_act_kernel, *(t for t in (x2d, weight, bias) if t is not None))
    if m == 0 or n == 0:
        return y
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    fast = fast_epilogue(y.dtype, x.device)
    act = 0 if glu else epilogue_code(activation, y.dtype, x.device)
    if config is None and PINGPONG and not glu:
        y2d = y.view(m, n)
        if linear_act_pingpong.supported(x2d, weight, y2d):
            linear_act_pingpong.linear_act_pingpong(x2d, weight, bias, y2d, act)
            return y
    cfg = config or _default_config(m, n, k, x.dtype, x.device)
    if cfg.tma:
        if x.dtype == torch.float32:
            raise UnsupportedOptionError("the tensor-descriptor linear_act runs float16/bfloat16")
        y2d = y.view(m, n_out)
        if _tma_ok(x2d, weight, y2d):
            _launch_tma(x2d, weight, bias, y2d, act, cfg, glu=(2 if fast else 1) if glu else 0)
            return y
        cfg = _default_config(m, n, k, x.dtype, x.device, tma=False)
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
    _linear_act_kernel[grid](
        x2d, weight, bias if bias is not None else weight, y,
        m, n, k, x2d.stride(0), weight.stride(0), n_out,
        HAS_BIAS=bias is not None, ACT=act, GLU=(2 if fast else 1) if glu else 0,
        **dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        **pdl_kwargs(x.device, grid[0]), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def interleave_glu(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A GLU layer's (2C, K) weight and (2C,) bias (rows [0, C) the values, [C, 2C) the gates,
    as ``F.glu(dim=-1)`` splits them) reordered to (value_0, gate_0, value_1, gate_1, ...):
    the layout ``linear_act(..., "glu")`` reads."""
    if weight.dim() != 2 or weight.shape[0] % 2:
        raise ValueError(f"a GLU weight is (2C, K), got {tuple(weight.shape)}")
    c = weight.shape[0] // 2

    def pairs(t):
        return t.view(2, c, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()

    return pairs(weight), None if bias is None else pairs(bias)


_TORCH_ACT = {
    "identity": lambda h: h,
    "swish": F.silu,
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "glu": lambda h: h[..., 0::2] * torch.sigmoid(h[..., 1::2]),  # interleave_glu's layout
}


def linear_act_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "swish",
    upcast: bool = False,
) -> torch.Tensor:
    """Plain torch ``act(F.linear(x, weight, bias))`` in x's dtype (float32 with ``upcast``).

    x (..., K), weight (N, K), bias (N,) or None -> (..., N) ((..., N / 2) for ``"glu"``, whose
    weight is in :func:`interleave_glu`'s layout).
    """
    act = _TORCH_ACT.get(activation)
    if act is None:
        raise UnsupportedOptionError(f"unknown activation '{activation}'")
    if upcast:
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
    return act(F.linear(x, weight, bias))
