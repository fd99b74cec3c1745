"""linear_act (activation in the GEMM epilogue) against F.linear + activation.

Odd sizes (rows, K and N not multiples of a tile), 3-D inputs, with and without bias, three
activations (checked against their float64 formulas too), three dtypes, several tile configs.
Half precision is held to twice PyTorch's own same-dtype error against the float32 reference
(four times for bfloat16 under the interpreter, which truncates float32 -> bfloat16).
"""

from __future__ import annotations

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._utils import interpreting
from speechrt.kernels.linear_act import (
    CONFIGS,
    LinearConfig,
    interleave_glu,
    linear_act,
    linear_act_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACT64 = {
    "swish": lambda h: h * torch.sigmoid(h),
    "relu": torch.relu,
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / 2**0.5)),
}
# (shape of x, N)
SHAPES = [((1, 16), 16), ((37, 40), 72), ((2, 17, 48), 200), ((130, 64), 33)]


def _inputs(shape, n, device, dtype=torch.float32, bias=True):
    k = shape[-1]
    x = torch.randn(*shape, device=device)
    w = torch.randn(n, k, device=device) / k**0.5
    b = torch.randn(n, device=device) if bias else None
    return x.to(dtype), w.to(dtype), (b.to(dtype) if bias else None)


def _check(y, x, w, b, act, dtype, check_output, max_err) -> None:
    gold = linear_act_ref(x, w, b, act, upcast=True)
    torch_y = linear_act_ref(x, w, b, act)
    assert y.dtype == dtype and y.shape == gold.shape
    if dtype == torch.bfloat16 and interpreting():
        err, torch_err = max_err(y, gold), max_err(torch_y, gold)
        assert err <= 4 * torch_err + 1e-4, f"kernel error {err:.3g}, torch bf16 {torch_err:.3g}"
    else:
        check_output(y, gold, torch_y, dtype, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["swish", "relu", "gelu"])
@pytest.mark.parametrize("shape, n", SHAPES)
def test_matches_linear_then_activation(shape, n, act, dtype, device, check_output, max_err):
    x, w, b = _inputs(shape, n, device, dtype)
    _check(linear_act(x, w, b, act), x, w, b, act, dtype, check_output, max_err)


@pytest.mark.parametrize("act", ["swish", "relu", "gelu"])
def test_float64_formulas(act, device):
    """The epilogue's activation against its float64 definition (independent of F.silu/gelu)."""
    x, w, b = _inputs((29, 24), 40, device)
    gold = ACT64[act](x.double() @ w.double().T + b.double())
    torch.testing.assert_close(linear_act(x, w, b, act).double(), gold, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config", [LinearConfig(16, 16, 16, 2, 4, 1), LinearConfig(32, 64, 16, 1, 4, 1)], ids=str
)
def test_explicit_configs_no_bias_and_out(config, device):
    """Several row groups and column tiles (grouped order), ragged edges, no bias, out=."""
    x, w, _ = _inputs((70, 40), 50, device, bias=False)
    out = torch.full((70, 50), float("nan"), device=device)
    y = linear_act(x, w, None, "identity", out=out, config=config)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(y, x @ w.T, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_output_is_the_unrounded_accumulator(dtype, device):
    """out_dtype=float32: half inputs, the float32 accumulator stored without rounding -- closer
    to the float64 product of the same half inputs than the half-precision output is."""
    x, w, b = _inputs((45, 64), 24, device, dtype)
    y32 = linear_act(x, w, b, "identity", out_dtype=torch.float32)
    y16 = linear_act(x, w, b, "identity")
    assert y32.dtype == torch.float32 and y16.dtype == dtype
    gold = x.double() @ w.double().T + b.double()
    err32 = (y32.double() - gold).abs().max().item()
    err16 = (y16.double() - gold).abs().max().item()
    assert err32 < 1e-4 and err32 < err16 / 4, (err32, err16)


TMA_SMALL = [
    LinearConfig(16, 32, 16, 2, 4, 1, tma=True),
    LinearConfig(32, 32, 16, 1, 4, 1, tma=True, split_store=True),
]


@pytest.mark.parametrize("config", TMA_SMALL, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["swish", "gelu"])
def test_tensor_descriptor_kernel(config, dtype, act, device, check_output, max_err):
    """The persistent tensor-descriptor kernel: more tiles than programs (each program walks
    several), ragged rows/columns/K tiles clipped by the descriptors, bias and activation."""
    x, w, b = _inputs((2, 37, 40), 72, device, dtype)
    _check(linear_act(x, w, b, act, config=config), x, w, b, act, dtype, check_output, max_err)


@pytest.mark.parametrize("config", TMA_SMALL, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_descriptor_glu(config, dtype, device, check_output):
    """``glu`` on the descriptor kernel: (BLOCK_M, BLOCK_N / 2) output tiles, ragged rows and
    pairs, against F.glu over the plain layer."""
    x, w, b = _inputs((2, 37, 40), 2 * 36, device, dtype)
    wi, bi = interleave_glu(w, b)
    y = linear_act(x, wi, bi, "glu", config=config)
    h = torch.nn.functional.linear(x.float(), w.float(), b.float())
    torch_y = torch.nn.functional.glu(torch.nn.functional.linear(x, w, b), dim=-1)
    assert y.shape == (2, 37, 36)
    check_output(y, torch.nn.functional.glu(h, dim=-1), torch_y, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_descriptor_float32_out_no_bias(dtype, device):
    """float32 output through a descriptor, no bias, written into ``out``."""
    x, w, _ = _inputs((50, 24), 40, device, dtype, bias=False)
    out = torch.full((50, 40), float("nan"), device=device)
    y = linear_act(x, w, None, "identity", out=out, out_dtype=torch.float32, config=TMA_SMALL[1])
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(y, x.float() @ w.float().T, atol=1e-4, rtol=1e-4)


def test_tensor_descriptor_falls_back_on_unaligned_rows(device):
    """K = 20 half values is a 40-byte row stride (descriptors need 16-byte multiples): the
    pointer kernel runs instead, with the same result."""
    x, w, b = _inputs((33, 20), 24, device, torch.float16)
    y = linear_act(x, w, b, "relu", config=TMA_SMALL[0])
    gold = linear_act_ref(x, w, b, "relu", upcast=True)
    torch.testing.assert_close(y.float(), gold, atol=2e-3, rtol=2e-3)


def test_tensor_descriptor_rejects_float32(device):
    x, w, b = _inputs((8, 16), 16, device)
    with pytest.raises(UnsupportedOptionError, match="float16/bfloat16"):
        linear_act(x, w, b, config=TMA_SMALL[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config", [None, LinearConfig(16, 16, 16, 2, 4, 1), LinearConfig(32, 64, 32, 1, 4, 1)], ids=str
)
@pytest.mark.parametrize("shape, c", [((37, 40), 36), ((2, 17, 48), 100), ((5, 16), 8)])
def test_glu_epilogue(shape, c, config, dtype, device, check_output):
    """``glu`` on interleave_glu's layout against F.glu over the plain (values | gates) layer,
    and against its float64 formula."""
    x, w, b = _inputs(shape, 2 * c, device, dtype)
    wi, bi = interleave_glu(w, b)
    y = linear_act(x, wi, bi, "glu", config=config)
    assert y.shape == (*shape[:-1], c) and y.dtype == dtype
    h64 = x.double() @ w.double().T + b.double()
    gold64 = h64[..., :c] * torch.sigmoid(h64[..., c:])
    torch_y = torch.nn.functional.glu(torch.nn.functional.linear(x, w, b), dim=-1)
    check_output(y, gold64.float(), torch_y, dtype, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(linear_act_ref(x, wi, bi, "glu"), torch_y)


def test_interleave_glu_layout_and_errors(device):
    w = torch.arange(12.0, device=device).view(6, 2)  # rows 0-2 values, 3-5 gates
    wi, bi = interleave_glu(w, torch.arange(6.0, device=device))
    assert wi[:, 0].tolist() == [0.0, 6.0, 2.0, 8.0, 4.0, 10.0]
    assert bi.tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    assert interleave_glu(w, None)[1] is None
    with pytest.raises(ValueError, match="2C"):
        interleave_glu(w[:5], None)
    x = torch.randn(3, 2, device=device)
    with pytest.raises(ValueError, match="even"):
        linear_act(x, w[:5], None, "glu")


def test_strided_rows(device):
    base, w, b = _inputs((9, 2, 32), 24, device)
    x = base[:, 1]  # (9, 32), row stride 64
    torch.testing.assert_close(linear_act(x, w, b), linear_act_ref(x, w, b), atol=2e-5, rtol=1e-5)


def test_rejects_bad_inputs(device):
    x, w, b = _inputs((4, 8), 6, device)
    with pytest.raises(UnsupportedOptionError, match="tanh.*glu"):
        linear_act(x, w, b, "tanh")
    with pytest.raises(ValueError, match="weight"):
        linear_act(x, w[:, :7], b)
    with pytest.raises(ValueError, match="bias"):
        linear_act(x, w, b[:5])
    with pytest.raises(ValueError, match="float16"):
        linear_act(x, w.half(), b)


def test_imports_without_triton(import_without_triton):
    module = import_without_triton("speechrt.kernels.linear_act")
    x, w, b = _inputs((4, 8), 6, "cpu")
    with pytest.raises(UnsupportedOptionError, match="triton"):
        module.linear_act(x, w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, *CONFIGS], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_module_glu_shape(config, dtype, device, check_output):
    """The Conformer conv module's pointwise conv + GLU (1000 rows, 256 -> 2 x 256; the
    approximate-tanh sigmoid on the GPU) at every config, the descriptor kernel's included."""
    x, w, b = _inputs((1000, 256), 512, device, dtype)
    wi, bi = interleave_glu(w, b)
    y = linear_act(x, wi, bi, "glu", config=config)
    h = torch.nn.functional.linear(x.float(), w.float(), b.float())
    torch_y = torch.nn.functional.glu(torch.nn.functional.linear(x, w, b), dim=-1)
    check_output(y, torch.nn.functional.glu(h, dim=-1), torch_y, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ffn_shape_every_config(config, dtype, device, check_output, max_err):
    """Every benchmarked config at a Conformer FFN shape (rows not a tile multiple)."""
    x, w, b = _inputs((1000, 256), 2048, device, dtype)
    y = linear_act(x, w, b, "swish", config=config)
    _check(y, x, w, b, "swish", dtype, check_output, max_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "rows, n, act, bias",
    [(16320, 2048, "swish", True), (4032, 2048, "gelu", False), (8250, 520, "relu", True),
     (33000, 256, "identity", True)],
)  # fmt: skip
def test_pingpong_kernel(rows, n, act, bias, dtype, device, check_output, max_err):
    """The warp-specialised ping-pong GEMM (K = 256, Gluon, Hopper) that ``config=None`` takes
    from one tile per SM: ragged last row tile, N not a multiple of its 256-column blocks, every
    activation (fast swish included), with and without bias; PINGPONG = False gives the Triton
    kernel's result within one rounding."""
    from speechrt.kernels import linear_act as module
    from speechrt.kernels import linear_act_pingpong

    x, w, b = _inputs((rows, 256), n, device, dtype, bias=bias)
    y_dummy = torch.empty(rows, n, device=device, dtype=dtype)
    if not linear_act_pingpong.supported(x, w, y_dummy):
        pytest.skip("the ping-pong GEMM needs compute capability 9.x, Gluon and a tile per SM")
    y = linear_act(x, w, b, act)
    _check(y, x, w, b, act, dtype, check_output, max_err)
    module.PINGPONG = False
    try:
        y_triton = linear_act(x, w, b, act)
    finally:
        module.PINGPONG = True
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2  # one rounding of the output
    torch.testing.assert_close(y.float(), y_triton.float(), atol=tol, rtol=tol)
