"""speechrt's LayerNorm takes parameters in another dtype than its input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from speechrt.engine.precision import cast_keeping_norms
from speechrt.layers.norms import LayerNorm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_params_on_half_input_equal_the_net_cast_whole(dtype):
    torch.manual_seed(0)
    ln = LayerNorm(24, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(1 + torch.randn(24) / 3)
        ln.bias.copy_(torch.randn(24) / 5)
    whole = copy.deepcopy(ln).to(dtype)  # every parameter rounded, as before
    kept = cast_keeping_norms(nn.Sequential(copy.deepcopy(ln)), dtype)[0]
    assert kept.weight.dtype == torch.float32
    x = (torch.randn(3, 7, 24) * 4 + 1).to(dtype)
    y = kept(x)
    assert y.dtype == dtype
    assert torch.equal(y, whole(x))
    assert torch.equal(LayerNorm(24)(x.float()), nn.LayerNorm(24)(x.float()))
