"""linear_fp32_out: half-precision inputs, the product kept in float32 (no output rounding)."""

from __future__ import annotations

import pytest
import torch

from speechrt.kernels.gemm import linear_fp32_out, mm_fp32_out_supported


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_equals_float64_product_of_the_same_inputs(dtype, device):
    x = torch.randn(3, 37, 48, device=device).to(dtype)
    w = (torch.randn(20, 48, device=device) / 7).to(dtype)
    y = linear_fp32_out(x, w)
    assert y.dtype == torch.float32 and y.shape == (3, 37, 20)
    gold = x.double() @ w.double().T  # half values are exact in float64 and float32
    torch.testing.assert_close(y.double(), gold, atol=1e-5, rtol=1e-5)
    if dtype != torch.float32:  # the half-precision output would be rounded far more
        rounded = (x @ w.T).double() if device == "cuda" else gold.to(dtype).double()
        assert (y.double() - gold).abs().max() < (rounded - gold).abs().max() / 4


def test_mismatched_weight_dtype_is_an_error(device):
    x = torch.randn(4, 8, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="weight is torch.float32"):
        linear_fp32_out(x, torch.randn(3, 8, device=device))


def test_probe_is_cached_and_boolean(device):
    first = mm_fp32_out_supported(torch.device(device), torch.bfloat16)
    assert first in (True, False)
    assert mm_fp32_out_supported(torch.device(device), torch.bfloat16) is first
    assert mm_fp32_out_supported(torch.device(device), torch.float32)


@pytest.mark.gpu
def test_cuda_build_has_the_cublas_float32_output():
    """torch 2.11 + CUDA: the cuBLAS path is used (not the float32 fallback GEMM)."""
    assert mm_fp32_out_supported(torch.device("cuda"), torch.bfloat16)
    assert mm_fp32_out_supported(torch.device("cuda"), torch.float16)
