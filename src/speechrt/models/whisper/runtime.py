"""``WhisperModel``: a loaded Whisper network with its tokenizer; decode, detect, transcribe."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from speechrt.audio.log_mel import N_FRAMES, N_SAMPLES, log_mel_spectrogram
from speechrt.decoding.whisper import (
    WhisperDecodeOptions,
    WindowDecoder,
    WindowResult,
    detect_language,
)
from speechrt.engine.decode_graphs import DecodeEngine
from speechrt.engine.graphs import GraphRunner
from speechrt.errors import UnsupportedOptionError
from speechrt.models.whisper.config import WhisperDims
from speechrt.models.whisper.convert import WhisperCheckpoint, read_checkpoint
from speechrt.models.whisper.model import WhisperNet, cast_
from speechrt.models.whisper.tokenizer import WhisperTokenizer, get_tokenizer
from speechrt.results import Transcript

_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def _pick_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class WhisperModel:
    """A Whisper network ready to decode.

    ``dtype`` defaults to FP32 on CPU and FP16 on CUDA (LayerNorm always runs in FP32). On CUDA
    window decoding replays the cross-attention K/V (``set_audio``), the prompt's prefill and each
    decode step from CUDA graphs (``engine``, a
    :class:`~speechrt.engine.decode_graphs.DecodeEngine`) and the network takes its Triton
    kernel path; :meth:`configure` switches either off (e.g. for comparisons). The encoder is
    replayed from a CUDA graph per batch bucket too (batches padded with silent windows; at batch
    1 the eager encoder is bound by the host launching its kernels).
    """

    def __init__(self, net: WhisperNet, source: str = "", cuda_graphs: bool = True) -> None:
        self.net = net.eval()
        self.dims: WhisperDims = net.dims
        self.source = source
        self.tokenizer: WhisperTokenizer = get_tokenizer(
            self.dims.is_multilingual, self.dims.num_languages
        )
        self.engine = DecodeEngine(net, cuda_graphs=cuda_graphs)
        self.encoder_graphs = GraphRunner(self.net.embed_audio, enabled=cuda_graphs)

    def configure(self, cuda_graphs: bool | None = None, kernels: bool | None = None) -> None:
        """Switch CUDA-graph decode steps and the Triton kernel path on/off (None: unchanged;
        ``kernels`` as ``WhisperNet.kernels``: True forces them, e.g. under the interpreter)."""
        if cuda_graphs is not None:
            self.engine.cuda_graphs = cuda_graphs
            self.encoder_graphs.enabled = cuda_graphs
        if kernels is not None:
            self.net.kernels = kernels

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: WhisperCheckpoint,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> WhisperModel:
        """Build the network on the meta device and assign the checkpoint's tensors."""
        device = _pick_device(device)
        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
        if dtype not in _DTYPES:
            raise UnsupportedOptionError(
                f"unsupported dtype {dtype}; use float32, float16 or bfloat16"
            )
        with torch.device("meta"):
            net = WhisperNet(ckpt.dims)
        # fresh allocations: mmap'd or safetensors buffers may be unaligned, and CPU kernels
        # then sum in another order (the same checkpoint would give different last bits)
        state = {k: v.to(device, copy=True) for k, v in ckpt.state_dict.items()}
        net.load_state_dict(state, assign=True, strict=True)
        heads = ckpt.alignment_heads
        if heads is None:
            heads = torch.zeros(ckpt.dims.n_text_layer, ckpt.dims.n_text_head, dtype=torch.bool)
            heads[ckpt.dims.n_text_layer // 2 :] = True
        net.alignment_heads = heads.to(device, copy=True)
        net = cast_(net, dtype)
        return cls(net, ckpt.source)

    @property
    def device(self) -> torch.device:
        return self.net.decoder.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.decoder.tok_emb.weight.dtype

    @property
    def is_multilingual(self) -> bool:
        return self.dims.is_multilingual

    # --- windows ------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_audio(self, mel: Tensor) -> Tensor:
        """(B, n_mels, 3000) log-mel -> audio features (B, n_audio_ctx, n_audio_state).

        On CUDA with graphs on, the batch is padded to a bucket of the decode engine's batch sizes
        and the encoder replayed from that bucket's graph (rows are independent: padding changes
        no valid output); otherwise it runs eagerly."""
        mel = mel.to(self.device, self.dtype)
        n = mel.shape[0] if mel.ndim == 3 else 0
        window = (self.dims.n_mels, 2 * self.dims.n_audio_ctx)  # (M, T) of one 30 s window
        shape_ok = mel.ndim == 3 and tuple(mel.shape[1:]) == window
        if not (shape_ok and n and self.encoder_graphs.enabled and mel.is_cuda):
            return self.net.embed_audio(mel)  # also the path that names a wrong shape
        bucket = self.engine.buckets.batch(n)
        if bucket > n:
            mel = torch.cat([mel, mel.new_zeros(bucket - n, *mel.shape[1:])])  # (bucket, M, T)
        key = (bucket, self.dtype, self.net.uses_kernels(mel.device))
        return self.encoder_graphs(key, mel)[:n].clone()

    @torch.inference_mode()
    def decode(
        self, mel: Tensor, options: WhisperDecodeOptions | None = None, **kwargs
    ) -> WindowResult | list[WindowResult]:
        """Decode 30 s windows: mel (n_mels, 3000) -> one result, (B, n_mels, 3000) -> list."""
        options = replace(options or WhisperDecodeOptions(), **kwargs)
        single = mel.ndim == 2
        features = self.embed_audio(mel[None] if single else mel)
        results = self.decode_features(features, options)
        return results[0] if single else results

    @torch.inference_mode()
    def decode_features(
        self,
        features: Tensor,
        options: WhisperDecodeOptions,
        prompts: list[list[int]] | None = None,
        forced_lengths: Tensor | None = None,
    ) -> list[WindowResult]:
        """Decode windows from encoder features (A, n_audio_ctx, n_audio_state).

        ``prompts``: one prompt per window (token ids, all as long as ``options.prompt``);
        ``forced_lengths`` (A,) (benchmarks): exact sampled token counts per window.
        """
        decoder = WindowDecoder(
            self.tokenizer, options, self.dims.n_text_ctx, self.dims.n_audio_ctx
        )
        session = self.engine.session(features, decoder.group)
        return decoder.run(session, features.shape[0], self.device, prompts, forced_lengths)

    @torch.inference_mode()
    def detect_language_features(
        self, features: Tensor
    ) -> tuple[list[str], list[dict[str, float]]]:
        """Most probable language and {code: probability} per window of features (A, S, D)."""
        n_audio = features.shape[0]
        self.net.ensure_caches(n_audio, n_audio)
        self.net.set_audio(features)
        tokenizer = self.tokenizer.with_options("en", "transcribe")
        _, probs = detect_language(self.net, tokenizer, n_audio, self.device)
        return [max(p, key=p.get) for p in probs], probs

    # --- audio --------------------------------------------------------------------------
    def log_mel(self, audio: np.ndarray | Tensor, padding: int = 0) -> Tensor:
        """16 kHz mono (N,) -> (n_mels, (N + padding) // 160) on the model's device."""
        return log_mel_spectrogram(audio, self.dims.n_mels, padding=padding, device=self.device)

    def detect_language(
        self, audio
    ) -> tuple[str, dict[str, float]] | list[tuple[str, dict[str, float]]]:
        """Language of the first 30 s: ``(code, {code: probability})``; a list for a list input."""
        from speechrt.models.whisper.transcribe import load_whisper_audio

        if isinstance(audio, (list, tuple)):
            return [self.detect_language(a) for a in audio]
        if not self.is_multilingual:
            raise UnsupportedOptionError("language detection needs a multilingual model")
        mel = self.log_mel(load_whisper_audio(audio), padding=N_SAMPLES)[:, :N_FRAMES]
        codes, probs = self.detect_language_features(self.embed_audio(mel[None]))
        return codes[0], probs[0]

    def transcribe(self, audio, batch_size: int = 8, **options) -> Transcript | list[Transcript]:
        """Transcribe (or translate) audio of any length in 30 s windows.

        ``audio``: a path, bytes, or a 16 kHz mono float array; a list gives a list, decoded
        with up to ``batch_size`` files advancing together (1: one file after another; greedy
        and beam search give the same tokens and segments either way). Options are those of
        :func:`speechrt.models.whisper.transcribe.transcribe` (temperature, beam_size,
        best_of, patience, length_penalty, language, task, initial_prompt,
        condition_on_previous_text, without_timestamps, word_timestamps, thresholds, ...).
        """
        from speechrt.models.whisper.batched import transcribe_batched
        from speechrt.models.whisper.transcribe import transcribe

        if batch_size < 1:
            raise UnsupportedOptionError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(audio, (list, tuple)):
            return transcribe(self, audio, **options)
        if batch_size == 1:
            return [transcribe(self, a, **options) for a in audio]
        return transcribe_batched(self, list(audio), batch_size, **options)


def load_whisper(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> WhisperModel:
    """Load an OpenAI ``.pt`` file, a Hugging Face directory, or a model name / HF repo id
    (resolved with ``huggingface_hub.snapshot_download`` into ``cache_dir``)."""
    from speechrt.models.whisper.hub import resolve_model_path

    resolved = resolve_model_path(path, cache_dir=cache_dir, local_files_only=local_files_only)
    return WhisperModel.from_checkpoint(read_checkpoint(resolved), device=device, dtype=dtype)
