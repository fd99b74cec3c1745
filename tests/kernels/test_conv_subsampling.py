"""conv_subsampling (conv1 recomputed inside conv2's implicit GEMM) against two F.conv2d calls.

Awkward shapes (odd T and F, the shortest T with one output frame, C not a multiple of a tile),
CMVN on and off, strided inputs, several tile configs, ragged batches (valid frames do not see
the padding), three dtypes. Half precision is held to twice PyTorch's own same-dtype error
against the float32 reference (four times for bfloat16 under the interpreter, which truncates
float32 -> bfloat16 instead of rounding).
"""

from __future__ import annotations

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels import conv_front_wgmma
from speechrt.kernels._utils import interpreting
from speechrt.kernels.conv_subsampling import (
    CONFIGS,
    HALF_CHANNEL_MULTIPLE,
    ConvFrontConfig,
    conv_subsampling,
    conv_subsampling_ref,
    output_size,
    pack_conv_subsampling,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, T, F, C): ragged C (8, 24, 40, 48 vs tiles of 16/32/64), odd/short T and F.
SHAPES = [(2, 50, 40, 48), (3, 7, 13, 8), (1, 23, 17, 40), (4, 30, 20, 24)]


def _convs(c: int, device: str) -> tuple[torch.Tensor, ...]:
    w1 = torch.randn(c, 1, 3, 3, device=device) / 3
    b1 = torch.randn(c, device=device) * 0.1
    w2 = torch.randn(c, c, 3, 3, device=device) / (3 * c**0.5)
    b2 = torch.randn(c, device=device) * 0.1
    return w1, b1, w2, b2


def _cmvn(f: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(f, device=device) * 2 + 8, torch.rand(f, device=device) * 0.3 + 0.2


def _feats(b: int, t: int, f: int, device: str) -> torch.Tensor:
    return torch.randn(b, t, f, device=device) * 3 + 8  # fbank-like: offset, CMVN centres it


def _refused_on_cuda(x, packed, cmvn, config=None) -> bool:
    """Half precision on CUDA takes channel counts divisible by HALF_CHANNEL_MULTIPLE only
    (C = 24 computed wrong outputs on the H200): any other count is a clear error."""
    if not (x.is_cuda and packed.dtype != torch.float32):
        return False
    if packed.channels % HALF_CHANNEL_MULTIPLE == 0:
        return False
    with pytest.raises(UnsupportedOptionError, match="divisible by"):
        conv_subsampling(x, packed, *cmvn, config=config)
    return True


def _check(y, x, convs, cmvn, dtype, check_output, max_err) -> None:
    gold = conv_subsampling_ref(x, *convs, *cmvn, upcast=True)
    low = [w.to(dtype) for w in convs]
    torch_y = conv_subsampling_ref(x, *low, *cmvn)
    assert y.dtype == dtype and y.shape == gold.shape
    if dtype == torch.bfloat16 and interpreting():
        err, torch_err = max_err(y, gold), max_err(torch_y, gold)
        assert err <= 4 * torch_err + 1e-4, f"kernel error {err:.3g}, torch bf16 {torch_err:.3g}"
    else:
        check_output(y, gold, torch_y, dtype, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, t, f, c", SHAPES)
def test_matches_two_conv2d(b, t, f, c, dtype, device, check_output, max_err):
    x = _feats(b, t, f, device)
    convs, cmvn = _convs(c, device), _cmvn(f, device)
    packed = pack_conv_subsampling(*convs, dtype)
    if _refused_on_cuda(x, packed, cmvn):
        return
    y = conv_subsampling(x, packed, *cmvn)
    assert y.shape == (b, (((t - 1) // 2) - 1) // 2, ((((f - 1) // 2) - 1) // 2) * c)
    _check(y, x, convs, cmvn, dtype, check_output, max_err)


@pytest.mark.parametrize(
    "config",
    [
        ConvFrontConfig(16, 16, 16, 4, 1),  # C=40: three column tiles, the last one ragged
        ConvFrontConfig(32, 64, 32, 4, 1),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_explicit_configs(config, dtype, device, check_output, max_err):
    b, t, f, c = 2, 11, 19, 40
    x = _feats(b, t, f, device)
    convs, cmvn = _convs(c, device), _cmvn(f, device)
    packed = pack_conv_subsampling(*convs, dtype)
    if _refused_on_cuda(x, packed, cmvn, config):
        return
    y = conv_subsampling(x, packed, *cmvn, config=config)
    _check(y, x, convs, cmvn, dtype, check_output, max_err)


def test_no_cmvn_strided_input_and_out(device):
    b, t, f, c = 2, 33, 21, 24
    x = torch.randn(b, f, t, device=device).transpose(1, 2)  # (B, T, F), stride 1 along T
    convs = _convs(c, device)
    out = torch.full((b, output_size(t), output_size(f) * c), float("nan"), device=device)
    y = conv_subsampling(x, pack_conv_subsampling(*convs, torch.float32), out=out)
    assert y.data_ptr() == out.data_ptr()
    gold = conv_subsampling_ref(x, *convs)
    torch.testing.assert_close(y, gold, atol=2e-5, rtol=1e-5)


def test_ragged_batch_valid_frames_ignore_padding(device):
    """Output frame i reads input frames [4i, 4i + 6]: frames below ((L - 1)//2 - 1)//2 of an
    utterance of L frames equal the utterance computed alone, whatever the padding holds."""
    f, c, lengths = 23, 16, [41, 7, 18]
    convs, cmvn = _convs(c, device), _cmvn(f, device)
    w = pack_conv_subsampling(*convs, torch.float32)
    x = torch.randn(len(lengths), max(lengths), f, device=device) * 1e3  # garbage padding
    utts = [_feats(1, n, f, device) for n in lengths]
    for i, u in enumerate(utts):
        x[i, : u.shape[1]] = u[0]
    y = conv_subsampling(x, w, *cmvn)
    for i, u in enumerate(utts):
        alone = conv_subsampling(u, w, *cmvn)
        n = output_size(lengths[i])
        assert alone.shape[1] == n
        torch.testing.assert_close(y[i, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_too_short_gives_empty(device):
    convs = _convs(8, device)
    w = pack_conv_subsampling(*convs, torch.float32)
    assert conv_subsampling(torch.randn(2, 6, 20, device=device), w).shape == (2, 0, 4 * 8)
    assert conv_subsampling(torch.randn(2, 9, 6, device=device), w).shape == (2, 1, 0)
    assert [output_size(n) for n in (0, 6, 7, 10, 11, 80)] == [0, 0, 1, 1, 2, 19]


def test_rejects_bad_inputs(device):
    w1, b1, w2, b2 = _convs(8, device)
    with pytest.raises(ValueError, match="conv1"):
        pack_conv_subsampling(w1.expand(8, 2, 3, 3), b1, w2, b2, torch.float16)
    with pytest.raises(ValueError, match="conv2"):
        pack_conv_subsampling(w1, b1, w2[:, :, :2], b2, torch.float16)
    w = pack_conv_subsampling(w1, b1, w2, b2, torch.float32)
    x = torch.randn(1, 20, 20, device=device)
    with pytest.raises(ValueError, match="mean"):
        conv_subsampling(x, w, torch.zeros(20, device=device), None)
    with pytest.raises(ValueError, match="istd"):
        conv_subsampling(x, w, torch.zeros(20, device=device), torch.ones(19, device=device))
    with pytest.raises(ValueError, match="out"):
        conv_subsampling(x, w, out=torch.empty(1, 3, 3 * 8, device=device))


def test_imports_without_triton(import_without_triton):
    module = import_without_triton("speechrt.kernels.conv_subsampling")
    convs = _convs(8, "cpu")
    w = module.pack_conv_subsampling(*convs, torch.float32)
    with pytest.raises(UnsupportedOptionError, match="triton"):
        module.conv_subsampling(torch.randn(1, 20, 20), w)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conformer_shape_every_config(config, dtype, device, check_output, max_err):
    """Every benchmarked config at the Conformer front's size (F=80, C=256, odd T)."""
    b, t, f, c = 3, 203, 80, 256
    x = _feats(b, t, f, device)
    convs, cmvn = _convs(c, device), _cmvn(f, device)
    packed = pack_conv_subsampling(*convs, dtype)
    if _refused_on_cuda(x, packed, cmvn, config):
        return
    y = conv_subsampling(x, packed, *cmvn, config=config)
    _check(y, x, convs, cmvn, dtype, check_output, max_err)


@pytest.mark.gpu
@pytest.mark.parametrize("c", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cmvn_on", [True, False])
def test_gluon_kernel_matches_triton_kernel(c, dtype, cmvn_on, device, check_output, max_err):
    """The Hopper Gluon kernel (conv_front_wgmma) against the float32 reference: an odd T whose
    last row tile is ragged, a strided input, with and without CMVN. Its conv1 sums its ten
    products in another order than this module's Triton kernel, so it may differ from it in the
    last bit of a conv1 value: its error against float32 is held to twice the Triton kernel's."""
    if not conv_front_wgmma.supported(c, dtype, torch.device(device)):
        pytest.skip("the Gluon conv front needs compute capability 9.x and Gluon")
    b, t, f = 5, 203, 80
    x = _feats(b, f, t, device).transpose(1, 2)  # (B, T, F) with a non-unit feature stride
    convs = _convs(c, device)
    cmvn = _cmvn(f, device) if cmvn_on else (None, None)
    packed = pack_conv_subsampling(*convs, dtype)
    t2, f2 = output_size(t), output_size(f)
    y = torch.full((b, t2, f2 * c), float("nan"), device=device, dtype=dtype)
    mean_t = cmvn[0].float() if cmvn_on else packed.b2
    istd_t = cmvn[1].float() if cmvn_on else packed.b2
    conv_front_wgmma.conv_front_wgmma(x, packed, mean_t, istd_t, cmvn_on, y, b * t2 * f2, t2, f2)
    _check(y, x, convs, cmvn, dtype, check_output, max_err)
    triton_y = conv_subsampling(x, packed, *cmvn, config=ConvFrontConfig(128, c, 64, 8, 3))
    gold = conv_subsampling_ref(x, *convs, *cmvn, upcast=True)
    assert max_err(y, gold) <= 2 * max_err(triton_y, gold) + 1e-6


@pytest.mark.gpu
def test_default_takes_gluon_kernel_from_half_a_wave(device, max_err):
    """config=None picks the Gluon kernel where it applies, and GLUON = False returns to the
    Triton kernel (the Gluon kernel's error against float32 within twice the Triton kernel's)."""
    from speechrt.kernels import conv_subsampling as module

    x = _feats(16, 256, 80, device)
    convs, cmvn = _convs(256, device), _cmvn(80, device)
    packed = pack_conv_subsampling(*convs, torch.float16)
    m = 16 * output_size(256) * output_size(80)
    uses_gluon = module._gluon_front(m, 256, torch.float16, x.device)
    assert uses_gluon == conv_front_wgmma.supported(256, torch.float16, x.device)
    y = conv_subsampling(x, packed, *cmvn)
    module.GLUON = False
    try:
        assert not module._gluon_front(m, 256, torch.float16, x.device)
        triton_y = conv_subsampling(x, packed, *cmvn)
        gold = conv_subsampling_ref(x, *convs, *cmvn, upcast=True)
        assert max_err(y, gold) <= 2 * max_err(triton_y, gold) + 1e-6
    finally:
        module.GLUON = True
