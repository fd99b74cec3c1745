"""glu_depthwise_conv against F.glu + F.conv1d in float32, and against a WeNet-style module."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels.conv_module import (
    fold_batch_norm,
    glu_depthwise_conv,
    glu_depthwise_conv_ref,
)

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]

# (B, T, C, K, causal, norm, pad_mode, activation)
CASES = [
    (2, 37, 24, 15, False, "batch", "zero", "swish"),
    (2, 37, 24, 15, False, "batch", "wenet", "swish"),
    (3, 5, 64, 3, False, "layer", "zero", "gelu"),
    (3, 37, 64, 15, False, "layer", "wenet", "swish"),
    (2, 5, 24, 15, False, "layer", "zero", "swish"),
    (1, 1, 4, 3, False, "batch", "wenet", "swish"),
    (2, 37, 4, 8, True, "batch", "zero", "relu"),
    (2, 37, 4, 8, True, "layer", "wenet", "swish"),
    (2, 1, 24, 15, True, "batch", "zero", "identity"),
    (3, 37, 64, 3, True, "batch", "wenet", "gelu"),
]


def _lengths(b, t, device):
    return torch.tensor([t, max(1, t // 2), 1][:b], device=device)


def _inputs(b, t, c, k, device, dtype=torch.float32):
    x2 = torch.randn(b, t, 2 * c, device=device).to(dtype)
    w = torch.randn(c, k, device=device) / k**0.5
    bias, ln_w, ln_b = (torch.randn(c, device=device) for _ in range(3))
    return x2, w, bias, dict(ln_weight=ln_w, ln_bias=ln_b)


@pytest.mark.parametrize("glu", [True, False], ids=["glu", "glu_applied"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, t, c, k, causal, norm, pad_mode, activation", CASES)
def test_matches_reference(
    b, t, c, k, causal, norm, pad_mode, activation, dtype, glu, device, check_output
):
    """glu False: the input is the GLU output itself (a GEMM epilogue computed it)."""
    x2, w, bias, ln = _inputs(b, t, c, k, device, dtype)
    if not glu:
        x2 = F.glu(x2.float(), dim=-1).to(dtype)
    lengths = _lengths(b, t, device)
    opts = dict(causal=causal, norm=norm, activation=activation, pad_mode=pad_mode, glu=glu, **ln)
    out = torch.full((b, t, c), float("nan"), dtype=dtype, device=device)
    y = glu_depthwise_conv(x2, w, bias, lengths, out=out, **opts)
    gold = glu_depthwise_conv_ref(x2.float(), w, bias, lengths, **opts)
    low = {k_: v.to(dtype) for k_, v in ln.items()}
    torch_y = glu_depthwise_conv_ref(x2, w.to(dtype), bias.to(dtype), lengths, **{**opts, **low})
    check_output(y, gold, torch_y, dtype)
    for i, n in enumerate(lengths.tolist()):
        assert (y[i, n:] == 0).all()


def test_strided_input_no_lengths(device):
    x2, w, bias, _ = _inputs(2, 37, 24, 15, device)
    wide = torch.randn(37, 2, 48 + 5, device=device)
    wide[..., :48] = x2.transpose(0, 1)
    x2_strided = wide.transpose(0, 1)[..., :48]  # (B, T, 2C), batch stride 53, time stride 106
    y = glu_depthwise_conv(x2_strided, w.reshape(24, 1, 15), bias, None, causal=False)
    gold = glu_depthwise_conv_ref(x2, w, bias, None, causal=False)
    torch.testing.assert_close(y, gold, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_zero_pad_ignores_padding(causal, device):
    """pad_mode="zero": valid outputs are the same whatever the padded frames hold."""
    x2, w, bias, _ = _inputs(2, 20, 24, 15, device)
    lengths = torch.tensor([20, 9], device=device)
    y = glu_depthwise_conv(x2, w, bias, lengths, causal=causal)
    noisy = torch.cat([x2, torch.randn(2, 7, 48, device=device) * 100], dim=1)  # T 20 -> 27
    noisy[1, 9:] = torch.randn(18, 48, device=device) * 100
    y_noisy = glu_depthwise_conv(noisy, w, bias, lengths, causal=causal)
    torch.testing.assert_close(y_noisy[:, :20], y, atol=0, rtol=0)
    solo = glu_depthwise_conv(x2[1:, :9], w, bias, None, causal=causal)
    torch.testing.assert_close(y[1:, :9], solo, atol=1e-6, rtol=1e-6)


def _wenet_conv(x, lengths, pw1, dw, bn, act, causal):
    """WeNet's ConvolutionModule up to (not including) pointwise_conv2, as (B, T, C)."""
    b, t, _ = x.shape
    valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
    u = x.masked_fill(~valid[..., None], 0.0).transpose(1, 2)  # (B, C, T)
    if causal:
        u = F.pad(u, (dw.kernel_size[0] - 1, 0))
    u = F.glu(pw1(u), dim=1)
    return act(bn(dw(u))).transpose(1, 2)  # (B, T, C)


@pytest.mark.parametrize("causal", [False, True])
def test_reproduces_wenet_module(causal, device):
    """pad_mode="wenet" + fold_batch_norm reproduce WeNet's batch outputs on valid frames;
    the causal module's left zero padding becomes a cache of GLU(bias1) frames."""
    b, t, c, k = 3, 37, 24, 15
    pw1 = nn.Conv1d(c, 2 * c, 1).to(device)
    dw = nn.Conv1d(c, c, k, padding=0 if causal else (k - 1) // 2, groups=c).to(device)
    bn = nn.BatchNorm1d(c).to(device).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(b, t, c, device=device)
    lengths = torch.tensor([37, 20, 3], device=device)
    with torch.no_grad():
        expected = _wenet_conv(x, lengths, pw1, dw, bn, nn.SiLU(), causal)
        valid = torch.arange(t, device=device)[None, :] < lengths[:, None]
        x2 = F.linear(x.masked_fill(~valid[..., None], 0.0), pw1.weight[:, :, 0], pw1.bias)
        w, bias = fold_batch_norm(
            dw.weight, dw.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )
        cache = None
        if causal:
            cache = F.glu(pw1.bias, dim=0)[None, :, None].expand(b, c, k - 1).contiguous()
        y = glu_depthwise_conv(x2, w, bias, lengths, causal=causal, pad_mode="wenet", cache=cache)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(y[i, :n], expected[i, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("glu", [True, False], ids=["glu", "glu_applied"])
@pytest.mark.parametrize("pad_mode", ["zero", "wenet"])
@pytest.mark.parametrize("k, chunks", [(8, [20, 17]), (15, [5, 4, 28])])
def test_cache_equals_full_sequence(k, chunks, pad_mode, glu, device):
    b, c, t = 2, 24, sum(chunks)
    x2, w, bias, ln = _inputs(b, t, c, k, device)
    if not glu:
        x2 = F.glu(x2, dim=-1)
    opts = dict(causal=True, norm="layer", pad_mode=pad_mode, glu=glu, **ln)
    full, full_cache = glu_depthwise_conv_ref(x2, w, bias, None, return_cache=True, **opts)
    outs, cache, start = [], None, 0
    for n in chunks:
        y, cache = glu_depthwise_conv(
            x2[:, start : start + n], w, bias, None, cache=cache, return_cache=True, **opts
        )
        outs.append(y)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache, full_cache, atol=1e-6, rtol=1e-6)


def test_glu_applied_reference_is_the_glu_reference(device):
    """The reference on x2 equals the reference on F.glu(x2) with glu=False."""
    x2, w, bias, ln = _inputs(2, 19, 8, 5, device)
    lengths = _lengths(2, 19, device)
    for causal in (False, True):
        opts = dict(causal=causal, norm="layer", pad_mode="wenet", **ln)
        torch.testing.assert_close(
            glu_depthwise_conv_ref(F.glu(x2, dim=-1), w, bias, lengths, glu=False, **opts),
            glu_depthwise_conv_ref(x2, w, bias, lengths, **opts),
        )
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        glu_depthwise_conv(x2[0], w, bias, None, causal=False, glu=False)


@pytest.mark.parametrize("glu", [True, False], ids=["glu", "glu_applied"])
def test_explicit_launch_tiles(glu, device):
    """``block`` (the tiles benchmarks sweep) changes nothing but the launch; norm='layer'
    needs all of C in one tile."""
    x2, w, bias, ln = _inputs(2, 19, 24, 15, device)
    if not glu:
        x2 = F.glu(x2, dim=-1)
    lengths = _lengths(2, 19, device)
    opts = dict(causal=False, glu=glu)
    want = glu_depthwise_conv_ref(x2, w, bias, lengths, **opts)
    for block in ((2, 16), (8, 32)):
        y = glu_depthwise_conv(x2, w, bias, lengths, block=block, **opts)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="BLOCK_C"):
        glu_depthwise_conv(x2, w, bias, lengths, norm="layer", block=(4, 16), **opts, **ln)


def test_returned_cache_with_ragged_lengths(device):
    x2, w, bias, _ = _inputs(2, 6, 4, 8, device)
    lengths = torch.tensor([6, 2], device=device)
    cache = torch.randn(2, 4, 7, device=device)
    y, new = glu_depthwise_conv(x2, w, bias, lengths, causal=True, cache=cache, return_cache=True)
    y_ref, new_ref = glu_depthwise_conv_ref(
        x2, w, bias, lengths, causal=True, cache=cache, return_cache=True
    )
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new, new_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid(-1e4), numpy
def test_large_magnitude_half(device, check_output):
    """Saturated gates (|g| ~ 1e4) and large GLU values in float16."""
    b, t, c, k = 2, 37, 24, 15
    x2 = torch.cat(
        [torch.randn(b, t, c, device=device) * 2e3, torch.randn(b, t, c, device=device) * 1e4],
        dim=-1,
    ).half()
    w = torch.randn(c, k, device=device) * 0.05
    bias = torch.randn(c, device=device)
    y = glu_depthwise_conv(x2, w, bias, None, causal=False, activation="identity")
    assert torch.isfinite(y).all()
    gold = glu_depthwise_conv_ref(x2.float(), w, bias, None, causal=False, activation="identity")
    torch_y = glu_depthwise_conv_ref(
        x2, w.half(), bias.half(), None, causal=False, activation="identity"
    )
    check_output(y, gold, torch_y, torch.float16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(causal=False, weight_k=8), "odd kernel"),
        (dict(causal=False, cache=True), "causal"),
        (dict(causal=True, norm="group"), "norm"),
        (dict(causal=True, activation="tanh"), "activation"),
        (dict(causal=True, pad_mode="reflect"), "pad_mode"),
    ],
)
def test_bad_options_raise(kwargs, match, device):
    k = kwargs.pop("weight_k", 3)
    x2, w, bias, _ = _inputs(1, 4, 4, k, device)
    if kwargs.pop("cache", False):
        kwargs["cache"] = torch.zeros(1, 4, k - 1, device=device)
    with pytest.raises(UnsupportedOptionError, match=match):
        glu_depthwise_conv(x2, w, bias, None, **kwargs)


def test_imports_without_triton(import_without_triton):
    module = import_without_triton("speechrt.kernels.conv_module")
    x2, w, bias, _ = _inputs(1, 4, 4, 3, "cpu")
    with pytest.raises(UnsupportedOptionError, match="triton"):
        module.glu_depthwise_conv(x2, w, bias, None, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_conformer_shape(norm, dtype, device, check_output):
    b, t, c, k = 64, 256, 256, 15
    x2, w, bias, ln = _inputs(b, t, c, k, device, dtype)
    lengths = torch.randint(1, t + 1, (b,), device=device)
    opts = dict(causal=False, norm=norm, **ln)
    y = glu_depthwise_conv(x2, w, bias, lengths, **opts)
    gold = glu_depthwise_conv_ref(x2.float(), w, bias, lengths, **opts)
    low = {k_: v.to(dtype) for k_, v in ln.items()}
    torch_y = glu_depthwise_conv_ref(x2, w.to(dtype), bias.to(dtype), lengths, **{**opts, **low})
    check_output(y, gold, torch_y, dtype)
