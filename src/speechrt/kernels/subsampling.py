"""First convolution of a Conv2d subsampling front, fused with CMVN and ReLU, written channels-last.

WeNet's input layer starts with ``Conv2d(1, C, k, s)`` over (time, mel) followed by ReLU, on
CMVN-normalised fbank. With one input channel each output is a k*k-tap dot product: cheap to
compute, expensive to store (C values per position). This kernel reads raw fbank, applies CMVN,
the conv, bias and ReLU, and writes (B, T1, F1, C) once in the compute dtype, the NHWC layout the
next cuDNN convolution reads directly.
"""

from __future__ import annotations

import torch

from speechrt.kernels._utils import (
    MISSING_TL,
    MISSING_TRITON,
    cdiv,
    check_launch,
    next_power_of_2,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the launcher raises UnsupportedOptionError instead
    triton, tl = MISSING_TRITON, MISSING_TL


@triton.jit
def _conv1_cmvn_relu_kernel(
    X,  # (B, T, F) float32 raw fbank
    MEAN,  # (F,)
    ISTD,  # (F,)
    W,  # (C, K_T, K_F) float32
    BIAS,  # (C,)
    Y,  # (B, T1, F1, C)
    T,
    F,
    T1,
    F1,
    C,
    stride_xb,
    stride_xt,
    K_T: tl.constexpr,
    K_F: tl.constexpr,
    S_T: tl.constexpr,
    S_F: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)  # b * T1 + t1
    b = row // T1
    t1 = row % T1
    f1 = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    c = tl.arange(0, BLOCK_C)
    f_ok = f1 < F1
    c_ok = c < C
    acc = tl.zeros((BLOCK_F, BLOCK_C), dtype=tl.float32)
    acc += tl.load(BIAS + c, mask=c_ok, other=0.0)[None, :]
    x_row = X + b.to(tl.int64) * stride_xb
    for kt in tl.static_range(K_T):
        t = t1 * S_T + kt
        for kf in tl.static_range(K_F):
            f = f1 * S_F + kf
            m = tl.load(MEAN + f, mask=f_ok, other=0.0)
            s = tl.load(ISTD + f, mask=f_ok, other=0.0)
            x = tl.load(x_row + t * stride_xt + f, mask=f_ok, other=0.0)
            x = (x - m) * s
            w = tl.load(W + c * (K_T * K_F) + kt * K_F + kf, mask=c_ok, other=0.0)
            acc += x[:, None] * w[None, :]
    acc = tl.maximum(acc, 0.0)
    y_ptr = Y + (row.to(tl.int64) * F1 + f1[:, None]) * C + c[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=f_ok[:, None] & c_ok[None, :])


def conv1_cmvn_relu(
    feats: torch.Tensor,
    mean: torch.Tensor,
    istd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: tuple[int, int],
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """relu(conv2d(((feats - mean) * istd)[:, None], weight, bias, stride)) as (B, T1, F1, C).

    Args:
        feats: (B, T, F) raw fbank (float32, unit last stride).
        mean, istd: (F,) CMVN statistics.
        weight: (C, 1, K_T, K_F) conv weight; bias: (C,).
        stride: (S_T, S_F).
    Returns:
        (B, T1, F1, C) contiguous in ``out_dtype``; ``.permute(0, 3, 1, 2)`` is the NCHW view
        of the same memory in channels-last layout.
    """
    check_launch(_conv1_cmvn_relu_kernel, feats, mean, istd, weight, bias)
    if feats.dim() != 3 or feats.stride(2) != 1:
        raise ValueError(f"feats must be (B, T, F) with unit last stride, got {tuple(feats.shape)}")
    b, t, f = feats.shape
    c, cin, kt, kf = weight.shape
    if cin != 1:
        raise ValueError(f"conv1_cmvn_relu needs one input channel, got {cin}")
    st, sf = stride
    t1, f1 = max((t - kt) // st + 1, 0), (f - kf) // sf + 1
    y = torch.empty(b, t1, f1, c, device=feats.device, dtype=out_dtype)
    if b * t1 == 0:
        return y
    block_c = next_power_of_2(c)
    block_f = max(1, min(next_power_of_2(f1), 8192 // block_c))
    grid = (b * t1, cdiv(f1, block_f))
    _conv1_cmvn_relu_kernel[grid](
        feats, mean.float().contiguous(), istd.float().contiguous(),
        weight.float().reshape(c, kt, kf).contiguous(), bias.float().contiguous(), y,
        t, f, t1, f1, c, feats.stride(0), feats.stride(1),
        K_T=kt, K_F=kf, S_T=st, S_F=sf, BLOCK_F=block_f, BLOCK_C=block_c,
        num_warps=4 if block_f * block_c <= 4096 else 8,
    )
    return y


def conv1_cmvn_relu_ref(feats, mean, istd, weight, bias, stride, out_dtype=torch.float16):
    """Plain torch: CMVN, conv2d, ReLU, permuted to (B, T1, F1, C)."""
    x = ((feats.float() - mean.float()) * istd.float()).unsqueeze(1)  # (B, 1, T, F)
    y = torch.relu(torch.nn.functional.conv2d(x, weight.float(), bias.float(), stride))
    return y.permute(0, 2, 3, 1).to(out_dtype).contiguous()
