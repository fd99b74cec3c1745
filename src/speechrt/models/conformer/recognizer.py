"""WeNet model directories behind the :class:`speechrt.api.Model` facade: audio -> text."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from speechrt.api import DecodeOptions, Model
from speechrt.decoding.attention import attention_beam_search
from speechrt.decoding.ctc import ctc_greedy_search, ctc_prefix_beam_search, nbest_lists
from speechrt.decoding.rescoring import decoder_inputs, rescoring_scores
from speechrt.errors import AudioError, UnsupportedOptionError
from speechrt.models.conformer.model import ConformerASR
from speechrt.models.conformer.tokenizer import SymbolTable
from speechrt.results import Transcript

# WeNet's positional tables hold 5000 rows: no WeNet model has seen a longer encoder sequence.
MAX_ENCODER_FRAMES = 5000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WenetModel(Model):
    """A loaded WeNet Conformer/Transformer model (see :func:`speechrt.models.conformer.load`)."""

    family = "wenet"

    def __init__(
        self, net: ConformerASR, symbols: SymbolTable, path: Path, device, dtype, engine=None
    ):
        self.net = net.eval().requires_grad_(False)
        self.cfg = net.cfg
        self.symbols = symbols
        self.path = path
        self.device = torch.device(device)
        self.dtype = dtype
        self.engine = engine  # speechrt.engine.runner.ConformerEngine or None (torch modules)
        self.sample_rate = self.cfg.sample_rate

    # ------------------------------------------------------------------ limits and options
    @property
    def min_frames(self) -> int:
        """Fewest fbank frames that give one encoder frame (the subsampling's receptive field)."""
        return self.net.encoder.right_context + 1

    @property
    def min_seconds(self) -> float:
        """Shortest audio accepted: ``min_frames`` fbank frames."""
        return (self.cfg.frame_length + (self.min_frames - 1) * self.cfg.frame_shift) / 1000.0

    @property
    def max_seconds(self) -> float:
        """Longest audio accepted for full-attention decoding."""
        rate = self.net.encoder.rate
        return MAX_ENCODER_FRAMES * rate * self.cfg.frame_shift / 1000.0

    def _options(self, **kwargs) -> DecodeOptions:
        opts = DecodeOptions(**kwargs)
        enc = self.cfg.encoder
        if opts.method in ("attention", "attention_rescoring") and self.net.decoder is None:
            raise UnsupportedOptionError(
                f"method '{opts.method}' needs an attention decoder; this model has none"
            )
        if opts.method == "attention" and opts.beam_size > self.cfg.vocab_size:
            raise UnsupportedOptionError(
                f"beam_size {opts.beam_size} exceeds the vocabulary ({self.cfg.vocab_size} units)"
            )
        if opts.decoding_chunk_size > 0 and not enc.streamable:
            raise UnsupportedOptionError(
                "decoding_chunk_size > 0 (chunk/streaming decoding) needs a model trained with "
                "dynamic or static chunks (use_dynamic_chunk / static_chunk_size); this one is not"
            )
        if (
            opts.method == "attention_rescoring"
            and opts.reverse_weight > 0
            and (self.net.decoder is None or self.net.decoder.r2l is None)
        ):
            raise UnsupportedOptionError(
                "reverse_weight > 0 needs a bidirectional (U2++ bitransformer) decoder; "
                "this model has a left-to-right decoder only"
            )
        return opts

    # ------------------------------------------------------------------ features
    def features(self, waveforms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """16 kHz float waveforms in [-1, 1] -> padded fbank (B, T, F) and frame counts (B,)."""
        from speechrt.audio.fbank import wenet_fbank

        lengths = torch.tensor([w.shape[-1] for w in waveforms], dtype=torch.long)
        batch = torch.zeros(len(waveforms), int(lengths.max()), dtype=torch.float32)
        for i, w in enumerate(waveforms):
            batch[i, : w.shape[-1]] = w
        batch = batch.to(self.device)
        feats, frames = wenet_fbank(
            batch,
            lengths.to(self.device),
            num_mel_bins=self.cfg.num_mel_bins,
            frame_length=self.cfg.frame_length,
            frame_shift=self.cfg.frame_shift,
            sample_frequency=float(self.sample_rate),
        )
        return feats, frames

    # ------------------------------------------------------------------ encoder
    @torch.inference_mode()
    def encode(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        decoding_chunk_size: int = -1,
        num_decoding_left_chunks: int = -1,
        simulate_streaming: bool = False,
        pad_mode: str = "zero",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw fbank (B, T, F) (CMVN is applied inside) -> (encoder_out (B, T', D), lengths (B,)).

        ``pad_mode="wenet"`` reproduces WeNet's padded-batch outputs exactly (its conv module
        leaks pointwise-conv bias from padded frames into the last valid frames); the default
        ``"zero"`` makes every utterance's output independent of the batch it is in.
        """
        opts = self._options(
            method="ctc_greedy_search",
            decoding_chunk_size=decoding_chunk_size,
            num_decoding_left_chunks=num_decoding_left_chunks,
            simulate_streaming=simulate_streaming,
        )
        lengths = lengths.to(self.device)
        if lengths.numel() and int(lengths.min()) < self.min_frames:  # sync-ok: once per batch
            raise AudioError(
                f"an utterance has {int(lengths.min())} fbank frames; this model needs at least "
                f"{self.min_frames} ({self.min_seconds:.3f} s of audio)"
            )
        if self.engine is not None and not opts.simulate_streaming and pad_mode == "zero":
            chunk = self.net.encoder.chunk_config(
                opts.decoding_chunk_size, opts.num_decoding_left_chunks
            )
            return self.engine.encode(feats.to(self.device), lengths, *chunk)
        feats = self._encoder_input(feats)
        if opts.simulate_streaming:
            return self._encode_streaming(feats, lengths, opts)
        return self.net.encoder(
            feats, lengths, opts.decoding_chunk_size, opts.num_decoding_left_chunks, pad_mode
        )

    def _encoder_input(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw fbank as the torch encoder takes it (WeNet applies CMVN inside the encoder)."""
        return feats.to(self.device, self.net.ctc.weight.dtype)

    def _encode_streaming(self, feats, lengths, opts) -> tuple[torch.Tensor, torch.Tensor]:
        outs = []
        for i in range(feats.shape[0]):
            n = int(lengths[i])
            y, _ = self.net.encoder.forward_chunk_by_chunk(
                feats[i : i + 1, :n], opts.decoding_chunk_size, opts.num_decoding_left_chunks
            )
            outs.append(y[0])
        out_lengths = torch.tensor([o.shape[0] for o in outs], device=self.device)
        out = feats.new_zeros(len(outs), max(int(out_lengths.max()), 1), outs[0].shape[-1])
        for i, o in enumerate(outs):
            out[i, : o.shape[0]] = o
        return out, out_lengths

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def decode(
        self, feats: torch.Tensor, lengths: torch.Tensor, pad_mode: str = "zero", **options
    ) -> list[list[tuple[list[int], float]]]:
        """Fbank (B, T, F) -> per utterance a best-first list of (tokens, score).

        ``options`` are :class:`~speechrt.api.DecodeOptions` fields; ``pad_mode`` as in
        :meth:`encode`.
        """
        opts = self._options(**options)
        enc, enc_lens = self.encode(
            feats,
            lengths,
            opts.decoding_chunk_size,
            opts.num_decoding_left_chunks,
            opts.simulate_streaming,
            pad_mode,
        )
        return self._search(enc, enc_lens, opts)

    def _search(self, enc, enc_lens, opts: DecodeOptions) -> list[list[tuple[list[int], float]]]:
        cfg = self.cfg
        if opts.method == "attention":
            res = attention_beam_search(
                self.net.beam_step(enc.to(self.net.ctc.weight.dtype), enc_lens, opts.beam_size),
                enc.shape[0],
                opts.beam_size,
                cfg.sos,
                cfg.eos,
                enc_lens,
                enc.device,
                opts.length_penalty,
            )
            return _best_only(res.tokens, res.lengths, res.scores)
        logp = self.net.ctc_log_probs(enc.to(self.net.ctc.weight.dtype))
        if opts.method == "ctc_greedy_search":
            res = ctc_greedy_search(logp, enc_lens, cfg.blank)
            return _best_only(res.tokens, res.token_lengths, res.scores)
        if self.engine is not None:
            beam = self.engine.ctc_prefix_beam_search(logp, enc_lens, opts.beam_size, cfg.blank)
        else:
            beam = ctc_prefix_beam_search(logp, enc_lens, opts.beam_size, cfg.blank)
        if opts.method == "ctc_prefix_beam_search":
            return nbest_lists(beam)
        # Hypotheses are stored T' wide; the decoder only needs the longest one.
        width = max(int(beam.hyp_lengths.max()), 1)  # sync-ok: once per batch, not per step
        beam = replace(beam, hyps=beam.hyps[..., :width].contiguous())
        l2r, r2l = self._rescoring_log_probs(enc, enc_lens, beam, opts.reverse_weight > 0)
        res = rescoring_scores(
            l2r,
            r2l,
            beam.hyps,
            beam.hyp_lengths,
            beam.scores,
            cfg.eos,
            opts.ctc_weight,
            opts.reverse_weight,
        )
        order = torch.argsort(res.scores, dim=-1, descending=True, stable=True)
        ranked = replace(
            beam,
            hyps=torch.gather(beam.hyps, 1, order.unsqueeze(-1).expand_as(beam.hyps)),
            hyp_lengths=torch.gather(beam.hyp_lengths, 1, order),
            scores=torch.gather(res.scores, 1, order),
        )  # absent hypotheses score -inf and stay behind the ``count`` real ones
        return nbest_lists(ranked)

    def _rescoring_log_probs(self, enc, enc_lens, beam, with_r2l: bool):
        if self.engine is None:
            dtype = self.net.ctc.weight.dtype
            return self.net.rescoring_log_probs(
                enc.to(dtype), enc_lens, beam.hyps, beam.hyp_lengths, with_r2l=with_r2l
            )
        l2r_in, r2l_in, in_lens = decoder_inputs(
            beam.hyps, beam.hyp_lengths, self.cfg.sos, self.cfg.eos
        )
        return self.engine.rescoring_log_probs(enc, enc_lens, l2r_in, r2l_in, in_lens, with_r2l)

    # ------------------------------------------------------------------ audio -> text
    def load_audio(self, source, sample_rate: int | None = None) -> torch.Tensor:
        """Decode/resample one input and check it is usable (not empty, silent or too long)."""
        from speechrt.audio.io import check_waveform, load_audio

        wav = load_audio(source, sample_rate=sample_rate, target_rate=self.sample_rate)
        name = str(source) if isinstance(source, (str, Path)) else "audio"
        check_waveform(
            wav,
            self.sample_rate,
            name=name,
            max_seconds=self.max_seconds,
            min_seconds=self.min_seconds,
        )
        return wav

    def transcribe(
        self,
        audio,
        method: str = "attention_rescoring",
        beam_size: int = 10,
        ctc_weight: float = 0.5,
        reverse_weight: float = 0.0,
        decoding_chunk_size: int = -1,
        num_decoding_left_chunks: int = -1,
        simulate_streaming: bool = False,
        sample_rate: int | None = None,
        batch_size: int = 16,
        length_penalty: float = 0.0,
    ) -> Transcript | list[Transcript]:
        """Transcribe one input (-> Transcript) or a list (-> list, batched by length)."""
        opts = dict(
            method=method,
            beam_size=beam_size,
            ctc_weight=ctc_weight,
            reverse_weight=reverse_weight,
            decoding_chunk_size=decoding_chunk_size,
            num_decoding_left_chunks=num_decoding_left_chunks,
            simulate_streaming=simulate_streaming,
            length_penalty=length_penalty,
        )
        self._options(**opts)
        single = not isinstance(audio, (list, tuple))
        items = [audio] if single else list(audio)
        t0 = time.perf_counter()
        wavs = [self.load_audio(a, sample_rate) for a in items]
        load_s = time.perf_counter() - t0
        results = self.recognize(wavs, batch_size, **opts)
        total = sum(w.shape[-1] for w in wavs)
        for w, tr in zip(wavs, results):
            tr.timings["load_s"] = load_s * w.shape[-1] / total
        return results[0] if single else results

    def recognize(
        self, wavs: Sequence[torch.Tensor], batch_size: int = 16, on_batch=None, **options
    ) -> list[Transcript]:
        """Loaded waveforms -> transcripts in input order, batched longest first.

        ``on_batch(n)`` is called after each batch of n inputs (progress bars)."""
        if batch_size < 1:
            raise UnsupportedOptionError(f"batch_size must be >= 1, got {batch_size}")
        results: list[Transcript | None] = [None] * len(wavs)
        order = sorted(range(len(wavs)), key=lambda i: -wavs[i].shape[-1])
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, tr in zip(idx, self.transcribe_waveforms([wavs[i] for i in idx], **options)):
                results[i] = tr
            if on_batch is not None:
                on_batch(len(idx))
        return results

    def transcribe_waveforms(self, wavs: Sequence[torch.Tensor], **options) -> list[Transcript]:
        """Batched recognition of 16 kHz waveforms (already loaded and checked)."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            feats, frames = self.features(wavs)
            _sync(self.device)
            t1 = time.perf_counter()
            nbest = self.decode(feats, frames, **options)
            _sync(self.device)
        t2 = time.perf_counter()
        total_audio = sum(w.shape[-1] for w in wavs) / self.sample_rate
        out = []
        for w, hyps in zip(wavs, nbest):
            tokens, score = hyps[0] if hyps else ([], float("-inf"))
            share = (w.shape[-1] / self.sample_rate) / total_audio if total_audio else 0.0
            timings = {
                "audio_s": w.shape[-1] / self.sample_rate,
                "features_s": (t1 - t0) * share,
                "decode_s": (t2 - t1) * share,
            }
            out.append(
                Transcript(self.symbols.detokenize(tokens), tuple(tokens), score, timings=timings)
            )
        return out


def _best_only(
    tokens: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor
) -> list[list[tuple[list[int], float]]]:
    """(B, L) padded best hypotheses -> one-element n-best lists (one host copy, after search)."""
    toks, lens, scores = tokens.cpu(), lengths.cpu(), scores.cpu()
    return [[(toks[b, : lens[b]].tolist(), float(scores[b]))] for b in range(toks.shape[0])]
