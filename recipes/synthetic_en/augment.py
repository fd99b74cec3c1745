"""Audio for the synthetic corpus: resampling, augmentation (gain, reverb, noise, band limit) and
16-bit WAV I/O, in numpy and torch alone (no sox, soxr or soundfile: the training machine lacks
them).

Every random choice takes a ``numpy.random.Generator`` so an utterance is reproducible from its
own seed, whichever worker makes it.
"""

from __future__ import annotations

import functools
import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@functools.lru_cache(maxsize=8)
def _polyphase_matrix(up: int, down: int, zeros: int = 16, beta: float = 8.6) -> np.ndarray:
    """Kaiser-windowed sinc weights (up, K) for resampling by up/down, one row per output phase.

    Output ``k*up + j`` lies at input time ``k*down + j*down/up``; row j holds the taps applied to
    input samples ``k*down + t - (width - 1)``, t = 0..K-1. Each row sums to 1 (unit DC gain).
    """
    cutoff = 0.95 * min(1.0, up / down)  # fraction of the input Nyquist kept
    width = math.ceil(zeros / cutoff)
    j = np.arange(up)
    base = (j * down) // up  # (up,) input sample at or before each phase's time
    frac = (j * down % up) / up  # (up,) fractional part of that time
    taps = np.arange(-width + 1, width + 1, dtype=np.float64)  # (2W,)
    t = taps[None, :] - frac[:, None]  # (up, 2W) tap position relative to the output time
    window = np.interp(t, np.arange(-width, width + 1), np.kaiser(2 * width + 1, beta))
    rows = np.sinc(cutoff * t) * window
    rows /= rows.sum(axis=1, keepdims=True)
    mat = np.zeros((up, int(base[-1]) + 2 * width), dtype=np.float32)
    for i in range(up):
        mat[i, base[i] : base[i] + 2 * width] = rows[i]
    return mat


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Band-limited resampling (Kaiser-windowed sinc, polyphase): (N,) -> (ceil(N*new/orig),).

    Runs as one torch matmul (float32) so that it obeys ``torch.set_num_threads`` in workers.
    """
    if orig == new:
        return x.astype(np.float32)
    g = math.gcd(orig, new)
    up, down = new // g, orig // g
    mat = torch.from_numpy(_polyphase_matrix(up, down))  # (up, K)
    k = mat.shape[1]
    width = (k - (up - 1) * down // up) // 2
    n_out = -(-len(x) * up // down)
    blocks = -(-n_out // up)
    padded = torch.zeros((blocks - 1) * down + k)
    n = min(len(x), len(padded) - (width - 1))
    padded[width - 1 : width - 1 + n] = torch.from_numpy(np.asarray(x[:n], dtype=np.float32))
    frames = padded.as_strided((blocks, k), (down, 1))  # (blocks, K) overlapping input windows
    return (frames @ mat.T).reshape(-1)[:n_out].numpy()  # (blocks * up,) -> (n_out,)


def synthetic_rir(rng: np.random.Generator, sample_rate: int, rt60: float) -> np.ndarray:
    """A room impulse response: direct path, then exponentially decaying noise (reflections)."""
    n = int(min(rt60, 0.6) * sample_rate)
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)  # -60 dB at rt60
    predelay = int(rng.uniform(0.002, 0.01) * sample_rate)
    tail[:predelay] = 0.0
    drr = 10 ** (rng.uniform(-3, 12) / 20)  # direct-to-reverberant amplitude ratio
    tail *= 1.0 / (np.sqrt(np.sum(tail**2)) * drr + 1e-9)
    tail[0] = 1.0
    return tail


def _fft_size(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Linear convolution truncated to len(x)."""
    size = _fft_size(len(x) + len(h) - 1)
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)
    return y[: len(x)]


def colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Unit-power noise (n,) with power spectrum ~ 1/f^exponent (0 white, 1 pink, 2 brown)."""
    size = _fft_size(n)
    spec = np.fft.rfft(rng.standard_normal(size))
    f = np.maximum(np.fft.rfftfreq(size), 1.0 / size)
    y = np.fft.irfft(spec / f ** (exponent / 2), size)[:n]
    return y / (np.sqrt(np.mean(y**2)) + 1e-12)


def low_pass(x: np.ndarray, sample_rate: int, cutoff_hz: float) -> np.ndarray:
    """Brick-wall low-pass in the frequency domain (telephone-like band limit)."""
    size = _fft_size(len(x))
    spec = np.fft.rfft(x, size)
    spec[np.fft.rfftfreq(size, 1.0 / sample_rate) > cutoff_hz] = 0.0
    return np.fft.irfft(spec, size)[: len(x)]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the corruptions (WeNet-like recipes use similar ones)."""

    p_reverb: float = 0.35
    rt60: tuple[float, float] = (0.15, 0.8)
    p_noise: float = 0.6
    snr_db: tuple[float, float] = (3.0, 35.0)
    p_low_pass: float = 0.1
    low_pass_hz: tuple[float, float] = (3000.0, 6500.0)
    peak: tuple[float, float] = (0.03, 0.95)  # peak level after gain
    pad_s: tuple[float, float] = (0.0, 0.35)  # silence added at each end
    floor: float = 1.0 / 32768  # always-on noise floor (like WeNet's dither at int16 scale)


def augment(x: np.ndarray, sample_rate: int, rng: np.random.Generator,
            cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Pad, reverberate, band-limit, add noise and set the gain of one utterance; (N,) float."""
    pads = (rng.uniform(*cfg.pad_s, size=2) * sample_rate).astype(int)
    x = np.concatenate([np.zeros(pads[0]), x.astype(np.float64), np.zeros(pads[1])])
    if rng.random() < cfg.p_reverb:
        x = fft_convolve(x, synthetic_rir(rng, sample_rate, rng.uniform(*cfg.rt60)))
    if rng.random() < cfg.p_low_pass:
        x = low_pass(x, sample_rate, rng.uniform(*cfg.low_pass_hz))
    power = np.mean(x**2) + 1e-12
    if rng.random() < cfg.p_noise:
        snr = rng.uniform(*cfg.snr_db)
        noise = colored_noise(rng, len(x), rng.choice([0.0, 1.0, 2.0]))
        x = x + noise * np.sqrt(power / 10 ** (snr / 10))
    x = x * (rng.uniform(*cfg.peak) / (np.max(np.abs(x)) + 1e-9))
    x = x + cfg.floor * rng.standard_normal(len(x))
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def write_wav(path: str | Path, x: np.ndarray, sample_rate: int) -> None:
    """Float [-1, 1] (N,) -> 16-bit mono PCM WAV."""
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """16-bit mono PCM WAV -> (float32 (N,) in [-1, 1], sample rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono PCM")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return pcm.astype(np.float32) / 32768.0, w.getframerate()
