"""The WeNet ASR model (encoder + CTC head + attention decoder) as one nn.Module."""

from __future__ import annotations

import torch
from torch import nn

from speechrt.decoding.attention import StepFn
from speechrt.decoding.rescoring import decoder_inputs
from speechrt.models.conformer.config import ModelConfig
from speechrt.models.conformer.decoder import AttentionDecoder
from speechrt.models.conformer.encoder import Encoder


class ConformerASR(nn.Module):
    """WeNet's ``ASRModel`` for inference. Tensors in, tensors out; no audio, no text."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.encoder.output_size
        self.encoder = Encoder(cfg.encoder, cfg.input_dim)
        self.ctc = nn.Linear(d, cfg.vocab_size)
        self.decoder = AttentionDecoder(cfg.vocab_size, d, cfg.decoder) if cfg.decoder else None

    def ctc_log_probs(self, encoder_out: torch.Tensor) -> torch.Tensor:
        """(B, T', D) -> float32 CTC log-posteriors (B, T', V)."""
        return torch.log_softmax(self.ctc(encoder_out).float(), dim=-1)

    def rescoring_log_probs(
        self,
        encoder_out: torch.Tensor,
        encoder_lengths: torch.Tensor,
        hyps: torch.Tensor,
        hyp_lengths: torch.Tensor,
        with_r2l: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced decoder log-probs for n-best lists.

        hyps (B, W, L), hyp_lengths (B, W) (< 0 absent) -> (l2r (B, W, L+1, V), r2l or None).
        """
        l2r_in, r2l_in, in_lengths = decoder_inputs(hyps, hyp_lengths, self.cfg.sos, self.cfg.eos)
        l2r = self.decoder.l2r
        l2r_lp = l2r(l2r_in, in_lengths, l2r.project_memory(encoder_out), encoder_lengths)
        r2l_lp = None
        if with_r2l and self.decoder.r2l is not None:
            r2l = self.decoder.r2l
            r2l_lp = r2l(r2l_in, in_lengths, r2l.project_memory(encoder_out), encoder_lengths)
        return l2r_lp, r2l_lp

    def beam_step(
        self, encoder_out: torch.Tensor, encoder_lengths: torch.Tensor, beam_size: int
    ) -> StepFn:
        """A :data:`StepFn` for attention beam search over the L2R decoder, with a KV cache."""
        dec = self.decoder.l2r
        memory_kv = dec.project_memory(encoder_out)
        caches: list[torch.Tensor | None] = [None] * len(dec.layers)
        b = encoder_out.shape[0]

        def step(tokens: torch.Tensor, i: int, parents: torch.Tensor | None) -> torch.Tensor:
            nonlocal caches
            if parents is not None and caches[0] is not None:
                flat = parents + torch.arange(b, device=parents.device).unsqueeze(1) * beam_size
                flat = flat.reshape(-1)
                caches = [c.index_select(0, flat) for c in caches]
            logp, caches = dec.step(tokens, i, memory_kv, encoder_lengths, caches)
            return logp

        return step
