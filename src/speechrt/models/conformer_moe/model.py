"""3M-ASR's Conformer-MoE: our Conformer with :class:`~speechrt.layers.moe.MoEFeedForward` swapped
into the second FFN of every block, routed on ``[embedding, x]``.

* :class:`MoEEncoder` is our :class:`~speechrt.models.conformer.encoder.Encoder` built with an MoE
  ``ff_factory``, plus the embedding network (itself a dense ``Encoder``) whose final hidden state
  (after its ``after_norm``) is the router side input of every block.
* :class:`ConformerMoEASR` adds the CTC head and the attention decoder (reusing the WeNet model's
  CTC / rescoring / beam-search methods).
* :class:`ConformerMoEModel` is the :class:`~speechrt.models.conformer.recognizer.WenetModel`
  facade with CMVN applied outside the network, as 3M-ASR does.

3M-ASR conventions, all configured rather than coded: LayerNorm eps 1e-12 (encoders and decoder;
the conv module keeps 1e-5), first-frame subsampling mask (only visible in padded batches with
``pad_mode="wenet"``), the conv module's padded-batch leak (``pad_mode="wenet"`` as in WeNet),
top-1 routing on the full float32 softmax with the gate value scaling the expert output.
"""

from __future__ import annotations

import torch
from torch import nn

from speechrt.errors import UnsupportedOptionError
from speechrt.layers.moe import MoEFeedForward
from speechrt.models.conformer.config import EncoderConfig
from speechrt.models.conformer.decoder import AttentionDecoder
from speechrt.models.conformer.encoder import Encoder
from speechrt.models.conformer.model import ConformerASR
from speechrt.models.conformer.recognizer import WenetModel
from speechrt.models.conformer.tokenizer import SymbolTable
from speechrt.models.conformer_moe.config import LN_EPS, ConformerMoEConfig


def _set_layer_norm_eps(module: nn.Module, eps: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps


class MoEEncoder(Encoder):
    """Features (B, T, F), CMVN already applied -> (B, T', D) and lengths (B,).

    ``self`` is the MoE Conformer; ``self.embed`` the embedding network, ``self.embed_ctc`` its
    CTC head (3M-ASR's ``embed.out_linear``: training loss only, kept for parity checks).
    """

    def __init__(self, cfg: ConformerMoEConfig, backend: str = "auto"):
        moe, d_embed = cfg.moe, cfg.embed_encoder.output_size

        def make_ff(enc: EncoderConfig) -> MoEFeedForward:
            return MoEFeedForward(
                enc.output_size,
                moe.hidden_units,
                moe.num_experts,
                d_embed=d_embed,
                activation=enc.activation_type,
                router_bias=moe.router_with_bias,
                scale_by_gate=not moe.keep_expert_output,
                backend=backend,
            )

        super().__init__(cfg.encoder, cfg.input_dim, ff_factory=make_ff)
        self.embed = Encoder(cfg.embed_encoder, cfg.input_dim)
        self.embed_ctc = nn.Linear(d_embed, cfg.vocab_size)
        for enc in (self, self.embed):  # 3M-ASR's LinearNoSubsampling norm: eps 1e-12 too
            if enc.cfg.input_layer == "linear":
                enc.subsampling.norm.eps = LN_EPS

    def embedding(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        decoding_chunk_size: int = -1,
        num_decoding_left_chunks: int = -1,
        pad_mode: str = "zero",
    ) -> torch.Tensor:
        """The router side input: the embedding network's hidden state (B, T', DE)."""
        out, _ = self.embed(feats, lengths, decoding_chunk_size, num_decoding_left_chunks, pad_mode)
        return out

    def forward(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        decoding_chunk_size: int = -1,
        num_decoding_left_chunks: int = -1,
        pad_mode: str = "zero",
        ff_context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`Encoder.forward`; ``ff_context`` defaults to :meth:`embedding` of feats."""
        if ff_context is None:
            ff_context = self.embedding(
                feats, lengths, decoding_chunk_size, num_decoding_left_chunks, pad_mode
            )
        return super().forward(
            feats, lengths, decoding_chunk_size, num_decoding_left_chunks, pad_mode, ff_context
        )

    def forward_chunk(self, *args, **kwargs):
        raise UnsupportedOptionError(
            "3M-ASR Conformer-MoE models have no streaming (chunk-by-chunk) path"
        )


class ConformerMoEASR(nn.Module):
    """3M-ASR's ``conformer_aed_moe_catEmbed`` (or CTC-only ``conformer_moe_catEmbed``) network.

    Same interface as :class:`~speechrt.models.conformer.model.ConformerASR` (``encoder``, ``ctc``,
    ``decoder``, ``cfg``), whose CTC, rescoring and beam-step methods it reuses.
    """

    ctc_log_probs = ConformerASR.ctc_log_probs
    rescoring_log_probs = ConformerASR.rescoring_log_probs
    beam_step = ConformerASR.beam_step

    def __init__(self, cfg: ConformerMoEConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        d = cfg.encoder.output_size
        self.encoder = MoEEncoder(cfg, backend)
        self.ctc = nn.Linear(d, cfg.vocab_size)  # 3M-ASR's encoder.out_linear
        self.decoder = None
        if cfg.decoder is not None:
            self.decoder = AttentionDecoder(cfg.vocab_size, d, cfg.decoder)
            _set_layer_norm_eps(self.decoder, LN_EPS)

    def moe_layers(self) -> list[MoEFeedForward]:
        """The MoE FFN of every block, in order."""
        return [layer.ff for layer in self.encoder.layers]


class ConformerMoEModel(WenetModel):
    """A loaded 3M-ASR Conformer-MoE behind the common facade (``transcribe``, ``encode``,
    ``decode`` with WeNet's four methods). ``encode`` takes raw fbank and applies the global CMVN
    before the network; ``pad_mode="wenet"`` reproduces 3M-ASR's padded-batch outputs (its
    recognizer decodes batch 1, which the default ``"zero"`` equals for every batch).

    ``engine``: a :class:`~speechrt.engine.runner.ConformerEngine` whose encoder is the fused
    MoE encoder (:mod:`speechrt.models.conformer_moe.fused`, the same CMVN applied inside), or
    None for the torch modules; see :func:`~speechrt.models.conformer_moe.load_conformer_moe`."""

    family = "conformer_moe"

    def __init__(
        self,
        net: ConformerMoEASR,
        symbols: SymbolTable,
        path,
        device,
        dtype,
        cmvn_mean: torch.Tensor,
        cmvn_istd: torch.Tensor,
        engine=None,
    ):
        super().__init__(net, symbols, path, device, dtype, engine)
        self.cmvn_mean = cmvn_mean.float().to(self.device)
        self.cmvn_istd = cmvn_istd.float().to(self.device)

    def _options(self, **kwargs):
        opts = super()._options(**kwargs)
        if opts.simulate_streaming:
            raise UnsupportedOptionError(
                "simulate_streaming: 3M-ASR Conformer-MoE models have no streaming path"
            )
        return opts

    def _encoder_input(self, feats: torch.Tensor) -> torch.Tensor:
        """3M-ASR applies CMVN outside the model: normalise here, then cast."""
        feats = feats.to(self.device, torch.float32)
        return ((feats - self.cmvn_mean) * self.cmvn_istd).to(self.dtype)
