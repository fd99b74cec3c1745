"""The Conformer-MoE encoder on speechrt's Triton kernels: the dense fused encoder with the MoE
router and grouped expert GEMMs swapped into the second feed-forward of every block.

:class:`FusedMoEEncoder` is a :class:`~speechrt.models.conformer.fused.FusedEncoder` (the MoE
encoder's blocks: same fused block code) that owns a second, plain ``FusedEncoder`` for the
embedding network. Per forward::

    e    = embedding_net(feats)                          (B, T', DE) float32, after its after_norm
    per block, the second FFN (on y = LN_ff(x), compute dtype):
    idx, p = moe_route(y, W_router, b_router, e)         float32 softmax over [e, y], top-k
    f      = moe_experts(y, idx, p or None, W1, b1, W2, b2)     grouped GEMMs, gate-scaled
    x, _   = add_LN(f, x, LN_final, scale=0.5)           (no separate bias: b2 is in the GEMM)

Weights: the expert tensors (E, H, D) / (E, D, H) are read as the module stores them -- when the
module is already in the compute dtype the engine references its parameters (no copy); otherwise
they are cast once here (see :func:`speechrt.engine.memory.weight_report`). The router weight is
always the module's own tensor: the routing kernel reads it in any dtype and accumulates in
float32, as the torch path's ``moe_route_ref`` does.

CMVN: 3M-ASR normalises features outside the network (``ConformerMoEModel._encoder_input``:
``((feats - mean) * istd)`` in float32, then a cast to the model dtype) and the two encoders'
own CMVN buffers are identity. Given ``cmvn``, both fused encoders apply exactly that instead of
their identity buffers, so the engine takes raw fbank like the dense one.
"""

from __future__ import annotations

import torch

from speechrt.engine.precision import Precision
from speechrt.kernels.moe import ACTIVATIONS, moe_experts, moe_route
from speechrt.layers.moe import MoEFeedForward
from speechrt.models.conformer.fused import FusedEncoder, encoder_unsupported, supports_fused


def supports_fused_moe(net) -> str | None:
    """None if the fused path can run this Conformer-MoE network, else the reason."""
    reason = supports_fused(net)  # main encoder (dense macaron; second FFN swapped) + decoder
    if reason:
        return reason
    reason = encoder_unsupported(net.cfg.embed_encoder)
    if reason:
        return f"embedding network: {reason}"
    for layer in net.encoder.layers:
        if not isinstance(layer.ff, MoEFeedForward):
            return "the fused MoE encoder needs an MoEFeedForward in every block"
        if layer.ff.activation not in ACTIVATIONS:
            return f"MoE activation {layer.ff.activation} has no fused kernel"
    return None


def _is_identity_cmvn(enc) -> bool:
    return bool((enc.cmvn_mean == 0).all() and (enc.cmvn_istd == 1).all())


class FusedMoEEncoder(FusedEncoder):
    """Fused Conformer-MoE encoder (embedding network included).

    ``forward(feats (B, T, F) raw fbank float32, lengths (B,)) -> (B, T', D) float32, (B,)``.

    Args:
        enc: the torch :class:`~speechrt.models.conformer_moe.model.MoEEncoder`.
        precision: compute dtype of GEMMs/attention (LayerNorms and residual stay float32).
        pad_mode: as :class:`FusedEncoder`.
        cmvn: (mean (F,), istd (F,)) global CMVN applied before both networks (3M-ASR's, applied
            outside the model), or None to apply the encoders' own buffers.
    """

    def __init__(
        self,
        enc,
        precision: Precision,
        pad_mode: str = "zero",
        cmvn: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__(enc, precision, pad_mode)
        self.embedding = FusedEncoder(enc.embed, precision, pad_mode)
        # Diagnostics: a list to append every block's gate_idx (N, K) to, in eager calls only
        # (a captured graph would record its own buffers once); None: off.
        self.routing_log: list[torch.Tensor] | None = None
        if cmvn is not None:
            if not (_is_identity_cmvn(enc) and _is_identity_cmvn(enc.embed)):
                raise ValueError(
                    "a global CMVN replaces the encoders' own CMVN, which must be identity "
                    "(3M-ASR normalises outside the network)"
                )
            dev = enc.cmvn_mean.device
            mean, istd = (t.detach().float().to(dev) for t in cmvn)
            for fused in (self, self.embedding):
                fused.cmvn_mean, fused.cmvn_istd = mean, istd

    def _prepare_ff(self, ff: MoEFeedForward) -> dict:
        """Router as stored (any dtype); experts (E, H, D) / (E, D, H) in the compute dtype,
        referenced when the module already holds them so."""
        return {
            "moe_router_w": ff.router_weight.detach(),
            "moe_router_b": None if ff.router_bias is None else ff.router_bias.detach(),
            "moe_w1": self._w(ff.w1),
            "moe_b1": self._w(ff.b1),
            "moe_w2": self._w(ff.w2),
            "moe_b2": self._w(ff.b2),
            "moe_top_k": ff.top_k,
            "moe_renormalize": ff.renormalize,
            "moe_scale_by_gate": ff.scale_by_gate,
            "moe_activation": ff.activation,
        }

    def _second_ffn_add_ln(
        self, x: torch.Tensor, y: torch.Tensor, blk: dict, ff_context: torch.Tensor | None, nxt
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MoE FFN on y (B, T', D) compute dtype, routed with ff_context (B, T', DE) the
        embedding, then residual add (0.5) and norm_final -> the next block's stream (B, T', D)
        and its LayerNorm ``nxt`` (:meth:`FusedEncoder._add_final_norm`).

        Routing reads ``[ff_context, y]`` (embedding first, as MoEFeedForward); the expert bias
        b2 is applied inside the down-projection GEMM, before the gate scale."""
        r = moe_route(
            y,
            blk["moe_router_w"],
            blk["moe_router_b"],
            ff_context,
            blk["moe_top_k"],
            blk["moe_renormalize"],
        )
        if self.routing_log is not None:
            self.routing_log.append(r.gate_idx)
        gate = r.gate_val if blk["moe_scale_by_gate"] else None
        out = moe_experts(
            y,
            r.gate_idx,
            gate,
            blk["moe_w1"],
            blk["moe_b1"],
            blk["moe_w2"],
            blk["moe_b2"],
            blk["moe_activation"],
            out_dtype=self.residual_dtype if self._branches_in_residual_dtype() else None,
        )
        return self._add_final_norm(out, x, blk, nxt)

    @torch.inference_mode()
    def forward(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        chunk_size: int = 0,
        num_left_chunks: int = -1,
        ff_context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, F) float32 raw fbank, lengths (B,) -> (B, T', D) float32, (B,) lengths.

        The embedding network runs first, with the same chunk mask (3M-ASR hands it the main
        encoder's); its output (B, T', DE) float32 is every router's side input unless
        ``ff_context`` is given.
        """
        if ff_context is None:
            ff_context, _ = self.embedding.forward(feats, lengths, chunk_size, num_left_chunks)
        return super().forward(feats, lengths, chunk_size, num_left_chunks, ff_context)
