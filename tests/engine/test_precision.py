"""Precision policy helpers: dtype names and half-precision networks with float32 norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speechrt.engine.precision import Precision, cast_keeping_norms, parse_dtype
from speechrt.errors import UnsupportedOptionError


def test_parse_dtype_names_and_errors():
    assert parse_dtype(None) == torch.float32
    assert parse_dtype("fp16") == torch.float16 and parse_dtype("bfloat16") == torch.bfloat16
    assert Precision.of("bf16").compute == torch.bfloat16
    with pytest.raises(UnsupportedOptionError, match="unknown dtype 'fp8'"):
        parse_dtype("fp8")
    with pytest.raises(UnsupportedOptionError, match="unsupported dtype"):
        parse_dtype(torch.int8)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):  # (B, T, 8)
        y = self.ln(self.lin(x))
        return self.bn(self.conv(y.transpose(1, 2))).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_keeping_norms(dtype):
    """Weights in dtype, norm parameters and statistics in float32 with their exact values; the
    network still runs on half-precision inputs (PyTorch's norms take mixed dtypes)."""
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():  # values that half precision would round
        for t in (net.ln.weight, net.ln.bias, net.bn.weight, net.bn.bias):
            t.copy_(1 + torch.randn(8) / 3)
        net.bn.running_mean.copy_(torch.randn(8) / 7)
        net.bn.running_var.copy_(torch.rand(8) + 0.3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert cast_keeping_norms(net, dtype) is net
    assert net.lin.weight.dtype == dtype and net.conv.weight.dtype == dtype
    norm_tensors = ["ln.weight", "ln.bias", "bn.weight", "bn.bias"]
    for name in [*norm_tensors, "bn.running_mean", "bn.running_var"]:
        value = net.state_dict()[name]
        assert value.dtype == torch.float32 and torch.equal(value, before[name]), name
        assert not torch.equal(value.to(dtype).float(), before[name]), name  # would have rounded
    assert net.bn.num_batches_tracked.dtype == torch.long
    y = net(torch.randn(2, 5, 8).to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
