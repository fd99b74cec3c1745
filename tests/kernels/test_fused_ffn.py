"""ffn_add_layer_norm (whole FFN + residual add + LayerNorm in one kernel) against torch.

Awkward sizes (rows not a multiple of BLOCK_M, D = 80/144 not powers of two, H not a multiple of
BLOCK_H), three dtypes, scale 0.5 and 1, with and without the second bias, every activation.
Three oracles: the float32 reference with the hidden rounded as the kernel rounds it (tight
tolerances), the existing two-kernel path (linear_act then linear_add_layer_norm, the same
up to summation order), and the exact float64 FFN, to which half precision is held at twice the
error of the unfused PyTorch path in that dtype (four times for bfloat16 under the interpreter,
which truncates float32 -> bfloat16 instead of rounding).
"""

from __future__ import annotations

import math

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._utils import interpreting
from speechrt.kernels.fused_ffn import (
    CONFIGS,
    FfnConfig,
    ffn_add_layer_norm,
    ffn_add_layer_norm_ref,
)
from speechrt.kernels.linear_act import linear_act, linear_act_ref
from speechrt.kernels.linear_add_layer_norm import (
    linear_add_layer_norm,
    linear_add_layer_norm_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading shape of y, D, H, config): several row tiles with a ragged last one, ragged H chunks.
SHAPES = [
    ((37,), 144, 200, FfnConfig(16, 32, 4, 1)),
    ((2, 45), 80, 72, None),
    ((130,), 256, 100, FfnConfig(32, 64, 4, 1)),
]
# Kernel vs the rounded-hidden reference / the two-kernel path: (h atol, y atol, y rtol).
TOL = {
    torch.float32: (1e-4, 1e-4, 1e-5),
    torch.float16: (1e-3, 4e-3, 2e-3),
    # Under the interpreter the kernel truncates the hidden to bfloat16, the reference rounds.
    torch.bfloat16: (3e-2 if interpreting() else 2e-3, 3.2e-2, 1.6e-2),
}
ACT64 = {
    "identity": lambda h: h,
    "swish": lambda h: h / (1 + torch.exp(-h)),
    "silu": lambda h: h / (1 + torch.exp(-h)),
    "relu": lambda h: h.clamp_min(0),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
}


def _inputs(lead, d, h, device, dtype=torch.float32, b2=True):
    y = torch.randn(*lead, d, device=device).to(dtype)
    w1 = (torch.randn(h, d, device=device) / d**0.5).to(dtype)
    b1 = (0.5 * torch.randn(h, device=device)).to(dtype)
    w2 = (torch.randn(d, h, device=device) / h**0.5).to(dtype)
    bias2 = torch.randn(d, device=device).to(dtype) if b2 else None
    x = 3 * torch.randn(*lead, d, device=device) + 1.0  # a mean and spread for the LN to remove
    lw = 1 + 0.5 * torch.randn(d, device=device)  # float32, as the engine keeps them
    lb = 0.5 * torch.randn(d, device=device)
    return y, w1, b1, w2, bias2, x, lw, lb


def _close(out, expected, atol, rtol=0.0):
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


def _unfused_torch(y, w1, b1, w2, b2, x, lw, lb, scale, act):
    """What a PyTorch FFN runs in y's dtype: linear + act, linear (rounded branch), then the
    float32 add + LayerNorm."""
    hidden = linear_act_ref(y, w1, b1, act)
    return linear_add_layer_norm_ref(hidden, w2, x, lw, lb, bias=b2, scale=scale)


def _check_vs_gold(out, gold, torch_out, dtype, check_output, max_err):
    if dtype == torch.bfloat16 and interpreting():
        err, torch_err = max_err(out, gold), max_err(torch_out, gold)
        assert err <= 4 * torch_err + 1e-4, f"kernel error {err:.3g}, torch bf16 {torch_err:.3g}"
    else:
        check_output(out, gold, torch_out, dtype, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale, b2", [(0.5, True), (1.0, False)])
@pytest.mark.parametrize("lead, d, h, config", SHAPES)
def test_matches_reference_and_two_kernel_path(
    lead, d, h, config, scale, b2, dtype, device, check_output, max_err
):
    y, w1, b1, w2, bias2, x, lw, lb = _inputs(lead, d, h, device, dtype, b2)
    kw = dict(b2=bias2, scale=scale, activation="swish")
    ref_x, ref_y = ffn_add_layer_norm_ref(y, w1, b1, w2, x, lw, lb, 1e-5, **kw)
    stream = x.clone()
    out_x, out_y = ffn_add_layer_norm(y, w1, b1, w2, stream, lw, lb, 1e-5, **kw, config=config)
    assert out_x.data_ptr() == stream.data_ptr()  # the residual stream is updated in place
    assert out_x.dtype == torch.float32 and out_y.dtype == dtype and out_y.shape == x.shape
    h_atol, y_atol, y_rtol = TOL[dtype]
    _close(out_x, ref_x, h_atol)
    _close(out_y, ref_y, y_atol, y_rtol)
    # The existing two-kernel path: the same roundings, other summation orders.
    hidden = linear_act(y, w1, b1, "swish")
    two_x, two_y = linear_add_layer_norm(hidden, w2, x.clone(), lw, lb, bias=bias2, scale=scale)
    _close(out_x, two_x, h_atol)
    _close(out_y, two_y, y_atol, y_rtol)
    # The exact FFN: no worse than PyTorch's own FFN in this dtype.
    gold_x, gold_y = ffn_add_layer_norm_ref(y, w1, b1, w2, x, lw, lb, 1e-5, **kw, upcast=True)
    torch_x, torch_y = _unfused_torch(y, w1, b1, w2, bias2, x, lw, lb, scale, "swish")
    _check_vs_gold(out_x, gold_x, torch_x, dtype, check_output, max_err)
    _check_vs_gold(out_y, gold_y, torch_y, dtype, check_output, max_err)
    if dtype != torch.float32:  # the hidden is rounded to the compute dtype, as linear_act does
        # (mean errors: an accumulation-order flip of one hidden rounding moves a few elements;
        # an unrounded hidden would move them all)
        mean_err = lambda a, b: float((a.double() - b.double()).abs().mean())  # noqa: E731
        assert mean_err(out_x, two_x) < mean_err(two_x, gold_x) / 4


def _ffn_ln_float64(y, w1, b1, w2, b2, x, lw, lb, eps, scale, act):
    """The FFN, add and LayerNorm from their formulas in float64 (no F.linear/F.layer_norm)."""
    y, w1, w2, x = y.double(), w1.double(), w2.double(), x.double()
    hidden = ACT64[act](y @ w1.T + (b1.double() if b1 is not None else 0.0))
    h = x + scale * (hidden @ w2.T + (b2.double() if b2 is not None else 0.0))
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    out = (h - mean) / torch.sqrt(var + eps)
    if lw is not None:
        out = out * lw.double() + lb.double()
    return h, out


@pytest.mark.parametrize("act", ["identity", "swish", "silu", "relu", "gelu"])
def test_activations_against_float64_formulas(act, device):
    y, w1, b1, w2, b2, x, lw, lb = _inputs((29,), 48, 90, device)
    gold_x, gold_y = _ffn_ln_float64(y, w1, b1, w2, b2, x, lw, lb, 1e-5, 0.5, act)
    out_x, out_y = ffn_add_layer_norm(
        y, w1, b1, w2, x, lw, lb, b2=b2, scale=0.5, activation=act, config=FfnConfig(16, 32, 4, 1)
    )
    torch.testing.assert_close(out_x.double(), gold_x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out_y.double(), gold_y, atol=1e-4, rtol=1e-5)


def test_half_input_float32_output_without_biases_or_affine(device):
    """float16 FFN, no b1/b2, no LayerNorm affine, y' kept in float32 (the engine's last FFN)."""
    y, w1, _, w2, _, x, _, _ = _inputs((70,), 40, 56, device, torch.float16)
    ref_x, ref_y = ffn_add_layer_norm_ref(
        y, w1, None, w2, x, None, None, 1e-6, y_dtype=torch.float32
    )
    _, gold_y = _ffn_ln_float64(y, w1, None, w2, None, x, None, None, 1e-6, 1.0, "swish")
    out_x, out_y = ffn_add_layer_norm(
        y, w1, None, w2, x, None, None, 1e-6, y_dtype=torch.float32, config=FfnConfig(32, 16, 4, 1)
    )
    assert out_y.dtype == torch.float32
    _close(out_x, ref_x, 1e-3)
    _close(out_y, ref_y, 1e-3, 1e-4)
    assert (out_y.double() - gold_y).abs().max() < 5e-3  # only the hidden's float16 rounding


def test_strided_rows_and_empty(device):
    base, w1, b1, w2, b2, x, lw, lb = _inputs((9, 2), 24, 40, device)
    y = base[:, 1]  # (9, 24), row stride 48
    x = x[:, 1].contiguous()
    ref_x, ref_y = ffn_add_layer_norm_ref(y, w1, b1, w2, x, lw, lb, b2=b2)
    out_x, out_y = ffn_add_layer_norm(y, w1, b1, w2, x, lw, lb, b2=b2)
    _close(out_x, ref_x, 1e-5)
    _close(out_y, ref_y, 2e-5)
    empty_x, empty_y = ffn_add_layer_norm(y[:0], w1, b1, w2, x[:0], lw, lb)
    assert empty_x.shape == empty_y.shape == (0, 24)


def test_rejects_bad_inputs(device):
    y, w1, b1, w2, b2, x, lw, lb = _inputs((4,), 24, 16, device)

    def call(**over):
        args = dict(y=y, w1=w1, b1=b1, w2=w2, x=x, ln_weight=lw, ln_bias=lb)
        kw = {k: over.pop(k) for k in ("b2", "activation") if k in over}
        args.update(over)
        return ffn_add_layer_norm(**args, **kw)

    wide = torch.randn(4, 257, device=device)
    with pytest.raises(UnsupportedOptionError, match="D <= 256"):
        w1_wide, w2_wide = torch.randn(16, 257, device=device), torch.randn(257, 16, device=device)
        call(y=wide, w1=w1_wide, w2=w2_wide, x=torch.zeros(4, 257, device=device))
    with pytest.raises(UnsupportedOptionError, match="tanh"):
        call(activation="tanh")
    with pytest.raises(ValueError, match="w1 is torch.float16"):
        call(w1=w1.half())
    with pytest.raises(ValueError, match="w2 is torch.float16"):
        call(w2=w2.half())
    with pytest.raises(ValueError, match="w1 must be"):
        call(w1=w1[:, :7])
    with pytest.raises(ValueError, match="w2 must be"):
        call(w2=w2[:, :15])
    with pytest.raises(ValueError, match="b1 must be"):
        call(b1=b1[:5])
    with pytest.raises(ValueError, match="b2 must be"):
        call(b2=b2[:5])
    with pytest.raises(ValueError, match="x must be a contiguous float32"):
        call(x=x.half())
    with pytest.raises(ValueError, match="non-contiguous"):
        call(x=torch.zeros(24, 4, device=device).T)
    with pytest.raises(ValueError, match=r"x must be \(4, 24\)"):
        call(x=x[:3])
    with pytest.raises(TypeError, match="float32"):
        call(y=y.double(), w1=w1.double(), w2=w2.double())


def test_imports_without_triton(import_without_triton):
    module = import_without_triton("speechrt.kernels.fused_ffn")
    y, w1, b1, w2, b2, x, lw, lb = _inputs((4,), 24, 16, "cpu")
    with pytest.raises(UnsupportedOptionError, match="triton"):
        module.ffn_add_layer_norm(y, w1, b1, w2, x, lw, lb)


@pytest.fixture
def no_tf32(monkeypatch):
    """Float32 references without TF32 matmuls."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _gpu_check(lead, d, h, dtype, device, check_output, max_err, config=None):
    y, w1, b1, w2, b2, x, lw, lb = _inputs(lead, d, h, device, dtype)
    kw = dict(b2=b2, scale=0.5)
    ref_x, ref_y = ffn_add_layer_norm_ref(y, w1, b1, w2, x, lw, lb, **kw)
    gold_x, gold_y = ffn_add_layer_norm_ref(y, w1, b1, w2, x, lw, lb, **kw, upcast=True)
    torch_x, torch_y = _unfused_torch(y, w1, b1, w2, b2, x, lw, lb, 0.5, "swish")
    try:
        out_x, out_y = ffn_add_layer_norm(y, w1, b1, w2, x.clone(), lw, lb, **kw, config=config)
    except Exception as e:  # a config over the shared-memory budget: not a wrong result
        if type(e).__name__ == "OutOfResources":
            pytest.skip(f"{config}: {e}")
        raise
    h_atol, y_atol, y_rtol = TOL[dtype]
    _close(out_x, ref_x, h_atol)
    _close(out_y, ref_y, y_atol, y_rtol)
    _check_vs_gold(out_x, gold_x, torch_x, dtype, check_output, max_err)
    _check_vs_gold(out_y, gold_y, torch_y, dtype, check_output, max_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, d, h", [(16384, 256, 2048), (4100, 144, 576)])
def test_conformer_shapes(rows, d, h, dtype, device, check_output, max_err, no_tf32):
    """The default config at the encoder's shapes (B=64 x 1024 frames / 4 at D=256, H=2048)."""
    _gpu_check((rows,), d, h, dtype, device, check_output, max_err)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_config(config, dtype, device, check_output, max_err, no_tf32):
    """Every benchmarked config at the Conformer FFN shape (rows not a tile multiple)."""
    _gpu_check((1000,), 256, 2048, dtype, device, check_output, max_err, config)
