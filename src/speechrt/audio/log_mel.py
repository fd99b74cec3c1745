"""Whisper's log-mel front end, batched.

Conventions (those of openai-whisper's ``audio.log_mel_spectrogram``): 16 kHz audio, STFT with
``n_fft=400``, ``hop=160``, a periodic Hann window and centred frames (reflect padding), power
spectrum with the last frame dropped, a Slaney mel filterbank (the shipped ``mel_filters.npz``),
``log10`` clamped at 1e-10, then ``max(x, max - 8)`` and ``(x + 4) / 4``.

The ``max - 8`` floor is taken PER UTTERANCE over that utterance's valid frames, never over the
batch, so a batch row equals the spectrogram of that utterance alone.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from speechrt.errors import AudioError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a 30 s window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100

_FILTERS = Path(__file__).resolve().parents[1] / "assets" / "whisper" / "mel_filters.npz"


@functools.cache
def _filters_np(n_mels: int) -> np.ndarray:
    if n_mels not in (80, 128):
        raise AudioError(f"Whisper log-mel supports n_mels 80 or 128, got {n_mels}")
    with np.load(_FILTERS, allow_pickle=False) as f:
        return f[f"mel_{n_mels}"]


def mel_filters(n_mels: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The mel filterbank, shape ``(n_mels, N_FFT // 2 + 1)`` float32, on ``device``."""
    return torch.from_numpy(_filters_np(n_mels)).to(device)


def num_frames(num_samples: int | torch.Tensor, padding: int = 0) -> int | torch.Tensor:
    """Frames produced for ``num_samples`` samples plus ``padding`` zeros (last frame dropped)."""
    return (num_samples + padding) // HOP_LENGTH


def _as_batch(audio: np.ndarray | torch.Tensor, device) -> tuple[torch.Tensor, bool]:
    """(N,) or (B, N) audio -> ((B, N) float32 tensor on device, was_single)."""
    if not torch.is_tensor(audio):
        audio = torch.from_numpy(np.asarray(audio))
    if device is not None:
        audio = audio.to(device)
    if audio.ndim not in (1, 2):
        raise AudioError(f"audio must be (N,) or (B, N), got shape {tuple(audio.shape)}")
    if audio.shape[-1] == 0:
        raise AudioError("audio is empty (0 samples)")
    single = audio.ndim == 1
    audio = audio.float()
    return (audio[None] if single else audio), single


def _reflect_padded(audio: torch.Tensor, lengths: torch.Tensor, padding: int) -> torch.Tensor:
    """Per row: ``audio[b, :len_b]`` + ``padding`` zeros, reflect-padded by N_FFT // 2 each side.

    audio: (B, N); lengths: (B,) -> (B, N + padding + N_FFT). Samples past a row's reflected end
    are zero; they only feed frames that the caller masks.
    """
    half = N_FFT // 2
    total = lengths + padding  # (B,) signal length incl. zero padding
    t = torch.arange(audio.shape[1] + padding + N_FFT, device=audio.device) - half  # (T,)
    src = t[None, :].abs()  # reflect at the left edge: x[-i] -> x[i]
    last = (total - 1)[:, None]  # (B, 1)
    src = torch.where(src > last, 2 * last - src, src)  # reflect at the right edge
    valid = (src >= 0) & (src < lengths[:, None]) & (t[None, :] < total[:, None] + half)
    gathered = audio.gather(1, src.clamp(0, audio.shape[1] - 1))  # (B, T)
    return torch.where(valid, gathered, torch.zeros((), dtype=audio.dtype, device=audio.device))


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    n_mels: int = 80,
    padding: int = 0,
    device: torch.device | str | None = None,
    lengths: torch.Tensor | np.ndarray | list[int] | None = None,
) -> torch.Tensor:
    """Whisper log-mel spectrogram of 16 kHz float audio.

    audio: (N,) or (B, N) float samples; ``lengths`` (B,) gives each row's valid samples
    (default: all N). ``padding`` zero samples are appended to every utterance first.
    Returns (n_mels, F) for 1-D input, else (B, n_mels, F) with F = (N + padding) // 160;
    row b's frames from ``num_frames(lengths[b], padding)`` on are 0.
    """
    x, single = _as_batch(audio, device)
    batch, n = x.shape
    if lengths is None:
        lens = torch.full((batch,), n, dtype=torch.long, device=x.device)
    else:
        lens = torch.as_tensor(lengths, dtype=torch.long, device=x.device).reshape(-1)
        if lens.shape[0] != batch:
            raise AudioError(f"lengths has {lens.shape[0]} entries for a batch of {batch}")
    padded = _reflect_padded(x, lens, padding)  # (B, N + padding + N_FFT)
    window = torch.hann_window(N_FFT, device=x.device)
    stft = torch.stft(padded, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    power = stft[..., :-1].abs() ** 2  # (B, 201, F)
    mel = mel_filters(n_mels, x.device) @ power  # (B, n_mels, F)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    frames = num_frames(lens, padding)  # (B,)
    valid = torch.arange(log_spec.shape[-1], device=x.device)[None, :] < frames[:, None]  # (B, F)
    valid = valid[:, None, :]  # (B, 1, F)
    peak = log_spec.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    log_spec = ((log_spec + 4.0) / 4.0).masked_fill(~valid, 0.0)
    return log_spec[0] if single else log_spec
