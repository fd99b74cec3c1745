"""Mixture-of-experts feed-forward layer (3M-ASR's SpeechMoE FFN, WeNet's ``MoEFFNLayer``).

Per row (frame) ``x`` with an optional side input ``e`` (3M-ASR: the embedding network's output)::

    p    = softmax([e, x] @ W_router (+ b_router))           float32, over all E experts
    S    = the top_k experts by logit                         (3M-ASR: top-1)
    g_s  = p_s  (or p_s / sum_S p, ``renormalize``: WeNet)    gate values
    y    = sum_{s in S} g_s * (W2_s act(W1_s x + b1_s) + b2_s)

The torch path (:func:`moe_ffn_ref`, a loop over experts with masks) runs anywhere; the Triton
path (:mod:`speechrt.kernels.moe`: one routing kernel, two grouped GEMMs) runs on CUDA. Weights
are stored once, in the layout the kernels read: router (E_in, E), experts W1 (E, H, D),
b1 (E, H), W2 (E, D, H), b2 (E, D).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._utils import triton_importable
from speechrt.kernels.moe import (
    ACTIVATIONS,
    RouteResult,
    moe_experts,
    moe_experts_ref,
    moe_route,
    moe_route_ref,
)

__all__ = ["MoEFeedForward", "moe_ffn_ref", "router_aux_losses"]

BACKENDS = ("auto", "torch", "triton")


def moe_ffn_ref(
    x: torch.Tensor,
    embed: torch.Tensor | None,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    top_k: int = 1,
    renormalize: bool = False,
    activation: str = "swish",
    scale_by_gate: bool = True,
) -> torch.Tensor:
    """The whole MoE FFN in plain torch: x (..., D), embed (..., DE) or None -> (..., D).

    Routing in float32 (:func:`~speechrt.kernels.moe.moe_route_ref`), then a loop over experts
    with masks (:func:`~speechrt.kernels.moe.moe_experts_ref`) in x's dtype.
    """
    r = moe_route_ref(x, router_weight, router_bias, embed, top_k, renormalize)
    gate = r.gate_val if scale_by_gate else None
    return moe_experts_ref(x, r.gate_idx, gate, w1, b1, w2, b2, activation)


def router_aux_losses(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3M-ASR's router regularisers (training only; here for parity checks), float32.

    logits (N, E) over all N frames (padding included, as 3M-ASR does) ->
    (sparse L1 ``sum_t ||p_t / ||p_t||_2||_1 / N``, importance ``E * sum_e mean_t(p_te)^2``).
    """
    p = torch.softmax(logits.float(), dim=-1)
    norm = p.norm(2, dim=-1, keepdim=True).clamp(min=1e-20)
    l1 = (p / norm).abs().sum() / p.shape[0]
    importance = p.mean(dim=0).square().sum() * p.shape[1]
    return l1, importance


class MoEFeedForward(nn.Module):
    """Mixture-of-experts FFN; ``forward(x (B, T, D), embed (B, T, DE) or None) -> (B, T, D)``.

    Args:
        d_model: D. d_hidden: H per expert. num_experts: E.
        d_embed: DE, width of the side input the router also reads (0: router on x only).
        top_k / renormalize: experts per frame and whether their gates are renormalised.
        activation: expert activation (swish, relu, gelu fuse into the kernel).
        bias: expert biases. router_bias: a router bias.
        scale_by_gate: multiply expert outputs by their gate (3M-ASR's ``keep_expert_output``
            is ``scale_by_gate=False``).
        backend: "auto" (Triton on CUDA when available, else torch), "torch" or "triton".
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        d_embed: int = 0,
        top_k: int = 1,
        renormalize: bool = False,
        activation: str = "swish",
        bias: bool = True,
        router_bias: bool = False,
        scale_by_gate: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise UnsupportedOptionError(f"top_k must be in 1..{num_experts}, got {top_k}")
        if backend not in BACKENDS:
            raise UnsupportedOptionError(f"MoE backend '{backend}' unknown ({', '.join(BACKENDS)})")
        self.d_model, self.d_hidden, self.num_experts, self.d_embed = (
            d_model,
            d_hidden,
            num_experts,
            d_embed,
        )
        self.top_k, self.renormalize, self.scale_by_gate = top_k, renormalize, scale_by_gate
        self.activation = activation
        self.backend = backend
        e, h, d = num_experts, d_hidden, d_model
        self.router_weight = nn.Parameter(torch.empty(d_embed + d, e))
        self.router_bias = nn.Parameter(torch.empty(e)) if router_bias else None
        self.w1 = nn.Parameter(torch.empty(e, h, d))
        self.b1 = nn.Parameter(torch.empty(e, h)) if bias else None
        self.w2 = nn.Parameter(torch.empty(e, d, h))
        self.b2 = nn.Parameter(torch.empty(e, d)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``-style uniform init (+-1/sqrt(fan_in)) of every expert and the router."""
        k = self.router_weight.shape[0]
        fan = {
            "router_weight": k,
            "router_bias": k,
            "w1": self.d_model,
            "b1": self.d_model,
            "w2": self.d_hidden,
            "b2": self.d_hidden,
        }
        for name, p in self.named_parameters(recurse=False):
            bound = 1.0 / math.sqrt(fan[name])
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, experts={self.num_experts}, "
            f"d_embed={self.d_embed}, top_k={self.top_k}, renormalize={self.renormalize}, "
            f"activation={self.activation}, backend={self.backend}"
        )

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` takes the Triton path for this input."""
        if self.backend == "triton":
            return True
        return (
            self.backend == "auto"
            and x.is_cuda
            and triton_importable()
            and self.activation in ACTIVATIONS
        )

    def _check_embed(self, x: torch.Tensor, embed: torch.Tensor | None) -> None:
        if self.d_embed == 0:
            if embed is not None:
                raise ValueError("this MoE router takes no side input (d_embed=0)")
            return
        if embed is None or embed.shape[:-1] != x.shape[:-1] or embed.shape[-1] != self.d_embed:
            got = None if embed is None else tuple(embed.shape)
            raise ValueError(f"MoE router needs embed {(*x.shape[:-1], self.d_embed)}, got {got}")

    def route(self, x: torch.Tensor, embed: torch.Tensor | None = None) -> RouteResult:
        """Routing only: x (..., D) -> gate_idx/gate_val (N, top_k) and float32 logits (N, E)."""
        self._check_embed(x, embed)
        if self.uses_kernel(x):
            return moe_route(
                x,
                self.router_weight,
                self.router_bias,
                embed,
                self.top_k,
                self.renormalize,
                return_logits=True,
            )
        return moe_route_ref(
            x, self.router_weight, self.router_bias, embed, self.top_k, self.renormalize
        )

    def forward(self, x: torch.Tensor, embed: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), embed (B, T, DE) or None -> (B, T, D) in x's dtype."""
        self._check_embed(x, embed)
        if not self.uses_kernel(x):
            return moe_ffn_ref(
                x,
                embed,
                self.router_weight,
                self.router_bias,
                self.w1,
                self.b1,
                self.w2,
                self.b2,
                self.top_k,
                self.renormalize,
                self.activation,
                self.scale_by_gate,
            )
        r = moe_route(x, self.router_weight, self.router_bias, embed, self.top_k, self.renormalize)
        gate = r.gate_val if self.scale_by_gate else None
        return moe_experts(x, r.gate_idx, gate, self.w1, self.b1, self.w2, self.b2, self.activation)
