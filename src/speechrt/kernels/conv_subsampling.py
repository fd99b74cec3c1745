"""Two-layer Conv2d subsampling front (3x3 stride 2, twice, with ReLUs) in one Triton kernel.

The front of a 4x-subsampling speech encoder::

    h1 = relu(conv2d(x[:, None], W1, b1, stride=2))   # (B, C, T1, F1), 1 input channel
    h2 = relu(conv2d(h1, W2, b2, stride=2))           # (B, C, T2, F2)

with ``T1 = (T - 1) // 2``, ``T2 = (T1 - 1) // 2`` (F1, F2 likewise). It runs as one implicit GEMM
for the second conv: M = B*T2*F2 output positions, N = C output channels, K = 9 taps x C input
channels, float32 accumulation on tensor cores (``tl.dot``). The A operand is never read from
memory, so the (B, C, T1, F1) conv1 output, the largest tensor of the whole encoder, never
exists: output position (t2, f2) sees the 7 x 7 input patch at frames ``4*t2 + [0, 7)`` and bins
``4*f2 + [0, 7)``; each program loads its rows' patches once (CMVN ``(x - mean) * istd``
applied on the way in, a constant-1 column for the bias), and every K step recomputes the A
tile -- conv1 + bias + ReLU of BLOCK_K channels at one conv2 tap -- as a second small GEMM,
``patch (BLOCK_M, 64) @ W1[tap] (64, BLOCK_K)``, where ``W1[tap]`` holds conv1's 3 x 3 weights at
the tap's offset in the patch (zeros elsewhere). Like attention's ``P @ V``, the ReLU'd tile goes
from the accumulator straight into the next dot as the A operand. Recomputing costs about 25%
more tensor-core work than the conv2 GEMM alone (K 64 per BLOCK_K columns vs N = C per column),
far less than the 652 MB round trip through memory it replaces at 64 x 1024 frames.

The output is (B, T2, F2 * C) with column ``f * C + c`` (channels fastest), i.e. the flattened
NHWC layout: the following projection needs its weight columns in that order (PyTorch's
``x.transpose(1, 2).reshape(B, T2, C * F2)`` orders them ``c * F2 + f``).

Precision: the CMVN'd input, both conv weights and conv1's bias are rounded to the compute
dtype (as a module run in that dtype does), products are exact and accumulate in float32, conv1
is rounded once more after its ReLU, conv2's bias and ReLU apply in float32 before the output's
rounding. Float32 uses IEEE float32 dots (no TF32). Weights are packed once by
:func:`pack_conv_subsampling`. :func:`conv_subsampling_ref` is the plain-torch reference (the two
``F.conv2d`` calls) that tests and benchmarks import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels import conv_front_wgmma
from speechrt.kernels._utils import (
    MISSING_TL,
    MISSING_TRITON,
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
    "ConvFrontConfig",
    "ConvSubsamplingWeights",
    "HALF_CHANNEL_MULTIPLE",
    "channels_unsupported",
    "conv_subsampling",
    "conv_subsampling_ref",
    "output_size",
    "pack_conv_subsampling",
]


@dataclass(frozen=True)
class ConvFrontConfig:
    """Launch configuration: output tile (BLOCK_M positions x BLOCK_N channels), BLOCK_K input
    channels per K step, warps, pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        tiles = f"m{self.block_m}n{self.block_n}k{self.block_k}"
        return f"{tiles}w{self.num_warps}s{self.num_stages}"


# Candidates for float16/bfloat16 on an H200 (bench/conv_front_micro.py sweeps them). BLOCK_N
# covering all C channels computes each A tile once; smaller tiles give more programs.
CONFIGS: tuple[ConvFrontConfig, ...] = (
    ConvFrontConfig(128, 256, 32, 8, 3),
    ConvFrontConfig(128, 256, 64, 8, 3),
    ConvFrontConfig(128, 256, 32, 8, 4),
    ConvFrontConfig(128, 256, 16, 8, 4),
    ConvFrontConfig(64, 256, 32, 4, 3),
    ConvFrontConfig(64, 256, 64, 4, 3),
    ConvFrontConfig(128, 128, 32, 4, 3),
    ConvFrontConfig(128, 128, 64, 8, 3),
    ConvFrontConfig(256, 128, 32, 8, 3),
    ConvFrontConfig(64, 128, 64, 4, 3),
)
# Float32 (IEEE dots on CUDA cores): small tiles (64 x 128 with 4 warps spills registers).
CONFIGS_FP32: tuple[ConvFrontConfig, ...] = (
    ConvFrontConfig(64, 64, 32, 4, 2),
    ConvFrontConfig(32, 128, 32, 4, 2),
    ConvFrontConfig(64, 128, 32, 8, 2),
)
PATCH = 64  # 7 x 7 input samples + 1 (the bias column), padded to a power of two
# On compute capability 9.x, half precision, C = 64/128/256 and at least half a wave of 128-row
# tiles, ``config=None`` runs the Gluon kernel of :mod:`speechrt.kernels.conv_front_wgmma` (conv1's
# ReLU under conv2's MMAs, conv1 at K = 16; within this kernel's own error of float32). H200,
# C = 256, fp16: 239 -> 175.5 us at 64 x 256 frames, 906 -> 669 at 64 x 1024 (BENCHMARKS.md,
# sessions 10-11). Read at each launch, so a benchmark can compare both in one process.
GLUON = True
# Half-precision channel counts the kernel is verified for on CUDA: on the H200 (Triton 3.6)
# C = 24 gave wrong outputs at every shape while 8, 40, 48, 72, 80, 144 and 176 were right
# (BENCHMARKS.md, session 4); until that is understood only multiples of 16 are accepted.
HALF_CHANNEL_MULTIPLE = 16


def channels_unsupported(channels: int, dtype: torch.dtype, cuda: bool) -> str | None:
    """None if the kernel computes ``channels`` channels in ``dtype`` (on CUDA if ``cuda``),
    else the reason (see HALF_CHANNEL_MULTIPLE)."""
    if cuda and dtype != torch.float32 and channels % HALF_CHANNEL_MULTIPLE:
        return (
            f"the Triton conv front needs channels divisible by {HALF_CHANNEL_MULTIPLE} in "
            f"{dtype} on CUDA, got {channels} (the cuDNN front covers any count)"
        )
    return None


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _conv_front_kernel(
    X,  # (B, T, F) raw features, any strides
    MEAN,  # (F,) float32 CMVN mean (HAS_CMVN)
    ISTD,  # (F,) float32 CMVN inverse std (HAS_CMVN)
    W1,  # (9 * PATCH, C) conv1 as a patch matrix per conv2 tap, compute dtype
    W2,  # (9 * C, C) conv2 weight in the compute dtype, row (i * 3 + j) * C + c_in
    B2,  # (C,) float32 conv2 bias
    OUT,  # (M, C) = (B, T2, F2 * C), row stride stride_om
    M,
    T2F2,
    F2,
    C,
    sxb,
    sxt,
    sxf,
    stride_w1,
    stride_w2,
    stride_om,
    HAS_CMVN: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PATCH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    bi = rows // T2F2
    rem = rows - bi * T2F2
    t2 = rem // F2
    f2 = rem - t2 * F2
    # The 7 x 7 input patch of each output position (frames 4*t2 + r, bins 4*f2 + s), once per
    # tile: column r * 7 + s, column 49 = 1 (it multiplies conv1's bias), the rest 0.
    pc = tl.arange(0, PATCH)
    r = pc // 7
    s = pc - 7 * r
    in_patch = pc < 49
    x_ptr = (X + bi.to(tl.int64)[:, None] * sxb + (4 * t2[:, None] + r[None, :]).to(tl.int64) * sxt
             + (4 * f2[:, None] + s[None, :]).to(tl.int64) * sxf)  # fmt: skip
    p_ok = row_ok[:, None] & in_patch[None, :]
    patch = tl.load(x_ptr, mask=p_ok, other=0.0).to(tl.float32)  # (BLOCK_M, PATCH)
    if HAS_CMVN:
        f = 4 * f2[:, None] + s[None, :]
        mean = tl.load(MEAN + f, mask=p_ok, other=0.0)
        istd = tl.load(ISTD + f, mask=p_ok, other=0.0)
        patch = (patch - mean) * istd
    patch = tl.where((pc == 49)[None, :], 1.0, patch)
    if not UPCAST:
        patch = patch.to(W2.dtype.element_ty)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_chunks = tl.cdiv(C, BLOCK_K)
    for it in range(9 * n_chunks):  # (conv2 tap, chunk of conv1 channels)
        tap = it // n_chunks
        ks = (it - tap * n_chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        # conv1 + bias of channels ks at the tap's conv1 position, as a small GEMM on the patch.
        w1 = tl.load(
            W1 + (tap * PATCH + pc).to(tl.int64)[:, None] * stride_w1 + ks[None, :],
            mask=k_ok[None, :],
            other=0.0,
        )  # (PATCH, BLOCK_K)
        if UPCAST:
            w1 = w1.to(tl.float32)
        h = tl.dot(patch, w1, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_K) float32
        a = tl.maximum(h, 0.0)
        w2 = tl.load(
            W2 + (tap * C + ks).to(tl.int64)[:, None] * stride_w2 + cols[None, :],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            w2 = w2.to(tl.float32)
        else:
            a = a.to(W2.dtype.element_ty)
        acc = tl.dot(a, w2, acc, input_precision=INPUT_PRECISION)
    acc += tl.load(B2 + cols, mask=col_ok, other=0.0)[None, :]
    acc = tl.maximum(acc, 0.0)
    out = OUT + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# Weights, launcher, reference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSubsamplingWeights:
    """Packed weights of the two convs (see :func:`pack_conv_subsampling`).

    w1: (9 * 64, C) compute dtype: for conv2 tap (i, j), rows ``tap * 64 + r * 7 + s`` hold
        conv1's weight at kernel position (r - 2i, s - 2j) (0 outside the 3 x 3 window), row
        ``tap * 64 + 49`` conv1's bias, so that ``patch @ w1[tap]`` is conv1 at the tap.
    w2: (9 * C, C) compute dtype, row ``(i * 3 + j) * C + c_in``, column c_out.
    b2: (C,) float32.
    w1_3x3: (16, C) compute dtype: rows ``p * 3 + q`` conv1's weight at kernel position (p, q),
        row 9 its bias, rows 10-15 zero: conv1 as a K = 16 product on the 3 x 3 input window of
        one conv2 tap (the Gluon kernel's layout).
    """

    w1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w1_3x3: torch.Tensor

    @property
    def channels(self) -> int:
        return self.w2.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.w2.dtype


def _check_conv(name: str, weight: torch.Tensor, c_in: int | None) -> None:
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"{name} weight must be (C, C_in, 3, 3), got {tuple(weight.shape)}")
    if c_in is not None and weight.shape[1] != c_in:
        raise ValueError(f"{name} weight must have {c_in} input channels, got {weight.shape[1]}")


def pack_conv_subsampling(
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    dtype: torch.dtype,
) -> ConvSubsamplingWeights:
    """Pack ``nn.Conv2d`` weights for :func:`conv_subsampling` (once, at load time).

    Args:
        conv1_weight: (C, 1, 3, 3), conv1_bias: (C,) -- the first conv (stride 2).
        conv2_weight: (C, C, 3, 3), conv2_bias: (C,) -- the second conv (stride 2).
        dtype: compute dtype of the GEMM (float32, float16 or bfloat16); also the output dtype.
    """
    c = conv1_weight.shape[0]
    _check_conv("conv1", conv1_weight, 1)
    _check_conv("conv2", conv2_weight, c)
    if conv2_weight.shape[0] != c:
        raise ValueError(f"conv2 must have {c} output channels, got {conv2_weight.shape[0]}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"compute dtype must be float32, float16 or bfloat16, got {dtype}")
    w1 = conv1_weight.detach().float().reshape(c, 3, 3)  # (C, p, q)
    patch = torch.zeros(9, 7, 7, c, device=w1.device)  # (tap, r, s, C)
    for i in range(3):
        for j in range(3):
            patch[i * 3 + j, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3] = w1.permute(1, 2, 0)
    patch = torch.cat(
        [
            patch.reshape(9, 49, c),
            conv1_bias.detach().float().expand(9, 1, c),  # row 49: the bias
            torch.zeros(9, PATCH - 50, c, device=w1.device),
        ],
        dim=1,
    )  # (9, PATCH, C)
    w2 = conv2_weight.detach().permute(2, 3, 1, 0).reshape(9 * c, c)  # (9*C_in, C_out)
    w1_3x3 = torch.cat(
        [w1.reshape(c, 9).t(), conv1_bias.detach().float()[None], w1.new_zeros(6, c)]
    )  # (16, C)
    return ConvSubsamplingWeights(
        w1=patch.reshape(9 * PATCH, c).to(dtype).contiguous(),
        w2=w2.to(dtype).contiguous(),
        b2=conv2_bias.detach().float().contiguous(),
        w1_3x3=w1_3x3.to(dtype).contiguous(),
    )


def output_size(n: int) -> int:
    """Frames (or bins) left after the two 3x3 stride-2 convs: ``((n - 1) // 2 - 1) // 2``."""
    n1 = (n - 3) // 2 + 1 if n >= 3 else 0
    return (n1 - 3) // 2 + 1 if n1 >= 3 else 0


def _default_config(m: int, c: int, dtype: torch.dtype, device: torch.device) -> ConvFrontConfig:
    """Tiles by problem size: all C channels in one tile when C <= 256 (the A operand is then
    computed once per row tile); 64-row tiles when 128-row tiles would leave SMs idle."""
    block_n = max(16, min(256, next_power_of_2(c)))
    if interpreting():  # few, large programs: the interpreter's cost is per program and op
        block_m = max(16, min(2048, next_power_of_2(m)))
        return ConvFrontConfig(block_m, block_n, max(16, min(64, next_power_of_2(c))), 4, 1)
    if dtype == torch.float32:
        return CONFIGS_FP32[0]
    n_sm = sm_count(device)
    # H200 sweep (BENCHMARKS.md, C=256 fp16): 128x256 k64 fastest from 16x256 frames up (2.6-2.7x
    # cuDNN), 64x128 k64 fastest when 128-row tiles would leave SMs idle (1x1024: 1.56x).
    if cdiv(m, 128) >= n_sm:
        return ConvFrontConfig(128, block_n, 64, 8, 3)
    return ConvFrontConfig(64, min(block_n, 128), 64, 4, 3)


def _gluon_front(m: int, c: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``config=None`` takes the Gluon kernel (see :data:`GLUON`): from half a wave of
    its 128-row tiles (1 x 1024 frames, 38 tiles: 38.2 vs 37.8 us for the 64-row Triton tiles)."""
    if not GLUON or interpreting() or not conv_front_wgmma.supported(c, dtype, device):
        return False
    return cdiv(m, conv_front_wgmma.BLOCK_M) * 2 >= sm_count(device)


def _check_cmvn(mean: torch.Tensor | None, istd: torch.Tensor | None, f: int) -> None:
    if (mean is None) != (istd is None):
        raise ValueError("CMVN needs both mean and istd, or neither")
    for name, t in (("mean", mean), ("istd", istd)):
        if t is not None and (t.dim() != 1 or t.shape[0] != f):
            raise ValueError(f"CMVN {name} must be ({f},), got {tuple(t.shape)}")


def conv_subsampling(
    x: torch.Tensor,
    weights: ConvSubsamplingWeights,
    mean: torch.Tensor | None = None,
    istd: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: ConvFrontConfig | None = None,
) -> torch.Tensor:
    """``relu(conv2(relu(conv1(CMVN(x)))))`` flattened NHWC, in one kernel launch.

    Args:
        x: (B, T, F) features (float32/float16/bfloat16, any strides); read as float32.
        weights: from :func:`pack_conv_subsampling`.
        mean, istd: (F,) CMVN applied as ``(x - mean) * istd`` on the way in, or None.
        out: optional preallocated (B, T2, F2 * C) output in the weights' dtype.
        config: launch configuration of this module's kernel (benchmarks sweep :data:`CONFIGS`);
            None picks one, or the Gluon kernel where :data:`GLUON` allows.
    Returns:
        (B, T2, F2 * C) in the weights' dtype, column ``f * C + c``; T2 = ((T - 1) // 2 - 1)
        // 2 and F2 likewise (0 when T < 7 or F < 7).
    """
    check_float("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, F), got {tuple(x.shape)}")
    b, t, f = x.shape
    _check_cmvn(mean, istd, f)
    w = weights
    c = w.channels
    reason = channels_unsupported(c, w.dtype, x.is_cuda)
    if reason:
        raise UnsupportedOptionError(reason)
    t2, f2 = output_size(t), output_size(f)
    y = out_or_empty(out, (b, t2, f2 * c), w.dtype, x.device)
    tensors = [x, w.w1, w.w2, w.b2] + [v for v in (mean, istd) if v is not None]
    check_launch(_conv_front_kernel, *tensors)
    m = b * t2 * f2
    if m == 0:
        return y
    cmvn = mean is not None
    mean_t = mean.float().contiguous() if cmvn else w.b2
    istd_t = istd.float().contiguous() if cmvn else w.b2
    if config is None and _gluon_front(m, c, w.dtype, x.device):
        conv_front_wgmma.conv_front_wgmma(x, w, mean_t, istd_t, cmvn, y, m, t2, f2)
        return y
    cfg = config or _default_config(m, c, w.dtype, x.device)
    # With UPCAST (float32, or bfloat16 under TRITON_INTERPRET, whose casts to bf16 truncate)
    # the patch and conv1 values stay float32; only the weights and the output are bf16.
    precision = dot_precision(w.dtype)
    grid = (cdiv(m, cfg.block_m), cdiv(c, cfg.block_n))
    _conv_front_kernel[grid](
        x, mean_t, istd_t, w.w1, w.w2, w.b2, y,
        m, t2 * f2, f2, c,
        x.stride(0), x.stride(1), x.stride(2), w.w1.stride(0), w.w2.stride(0), c,
        HAS_CMVN=cmvn, **precision,
        PATCH=PATCH, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def conv_subsampling_ref(
    x: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    mean: torch.Tensor | None = None,
    istd: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain torch: CMVN in float32, then the two ``F.conv2d`` + ReLU in conv2_weight's dtype
    (float32 without TF32 on CUDA).

    x (B, T, F) -> (B, T2, F2 * C) in conv2_weight's dtype, column ``f * C + c``. ``upcast``
    computes everything in float32 (the output stays float32).
    """
    dtype = torch.float32 if upcast else conv2_weight.dtype
    h = x.float()
    if mean is not None:
        h = (h - mean.float()) * istd.float()
    h = h.to(dtype).unsqueeze(1)  # (B, 1, T, F)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # exact float32 on CUDA
        h = torch.relu(F.conv2d(h, conv1_weight.to(dtype), conv1_bias.to(dtype), stride=2))
        h = torch.relu(F.conv2d(h, conv2_weight.to(dtype), conv2_bias.to(dtype), stride=2))
    b, c, t2, f2 = h.shape  # (B, C, T2, F2)
    return h.permute(0, 2, 3, 1).reshape(b, t2, f2 * c)  # (B, T2, F2 * C)
