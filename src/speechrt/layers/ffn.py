"""Position-wise feed-forward networks: plain (Linear -> activation -> Linear) and gated (GLU)."""

from __future__ import annotations

import torch
from torch import nn

from speechrt.errors import UnsupportedOptionError


def make_activation(name: str) -> nn.Module:
    """WeNet's activation names: swish (SiLU), relu, gelu, tanh, selu, hardtanh."""
    table = {
        "swish": nn.SiLU,
        "silu": nn.SiLU,
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "selu": nn.SELU,
        "hardtanh": nn.Hardtanh,
    }
    if name not in table:
        raise UnsupportedOptionError(
            f"unknown activation '{name}' (supported: {', '.join(sorted(table))})"
        )
    return table[name]()


class FeedForward(nn.Module):
    """``w2(act(w1(x)))``; (B, T, D) -> (B, T, D)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "relu", bias: bool = True):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=bias)
        self.act = make_activation(activation)
        self.w2 = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class GatedFeedForward(nn.Module):
    """GLU-variant FFN (WeNet's ``GatedVariantsMLP``): ``down(act(gate(x)) * up(x))``.

    (B, T, D) -> (B, T, D); ``gate`` never has a bias, ``up``/``down`` have one when ``bias``.
    """

    def __init__(self, d_model: int, d_hidden: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.gate = nn.Linear(d_model, d_hidden, bias=False)
        self.up = nn.Linear(d_model, d_hidden, bias=bias)
        self.act = make_activation(activation)
        self.down = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))
