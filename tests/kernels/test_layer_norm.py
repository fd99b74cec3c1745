"""layer_norm / add_layer_norm kernels against F.layer_norm in float32 (the ``_ref`` functions)."""

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._utils import check_launch
from speechrt.kernels.layer_norm import (
    add_double_layer_norm,
    add_double_layer_norm_ref,
    add_layer_norm,
    add_layer_norm_ref,
    layer_norm,
    layer_norm_ref,
    widen_layer_norm,
)

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _params(d, device):
    return torch.randn(d, device=device), torch.randn(d, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("d", [5, 64, 123, 256])
def test_layer_norm(d, rows, dtype, device, check_output):
    x = (torch.randn(rows, d, device=device) * 3 + 1).to(dtype)
    w, b = _params(d, device)
    y = layer_norm(x, w, b, 1e-5, out=_nan((rows, d), dtype, device))
    assert y.dtype == dtype
    gold = layer_norm_ref(x.float(), w, b, 1e-5)
    check_output(y, gold, layer_norm_ref(x, w, b, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("rows, d", [(1, 5), (33, 123), (70, 256), (9, 300)])
def test_widen_layer_norm(rows, d, dtype, device):
    """A half-precision input stored in float32 (exactly: every half value is a float32 value)
    and normalised in the same kernel: equal to x.float() then layer_norm."""
    x = (torch.randn(2, rows, d, device=device) * 3 + 1).to(dtype)
    w, b = _params(d, device)
    s, y = widen_layer_norm(x, w, b, 1e-5, y_dtype=dtype)
    assert s.dtype == torch.float32 and y.dtype == dtype and s.shape == y.shape == x.shape
    assert torch.equal(s, x.float())
    torch.testing.assert_close(y, layer_norm(x.float(), w, b, 1e-5, y_dtype=dtype), atol=0, rtol=0)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_strided_leading_dims(affine, device):
    wide = torch.randn(2, 5, 123 + 9, device=device)
    x = wide[..., :123]  # (2, 5, 123) with row stride 132
    w, b = _params(123, device) if affine else (None, None)
    y = layer_norm(x, w, b, 1e-6)
    assert y.shape == x.shape
    torch.testing.assert_close(y, layer_norm_ref(x, w, b, 1e-6), atol=1e-5, rtol=1e-5)


CASES = {  # name: (scale, has x_bias, residual dtype = float32 whatever x's dtype)
    "plain": (1.0, False, False),
    "macaron": (0.5, True, False),
    "fp32_residual": (0.5, True, True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rows, d", [(1, 5), (33, 123), (7, 256)])
def test_add_layer_norm(rows, d, case, dtype, device, check_output):
    scale, has_xb, fp32_res = CASES[case]
    x = torch.randn(3, rows, d, device=device).to(dtype)  # (3, rows, D)
    residual = (torch.randn(3, rows, d, device=device) * 4).to(torch.float32 if fp32_res else dtype)
    xb = torch.randn(d, device=device).to(dtype) if has_xb else None
    w, b = _params(d, device)
    h, y = add_layer_norm(
        x,
        residual,
        w,
        b,
        1e-5,
        x_bias=xb,
        scale=scale,
        h_out=_nan(x.shape, residual.dtype, device),
        y_out=_nan(x.shape, dtype, device),
    )
    assert h.dtype == residual.dtype and y.dtype == dtype
    x32, xb32 = x.float(), (xb.float() if has_xb else None)
    h_gold, y_gold = add_layer_norm_ref(x32, residual.float(), w, b, 1e-5, x_bias=xb32, scale=scale)
    h_torch, y_torch = add_layer_norm_ref(x, residual, w, b, 1e-5, x_bias=xb, scale=scale)
    check_output(h, h_gold, h_torch, residual.dtype)
    check_output(y, y_gold, y_torch, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine2", [True, False])
@pytest.mark.parametrize("rows, d", [(1, 5), (33, 123), (7, 256)])
def test_add_double_layer_norm(rows, d, affine2, dtype, device, check_output):
    """Add, LN1 stored in the float32 stream, LN2 of it: against the float64 formulas and the
    plain-torch reference."""
    x = torch.randn(2, rows, d, device=device).to(dtype)
    residual = torch.randn(2, rows, d, device=device) * 4 + 1
    xb = torch.randn(d, device=device).to(dtype)
    ln1 = (*_params(d, device), 1e-5)
    ln2 = (*_params(d, device), 1e-12) if affine2 else (None, None, 1e-5)
    s_out = _nan(x.shape, torch.float32, device)
    residual_before = residual.clone()
    s, y = add_double_layer_norm(x, residual, ln1, ln2, x_bias=xb, scale=0.5, s_out=s_out)
    assert s.data_ptr() == s_out.data_ptr() and s.dtype == torch.float32 and y.dtype == dtype
    assert torch.equal(residual, residual_before)  # not updated in place: s went to s_out

    def ln64(t, w, b, eps):
        t = t.double()
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        return t * (1 if w is None else w.double()) + (0 if b is None else b.double())

    h64 = residual.double() + 0.5 * (x.double() + xb.double())
    s64 = ln64(h64, *ln1)
    torch.testing.assert_close(s.double(), s64, atol=2e-5, rtol=1e-5)
    s_gold, y_gold = add_double_layer_norm_ref(
        x, residual, ln1, ln2, x_bias=xb, scale=0.5, upcast=True
    )
    _, y_torch = add_double_layer_norm_ref(x, residual, ln1, ln2, x_bias=xb, scale=0.5)
    if dtype == torch.float32:  # y normalises the stored s
        torch.testing.assert_close(y.double(), ln64(s, *ln2), atol=2e-5, rtol=1e-5)
    check_output(s, s_gold, s_gold, torch.float32)
    check_output(y, y_gold, y_torch, dtype)


def test_add_layer_norm_in_place_residual(device):
    x, residual = torch.randn(2, 7, 64, device=device), torch.randn(2, 7, 64, device=device)
    w, b = _params(64, device)
    h_ref, y_ref = add_layer_norm_ref(x, residual, w, b, scale=0.5)
    h, y = add_layer_norm(x, residual, w, b, scale=0.5, h_out=residual)
    assert h.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(residual, h_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_large_magnitude_half(device, check_output):
    """fp16 rows whose squares (and the float32 residual sum) overflow float16."""
    d = 123
    x = (torch.randn(7, d, device=device) * 2e3 + 2e4).to(torch.float16)
    w, b = _params(d, device)
    y = layer_norm(x, w, b)
    assert torch.isfinite(y).all()
    check_output(y, layer_norm_ref(x.float(), w, b), layer_norm_ref(x, w, b), torch.float16)
    residual = torch.full((7, d), 6e4, device=device)  # + x > float16 max
    h, y = add_layer_norm(x, residual, w, b)
    h_gold, y_gold = add_layer_norm_ref(x.float(), residual, w, b)
    torch.testing.assert_close(h, h_gold, atol=0, rtol=0)
    _, y_torch = add_layer_norm_ref(x, residual, w, b)
    check_output(y, y_gold, y_torch, torch.float16)


def test_bad_shapes_raise(device):
    x = torch.randn(3, 10, device=device)
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, torch.ones(9, device=device), None)
    with pytest.raises(ValueError, match="residual"):
        add_layer_norm(x, torch.randn(3, 9, device=device), None, None)
    with pytest.raises(ValueError, match="out"):
        layer_norm(x, None, None, out=torch.empty(3, 10, dtype=torch.float16, device=device))


def test_cpu_tensors_need_interpreter():
    class JITFunction:  # stands for a kernel compiled for the GPU
        pass

    with pytest.raises(UnsupportedOptionError, match="TRITON_INTERPRET"):
        check_launch(JITFunction(), torch.zeros(1))


def test_imports_without_triton(import_without_triton):
    module = import_without_triton("speechrt.kernels.layer_norm")
    x = torch.randn(2, 8)
    with pytest.raises(UnsupportedOptionError, match="triton"):
        module.layer_norm(x, None, None)
    torch.testing.assert_close(module.layer_norm_ref(x, None, None), layer_norm_ref(x, None, None))
