"""Audio input: decode a file, bytes or array to a mono float32 waveform at the model's rate.

* Decoding: soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3 from libsndfile 1.1 on, and the
  other formats ``soundfile.available_formats()`` lists). If soundfile cannot decode a file and
  PyAV (``av``, optional) is installed, FFmpeg through PyAV is tried next.
* Channels are averaged; integer PCM is scaled to [-1, 1) (int16 / 32768, int32 / 2**31). Float
  input is passed through unchanged (not clipped), so resampling may overshoot +-1 slightly.
* Resampling: soxr with quality ``"HQ"`` (soxr's default: 20-bit precision, about 120 dB
  stop-band attenuation, linear phase).

Every problem a user can cause raises :class:`~speechrt.errors.AudioError` with one line naming
the file (or ``audio bytes`` / ``audio array``) and the problem.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from speechrt.errors import AudioError

__all__ = ["RESAMPLE_QUALITY", "AudioSource", "audio_duration", "check_waveform", "load_audio"]

AudioSource = str | os.PathLike | bytes | bytearray | np.ndarray | torch.Tensor
RESAMPLE_QUALITY = "HQ"
SILENCE_PEAK = 1e-7
_EXPECTED = "WAV, FLAC, OGG/Vorbis/Opus or MP3"
_INT_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}


def load_audio(
    source: AudioSource, sample_rate: int | None = None, target_rate: int = 16000
) -> torch.Tensor:
    """Load audio as a 1-D float32 CPU tensor (N,) of mono samples at ``target_rate``.

    Args:
        source: a path (str / PathLike), an encoded file in memory (bytes / bytearray), or
            samples as a numpy array / torch tensor of shape (N,), (C, N) or (N, C). For 2-D
            arrays the smaller dimension is the channel axis ((C, N) when both are equal).
            Integer arrays (int8/int16/int32) are scaled to [-1, 1); float arrays are taken as is.
        sample_rate: rate of an array / tensor source (required there, > 0). Ignored for files
            and bytes, whose header gives the rate.
        target_rate: output rate in Hz; resampled with soxr quality ``RESAMPLE_QUALITY`` ("HQ").

    Raises:
        AudioError: missing file, directory, undecodable data, empty or non-finite audio, a
            missing or bad sample rate, an array of the wrong shape or dtype.
    """
    _check_rate(target_rate, "target_rate", "load_audio")
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        samples, rate = _read_path(Path(source))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = "audio bytes"
        samples, rate = _decode_bytes(bytes(source), name)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        name = "audio array"
        samples, rate = _from_array(source, sample_rate, name), sample_rate
    else:
        raise AudioError(
            f"unsupported audio source of type {type(source).__name__}; pass a path, bytes, "
            "a numpy array or a torch tensor"
        )
    mono = _to_mono(samples)  # (N,)
    _check_samples(mono, name)
    return torch.from_numpy(_resample(mono, rate, target_rate))


def check_waveform(
    wav: torch.Tensor,
    sample_rate: int,
    *,
    name: str = "audio",
    max_seconds: float | None = None,
    min_seconds: float = 0.0,
) -> None:
    """Raise AudioError if ``wav`` (..., N) is empty, non-finite, silent, too long or too short.

    Silent means a peak absolute amplitude below ``SILENCE_PEAK`` (1e-7), which includes all
    zeros. Durations are ``N / sample_rate`` seconds.
    """
    if wav.numel() == 0:
        raise AudioError(f"{name} is empty (0 samples)")
    if not bool(torch.isfinite(wav).all()):
        raise AudioError(f"{name} contains non-finite samples (NaN or Inf)")
    if float(wav.abs().max()) < SILENCE_PEAK:
        raise AudioError(f"{name} is silent (peak amplitude below {SILENCE_PEAK:g})")
    seconds = audio_duration(wav, sample_rate)
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{name} is {seconds:.1f} s long; the limit is {max_seconds:.1f} s")
    if seconds < min_seconds:
        raise AudioError(f"{name} is {seconds:.3f} s long; at least {min_seconds:g} s is needed")


def audio_duration(wav: torch.Tensor | np.ndarray, sample_rate: int) -> float:
    """Duration in seconds of ``wav`` (..., N) at ``sample_rate``: ``N / sample_rate``."""
    _check_rate(sample_rate, "sample_rate", "audio_duration")
    return wav.shape[-1] / sample_rate


def _check_rate(rate: object, what: str, name: str) -> None:
    """Rates are positive finite numbers (not bools)."""
    ok = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, bool)
    if not ok or not math.isfinite(rate) or rate <= 0:
        raise AudioError(f"{name}: {what} must be a positive number of Hz, got {rate!r}")


def _read_path(path: Path) -> tuple[np.ndarray, int]:
    """Decode a file: (samples (N, C) float32, sample rate)."""
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if path.is_dir():
        raise AudioError(f"{path} is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path} is empty (0 bytes)")
    return _decode(str(path), str(path))


def _decode_bytes(data: bytes, name: str) -> tuple[np.ndarray, int]:
    if not data:
        raise AudioError(f"{name} is empty (0 bytes)")
    return _decode(data, name)


def _decode(data: str | bytes, name: str) -> tuple[np.ndarray, int]:
    """soundfile first, then PyAV if it is installed. ``data``: a path or the file's bytes."""
    try:
        samples, rate = sf.read(_as_file(data), dtype="float32", always_2d=True)
        return samples, rate
    except Exception as err:  # any decoder failure on user data means "cannot decode"
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    if importlib.util.find_spec("av") is not None:
        try:
            return _decode_with_av(_as_file(data))
        except Exception as err:  # PyAV raises its own error types
            reason = f"{reason}; PyAV: {err}"
        expected = f"{_EXPECTED}, or a format FFmpeg reads"
    else:
        expected = f"{_EXPECTED} (install PyAV for other formats)"
    raise AudioError(f"cannot decode {name}: {reason}; expected {expected}")


def _as_file(data: str | bytes) -> str | io.BytesIO:
    return io.BytesIO(data) if isinstance(data, bytes) else data


def _decode_with_av(file: str | io.BytesIO) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with PyAV: (samples (N, C) float32, rate)."""
    import av  # optional dependency, imported only when soundfile failed

    with av.open(file) as container:
        stream = container.streams.audio[0]
        to_planar_float = av.AudioResampler(format="fltp")  # keeps layout and rate
        chunks = []  # (C, n) each
        for frame in container.decode(stream):
            chunks += [f.to_ndarray() for f in to_planar_float.resample(frame)]
        chunks += [f.to_ndarray() for f in to_planar_float.resample(None)]
        rate = stream.rate
    if not chunks:
        return np.zeros((0, 1), np.float32), rate
    return np.concatenate(chunks, axis=1).T.astype(np.float32), rate  # (N, C)


def _from_array(x: np.ndarray | torch.Tensor, sample_rate: object, name: str) -> np.ndarray:
    """Samples of an array / tensor as (N, C) float32."""
    if sample_rate is None:
        raise AudioError(f"{name}: sample_rate is required when passing samples directly")
    _check_rate(sample_rate, "sample_rate", name)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    if x.ndim == 1:
        x = x[:, None]  # (N, 1)
    elif x.ndim == 2:
        x = x.T if x.shape[0] <= x.shape[1] else x  # (N, C): the smaller dim is channels
    else:
        raise AudioError(f"{name} must have shape (N,), (C, N) or (N, C), got {x.shape}")
    return _to_float(x, name)


def _to_float(x: np.ndarray, name: str) -> np.ndarray:
    """int8/16/32 PCM scaled to [-1, 1); float16/32/64 cast to float32."""
    if x.dtype in _INT_SCALE:
        return (x.astype(np.float64) / _INT_SCALE[x.dtype]).astype(np.float32)
    if x.dtype.kind == "f":
        return x.astype(np.float32)
    raise AudioError(f"{name} has unsupported sample type {x.dtype}; use int16, int32 or float")


def _to_mono(samples: np.ndarray) -> np.ndarray:
    """(N, C) -> (N,) contiguous float32, averaging channels."""
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_samples(mono: np.ndarray, name: str) -> None:
    if mono.size == 0:
        raise AudioError(f"{name} is empty (0 samples)")
    if not np.isfinite(mono).all():
        raise AudioError(f"{name} contains non-finite samples (NaN or Inf)")


def _resample(mono: np.ndarray, rate: float, target_rate: float) -> np.ndarray:
    """soxr resampling of (N,) float32 (a no-op when the rates agree)."""
    if rate == target_rate:
        return mono
    return soxr.resample(mono, rate, target_rate, quality=RESAMPLE_QUALITY).astype(
        np.float32, copy=False
    )
