"""linear_add_layer_norm (bias, residual add and LayerNorm in the GEMM epilogue) against torch.

Awkward sizes (rows, K and D not multiples of a tile, D = 24/144/256), three dtypes, scale 0.5
and 1, with and without the linear's bias. The gold value is the float64 reference; float32 is
held to 1e-5-scale tolerances, half precision to twice the error of the unfused torch path
(F.linear in that dtype, then float32 add + LayerNorm), four times for bfloat16 under the
interpreter (which truncates float32 -> bfloat16). The residual is updated in place.
"""

from __future__ import annotations

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._utils import interpreting
from speechrt.kernels.linear_add_layer_norm import (
    CONFIGS,
    AddLnConfig,
    linear_add_layer_norm,
    linear_add_layer_norm_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading shape of z, K, D)
SHAPES = [((1,), 48, 24), ((37,), 700, 144), ((2, 150), 96, 256), ((300,), 130, 256)]


def _inputs(lead, k, d, device, dtype=torch.float32, bias=True):
    z = torch.randn(*lead, k, device=device).to(dtype)
    w = (torch.randn(d, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(d, device=device).to(dtype) if bias else None
    r = 3 * torch.randn(*lead, d, device=device) + 1.0  # a mean and spread for the LN to remove
    lw = (1 + 0.5 * torch.randn(d, device=device)).to(dtype)
    lb = (0.5 * torch.randn(d, device=device)).to(dtype)
    return z, w, b, r, lw, lb


def _check(out, gold, torch_out, dtype, check_output, max_err, atol=1e-5, rtol=1e-5):
    if dtype == torch.bfloat16 and interpreting():
        err, torch_err = max_err(out, gold), max_err(torch_out, gold)
        assert err <= 4 * torch_err + 1e-4, f"kernel error {err:.3g}, torch bf16 {torch_err:.3g}"
    else:
        check_output(out, gold, torch_out, dtype, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale, bias", [(0.5, True), (1.0, False)])
@pytest.mark.parametrize("lead, k, d", SHAPES)
def test_matches_linear_add_layer_norm(
    lead, k, d, scale, bias, dtype, device, check_output, max_err
):
    z, w, b, r, lw, lb = _inputs(lead, k, d, device, dtype, bias)
    kw = dict(bias=b, scale=scale)
    gold_h, gold_y = linear_add_layer_norm_ref(z, w, r, lw, lb, 1e-5, **kw, upcast=True)
    torch_h, torch_y = linear_add_layer_norm_ref(z, w, r, lw, lb, 1e-5, **kw)
    residual = r.clone()
    h, y = linear_add_layer_norm(z, w, residual, lw, lb, 1e-5, **kw)
    assert h.data_ptr() == residual.data_ptr()  # the residual stream is updated in place
    assert h.dtype == torch.float32 and y.dtype == dtype and y.shape == r.shape
    # h is float32 whatever the dtype: the GEMM accumulates exactly-rounded half products.
    _check(h, gold_h, torch_h, torch.float32 if dtype == torch.float32 else dtype,
           check_output, max_err, atol=1e-4)  # fmt: skip
    _check(y, gold_y, torch_y, dtype, check_output, max_err, atol=5e-5, rtol=1e-4)


def test_float64_formula_and_y_dtype(device):
    """The epilogue against the LayerNorm formula in float64 (independent of F.layer_norm),
    no LayerNorm affine parameters, y kept in float32 from a float32 stream."""
    z, w, b, r, _, _ = _inputs((45,), 80, 144, device)
    h64 = r.double() + 0.5 * (z.double() @ w.double().T + b.double())
    mean = h64.mean(-1, keepdim=True)
    var = ((h64 - mean) ** 2).mean(-1, keepdim=True)
    y64 = (h64 - mean) / torch.sqrt(var + 1e-12)
    h, y = linear_add_layer_norm(
        z, w, r, None, None, 1e-12, bias=b, scale=0.5, y_dtype=torch.float32
    )
    torch.testing.assert_close(h.double(), h64, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y.double(), y64, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [AddLnConfig(16, 16, 4, 1), AddLnConfig(32, 64, 4, 1)], ids=str)
def test_explicit_configs_half_stream_to_float(config, device):
    """Several row tiles with a ragged last one, ragged K steps, float16 z with y in float32."""
    z, w, b, r, lw, lb = _inputs((70,), 72, 40, device, torch.float16)
    gold_h, gold_y = linear_add_layer_norm_ref(z, w, r, lw, lb, bias=b, upcast=True)
    h, y = linear_add_layer_norm(z, w, r, lw, lb, bias=b, y_dtype=torch.float32, config=config)
    assert y.dtype == torch.float32
    torch.testing.assert_close(h, gold_h, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y, gold_y, atol=1e-4, rtol=1e-4)


def test_strided_rows(device):
    base, w, b, r, lw, lb = _inputs((9, 2), 32, 24, device)
    z = base[:, 1]  # (9, 32), row stride 64
    r = r[:, 1].contiguous()
    gold_h, gold_y = linear_add_layer_norm_ref(z, w, r, lw, lb, bias=b, upcast=True)
    h, y = linear_add_layer_norm(z, w, r, lw, lb, bias=b)
    torch.testing.assert_close(h, gold_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, gold_y, atol=2e-5, rtol=1e-5)


def test_rejects_bad_inputs(device):
    z, w, b, r, lw, lb = _inputs((4,), 8, 24, device)
    wide = torch.randn(257, 8, device=device)
    with pytest.raises(UnsupportedOptionError, match="D <= 256"):
        linear_add_layer_norm(z, wide, torch.zeros(4, 257, device=device), None, None)
    with pytest.raises(ValueError, match="float16"):
        linear_add_layer_norm(z, w.half(), r, lw, lb)
    with pytest.raises(ValueError, match="float32"):
        linear_add_layer_norm(z, w, r.half(), lw, lb)
    with pytest.raises(ValueError, match="residual"):
        linear_add_layer_norm(z, w, r[:3], lw, lb)
    with pytest.raises(ValueError, match="weight"):
        linear_add_layer_norm(z, w[:, :7], r, lw, lb)
    with pytest.raises(ValueError, match="bias"):
        linear_add_layer_norm(z, w, r, lw, lb, bias=b[:5])
    with pytest.raises(TypeError, match="float32"):
        linear_add_layer_norm(z.double(), w.double(), r, lw, lb)


def test_imports_without_triton(import_without_triton):
    module = import_without_triton("speechrt.kernels.linear_add_layer_norm")
    z, w, b, r, lw, lb = _inputs((4,), 8, 24, "cpu")
    with pytest.raises(UnsupportedOptionError, match="triton"):
        module.linear_add_layer_norm(z, w, r, lw, lb)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [256, 2048])
def test_conformer_shapes_every_config(k, config, dtype, device, check_output, max_err):
    """Every benchmarked config at the Conformer's D = 256 sites (rows not a tile multiple)."""
    z, w, b, r, lw, lb = _inputs((1000,), k, 256, device, dtype)
    gold_h, gold_y = linear_add_layer_norm_ref(z, w, r, lw, lb, bias=b, scale=0.5, upcast=True)
    torch_h, torch_y = linear_add_layer_norm_ref(z, w, r, lw, lb, bias=b, scale=0.5)
    h, y = linear_add_layer_norm(z, w, r.clone(), lw, lb, bias=b, scale=0.5, config=config)
    _check(h, gold_h, torch_h, dtype, check_output, max_err)
    _check(y, gold_y, torch_y, dtype, check_output, max_err)
