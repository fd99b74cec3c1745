"""The Conformer engine: fused-kernel encoder and rescoring decoder behind bucketed CUDA graphs.

Owns the GPU state (prepared weights, static buffers, captured graphs). ``cuda_graphs=False`` or a
CPU device runs the same step functions eagerly (on CPU only under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from speechrt.decoding.ctc import ctc_prefix_beam_search
from speechrt.engine.batching import Buckets, pad_to
from speechrt.engine.graphs import GraphRunner
from speechrt.engine.memory import WeightReport, weight_report
from speechrt.engine.precision import Precision
from speechrt.models.conformer.fused import FusedDecoder, FusedEncoder

# The fused encoder's kernel/precision switches (attributes, flipped before a capture).
ENCODER_SWITCHES = (
    "triton_front",
    "triton_ffn",
    "triton_glu",
    "triton_linear",
    "triton_add_ln",
    "fp32_branches",
    "tf32_attention",
    "fused_ffn",
)


class ConformerEngine:
    """Fast path of a :class:`~speechrt.models.conformer.model.ConformerASR` (or of a model with
    the same interface, e.g. the Conformer-MoE, whose fused ``encoder`` is passed in: an object
    with ``forward(feats, lengths, chunk_size, num_left_chunks) -> (out, lengths)``)."""

    def __init__(
        self,
        net,
        precision: Precision,
        cuda_graphs: bool = True,
        buckets: Buckets | None = None,
        pad_mode: str = "zero",
        encoder=None,
    ):
        self.net = net
        self.precision = precision
        self.buckets = buckets or Buckets()
        if encoder is None:
            encoder = FusedEncoder(net.encoder, precision, pad_mode)
        self.encoder = encoder
        self.l2r = self.r2l = None
        if net.decoder is not None:
            self.l2r = FusedDecoder(net.decoder.l2r, precision)
            if net.decoder.r2l is not None:
                self.r2l = FusedDecoder(net.decoder.r2l, precision)
        self._enc_graphs = GraphRunner(self._encode_step, enabled=cuda_graphs)
        self._ctc_graphs = GraphRunner(self._prefix_step, enabled=cuda_graphs)
        self._beam = (10, 0)
        self._dec_graphs = GraphRunner(self._rescore_step, enabled=cuda_graphs)
        self._chunk = (0, -1)

    def weight_report(self) -> WeightReport:
        """Bytes of weights the fused encoder/decoders hold, split into tensors shared with the
        torch modules' parameters and buffers (no extra memory) and private ones (casts, fused
        concatenations, reordered copies). See :func:`speechrt.engine.memory.weight_report`."""
        parts = {"encoder": self.encoder, "l2r": self.l2r, "r2l": self.r2l}
        return weight_report(self.net, {k: v for k, v in parts.items() if v is not None})

    # ------------------------------------------------------------------ encoder
    def _encode_step(self, feats: torch.Tensor, lengths: torch.Tensor):
        return self.encoder.forward(feats, lengths, *self._chunk)

    @torch.inference_mode()
    def encode(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        chunk_size: int = 0,
        num_left_chunks: int = -1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw fbank (B, T, F), lengths (B,) -> (B, T', D) float32 and (B,) output lengths."""
        b, t, _ = feats.shape
        bb, tt = self.buckets.key(b, t)
        padded, plens = pad_to(feats.float(), lengths, bb, tt)
        self._chunk = (chunk_size, num_left_chunks)
        # The encoder's kernel switches are part of the key: flipping one captures anew.
        switches = tuple(getattr(self.encoder, k, None) for k in ENCODER_SWITCHES)
        key = (bb, tt, chunk_size, num_left_chunks, switches)
        out, out_lens = self._enc_graphs(key, padded, plens)
        t_out = int(self.net.encoder.subsampling.output_frames(t))
        return out[:b, :t_out].clone(), out_lens[:b].clone()

    # ------------------------------------------------------------------ CTC prefix beam search
    def _prefix_step(self, log_probs: torch.Tensor, lengths: torch.Tensor):
        beam, blank = self._beam
        return ctc_prefix_beam_search(log_probs, lengths, beam, blank)

    @torch.inference_mode()
    def ctc_prefix_beam_search(self, log_probs, lengths, beam_size: int, blank: int = 0):
        """Batched prefix beam search (decoding.ctc) replayed as one CUDA graph per bucket.

        log_probs (B, T', V) are padded to a bucket of T' so that similar lengths share a graph;
        padded frames lie beyond ``lengths`` and are never read by the search.
        """
        b, t, v = log_probs.shape
        bb, tb = self.buckets.batch(b), _round_up(t, 16)
        # Padded rows have length 0: the search leaves them empty.
        log_probs, lengths = pad_to(log_probs, lengths, bb, tb)
        self._beam = (beam_size, blank)
        res = self._ctc_graphs((bb, tb, v, beam_size, blank), log_probs.contiguous(), lengths)
        return type(res)(*(x[:b].clone() for x in res.__dict__.values()))

    # ------------------------------------------------------------------ rescoring decoder
    def _rescore_step(self, memory, memory_lengths, l2r_in, r2l_in, in_lengths):
        l2r = self.l2r.forward(l2r_in, in_lengths, self.l2r.memory_kv(memory), memory_lengths)
        if self._with_r2l:
            r2l = self.r2l.forward(r2l_in, in_lengths, self.r2l.memory_kv(memory), memory_lengths)
            return l2r, r2l
        return l2r, None

    @torch.inference_mode()
    def rescoring_log_probs(
        self, memory, memory_lengths, l2r_in, r2l_in, in_lengths, with_r2l: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder inputs (B, W, L) -> float32 log-probs (B, W, L, V) (and R2L if asked)."""
        self._with_r2l = bool(with_r2l and self.r2l is not None)
        b, w, l = l2r_in.shape
        # Buckets: batch as the encoder's, memory frames and tokens in steps of 16 and 8. Padded
        # utterances get one memory frame and a one-token input so that no row is empty.
        bb, tm = self.buckets.batch(b), _round_up(memory.shape[1], 16)
        lb = l if l <= 8 else _round_up(l, 8)
        memory, memory_lengths = pad_to(memory.float(), memory_lengths, bb, tm)
        memory_lengths = memory_lengths.clamp(min=1)
        l2r_in, r2l_in = (_pad_tokens(x, bb, lb) for x in (l2r_in, r2l_in))
        in_lengths = (
            torch.cat([in_lengths, in_lengths.new_ones(bb - b, w)]) if bb > b else in_lengths
        )
        key = ("resc", bb, w, lb, tm, self._with_r2l)
        l2r, r2l = self._dec_graphs(key, memory, memory_lengths, l2r_in, r2l_in, in_lengths)
        return l2r[:b, :, :l].clone(), None if r2l is None else r2l[:b, :, :l].clone()


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def _pad_tokens(tokens: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """(B0, W, L0) token ids -> (b, W, length), zero-padded."""
    out = tokens.new_zeros(b, tokens.shape[1], length)
    out[: tokens.shape[0], :, : tokens.shape[2]] = tokens
    return out
