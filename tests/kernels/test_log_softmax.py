"""log_softmax / linear_log_softmax kernels against F.log_softmax(F.linear) in float32."""

import pytest
import torch
import torch.nn.functional as F

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels.log_softmax import (
    linear_log_softmax,
    linear_log_softmax_ref,
    log_softmax,
    log_softmax_ref,
)

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
NEG_INF = float("-inf")


def _nan(shape, device):
    return torch.full(shape, float("nan"), device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("v", [7, 60, 130, 4233])
def test_log_softmax(v, rows, dtype, device, check_output):
    x = (torch.randn(rows, v, device=device) * 4).to(dtype)
    y = log_softmax(x, out=_nan((rows, v), device))
    assert y.dtype == torch.float32
    check_output(y, log_softmax_ref(x, upcast=True), log_softmax_ref(x), dtype)


@pytest.mark.parametrize("v", [130, 9001])  # one tile, and the multi-tile online loop
def test_log_softmax_extreme_rows(v, device):
    x = torch.randn(6, v, device=device) * 3
    x[0, ::2] = NEG_INF  # masked vocabulary
    x[1] = NEG_INF
    x[1, v // 2] = 0.5  # a single finite entry -> log-prob 0
    x[2] = -1e30  # uniform, far below zero
    x[3] *= 1e4  # large spread
    x[4, : v // 2] = NEG_INF  # whole first tiles are -inf
    x[5] += 1e4  # large offset: needs (x - max) - log(sum), not x - lse
    y = log_softmax(x, out=_nan((6, v), device))
    gold = F.log_softmax(x.double(), dim=-1).float()
    torch.testing.assert_close(y, gold, atol=1e-5, rtol=1e-6)  # rtol: |y| reaches 1e5
    assert y[1, v // 2] == 0 and (y[1, : v // 2] == NEG_INF).all()


def test_log_softmax_half_overflow(device, max_err):
    """fp16 logits near the float16 limit: exp-sums in float16 would overflow."""
    x = (torch.rand(3, 4233, device=device) * 6e4 - 3e4).half()
    y = log_softmax(x)
    assert max_err(y, log_softmax_ref(x, upcast=True)) < 1e-3


def test_log_softmax_strided_leading_dims(device):
    wide = torch.randn(2, 3, 60 + 4, device=device)
    x = wide[..., :60]  # (2, 3, 60), row stride 64
    torch.testing.assert_close(log_softmax(x), log_softmax_ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("n, d, v", [(1, 5, 7), (7, 64, 60), (33, 123, 130), (1, 256, 130)])
def test_linear_log_softmax(n, d, v, has_bias, dtype, device, check_output):
    x = torch.randn(n, d, device=device).to(dtype)
    w = (torch.randn(v, d, device=device) * 2 / d**0.5).to(dtype)
    b = torch.randn(v, device=device) if has_bias else None
    y = linear_log_softmax(x, w, b, out=_nan((n, v), device))
    gold = linear_log_softmax_ref(x, w, b, upcast=True)
    torch_y = linear_log_softmax_ref(x, w, b.to(dtype) if has_bias else None)
    check_output(y, gold, torch_y, dtype, atol=2e-5, rtol=1e-5)


def test_linear_log_softmax_half_logits_overflow(device, max_err):
    """Logits beyond float16's range: torch's fp16 projection overflows, the kernel does not."""
    n, d, v = 7, 123, 130
    x = (torch.randn(n, d, device=device) * 60).half()
    w = (torch.randn(v, d, device=device) * 60).half()
    gold = F.log_softmax(F.linear(x.double(), w.double()), dim=-1)
    assert not torch.isfinite(linear_log_softmax_ref(x, w, None)).all()
    y = linear_log_softmax(x, w, None)
    assert max_err(y, gold) <= 1e-6 * float(gold.abs().max()) + 1e-2


def test_linear_log_softmax_masked_vocab(device, max_err):
    """-inf biases (banned tokens) fill whole vocabulary tiles."""
    x, w = torch.randn(3, 64, device=device), torch.randn(300, 64, device=device) / 8
    b = torch.zeros(300, device=device)
    b[:200] = NEG_INF
    y = linear_log_softmax(x, w, b)
    assert max_err(y, linear_log_softmax_ref(x, w, b)) < 1e-5
    assert (y[:, :200] == NEG_INF).all()


def test_linear_log_softmax_strided_rows(device):
    x = torch.randn(7, 40, device=device)[:, :33]  # row stride 40
    w = torch.randn(60, 33, device=device)
    torch.testing.assert_close(
        linear_log_softmax(x, w, None), linear_log_softmax_ref(x, w, None), atol=2e-5, rtol=1e-5
    )


def test_bad_inputs_raise(device):
    x, w = torch.randn(3, 8, device=device), torch.randn(5, 8, device=device)
    with pytest.raises(TypeError, match="dtype"):
        linear_log_softmax(x, w.half(), None)
    with pytest.raises(ValueError, match="weight"):
        linear_log_softmax(x, w[:, :7], None)
    with pytest.raises(ValueError, match="bias"):
        linear_log_softmax(x, w, torch.zeros(4, device=device))


def test_imports_without_triton(import_without_triton):
    module = import_without_triton("speechrt.kernels.log_softmax")
    with pytest.raises(UnsupportedOptionError, match="triton"):
        module.log_softmax(torch.randn(2, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conformer_shapes(dtype, device, check_output):
    n, d, v = 640, 256, 4233
    x = torch.randn(n, d, device=device).to(dtype)
    w = (torch.randn(v, d, device=device) / d**0.5).to(dtype)
    b = torch.randn(v, device=device)
    y = linear_log_softmax(x, w, b)
    gold = linear_log_softmax_ref(x, w, b, upcast=True)
    check_output(y, gold, linear_log_softmax_ref(x, w, b.to(dtype)), dtype)
    logits = (torch.randn(n, 51865, device=device) * 4).to(dtype)
    check_output(
        log_softmax(logits), log_softmax_ref(logits, upcast=True), log_softmax_ref(logits), dtype
    )
