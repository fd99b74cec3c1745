"""conv1_cmvn_relu against its torch reference (CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from speechrt.kernels.subsampling import conv1_cmvn_relu, conv1_cmvn_relu_ref


@pytest.mark.parametrize("b, t, f, c, k, s", [
    (1, 7, 80, 8, (3, 3), (2, 2)),
    (2, 20, 23, 24, (3, 3), (2, 2)),
    (3, 9, 40, 5, (3, 5), (2, 3)),
    (1, 3, 80, 16, (3, 3), (2, 2)),
    (2, 2, 80, 16, (3, 3), (2, 2)),  # too short: no output frame
])
def test_matches_reference(device, b, t, f, c, k, s):
    feats = (torch.randn(b, t, f) * 3 + 5).to(device)
    mean, istd = (torch.randn(f) + 5).to(device), (torch.rand(f) + 0.5).to(device)
    w, bias = torch.randn(c, 1, *k).to(device), torch.randn(c).to(device)
    out = conv1_cmvn_relu(feats, mean, istd, w, bias, s, out_dtype=torch.float32)
    if t < k[0]:
        assert out.shape[1] == 0
        return
    ref = conv1_cmvn_relu_ref(feats, mean, istd, w, bias, s, out_dtype=torch.float32)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    half = conv1_cmvn_relu(feats, mean, istd, w, bias, s, out_dtype=torch.float16)
    torch.testing.assert_close(half.float(), ref, atol=2e-2, rtol=2e-3)


def test_channels_last_view_feeds_next_conv(device):
    feats = torch.randn(2, 15, 20).to(device)
    mean, istd = torch.zeros(20).to(device), torch.ones(20).to(device)
    w1, b1 = torch.randn(6, 1, 3, 3).to(device), torch.randn(6).to(device)
    w2, b2 = torch.randn(6, 6, 3, 3).to(device), torch.randn(6).to(device)
    y = conv1_cmvn_relu(feats, mean, istd, w1, b1, (2, 2), out_dtype=torch.float32)
    nchw = y.permute(0, 3, 1, 2)
    assert nchw.is_contiguous(memory_format=torch.channels_last)
    ref1 = torch.relu(torch.nn.functional.conv2d(feats.unsqueeze(1), w1, b1, 2))
    torch.testing.assert_close(torch.nn.functional.conv2d(nchw, w2, b2, 2),
                               torch.nn.functional.conv2d(ref1, w2, b2, 2), atol=1e-4, rtol=1e-4)
