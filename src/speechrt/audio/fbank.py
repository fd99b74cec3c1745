"""Kaldi-compatible log-mel filterbank features in pure torch, batched and device-agnostic.

Scale convention (WeNet): :func:`fbank` takes samples in the *caller's* scale and does not rescale
them. WeNet models were trained on int16-scale input, i.e. ``waveform * (1 << 15)`` of [-1, 1]
audio (``wenet/dataset/processor.py::compute_fbank``); :func:`wenet_fbank` takes [-1, 1] audio and
does that multiplication for you.

The result matches kaldi-native-fbank (``knf.OnlineFbank``), which follows Kaldi's
``compute-fbank-feats``. Per frame of ``window_size`` samples:

1. add ``dither * N(0, 1)`` noise (only if ``dither > 0``),
2. subtract the frame mean (``remove_dc_offset``),
3. raw log energy ``log(max(sum(x^2), FLT_EPSILON))`` (``use_energy`` with ``raw_energy``),
4. pre-emphasis ``x[i] -= c * x[i-1]`` (``x[0] -= c * x[0]``), multiply by the window,
5. zero-pad to ``padded_window_size``, power spectrum ``|rfft|^2`` (``sqrt`` of it when
   ``use_power`` is False),
6. triangular mel filters on the first ``padded_window_size // 2`` bins (Kaldi drops Nyquist),
   ``log(max(x, FLT_EPSILON))``; with ``use_energy`` the log energy is prepended (floored at
   ``log(energy_floor)`` when ``energy_floor > 0``): the feature dimension is then
   ``num_mel_bins + 1``.

Frames either fit inside the signal (``snip_edges=True``) or are centred on multiples of the shift
with the signal mirrored at both of its ends (``snip_edges=False``, Kaldi's reflection
``-1 -> 0``, ``N -> N-1``). Each utterance of a batch is framed on its own valid samples only.

Precision: frames, FFT and energies are float32 like Kaldi; the mel projection runs in float64 so
that it stays exact even where TF32 matmuls are enabled globally.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import torch

from speechrt.errors import AudioError, UnsupportedOptionError

__all__ = [
    "DEFAULT_OPTIONS",
    "WINDOW_TYPES",
    "FbankOptions",
    "fbank",
    "num_frames",
    "wenet_fbank",
]

WINDOW_TYPES = ("povey", "hamming", "hanning", "hann", "sine", "rectangular", "blackman")
_FLT_EPSILON = torch.finfo(torch.float32).eps  # Kaldi's std::numeric_limits<float>::epsilon()
_WAVE_SCALE = float(1 << 15)  # WeNet: waveform * (1 << 15)


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32 (Kaldi's options are C++ floats)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _samples(sample_frequency: float, milliseconds: float) -> int:
    """Samples in ``milliseconds``, truncated as knf does: ``int(samp_freq * 0.001f * ms)``."""
    return int(_f32(_f32(_f32(sample_frequency) * _f32(0.001)) * _f32(milliseconds)))


@dataclass(frozen=True)
class FbankOptions:
    """Kaldi fbank options (names as in torchaudio.compliance.kaldi.fbank; times in ms).

    ``high_freq <= 0`` means ``nyquist + high_freq``. ``frame_length < frame_shift`` is allowed
    (as in Kaldi: samples between frames are skipped). Invalid values raise
    :class:`~speechrt.errors.UnsupportedOptionError`.
    """

    num_mel_bins: int = 80
    frame_length: float = 25.0
    frame_shift: float = 10.0
    dither: float = 0.0
    energy_floor: float = 0.0
    sample_frequency: float = 16000.0
    snip_edges: bool = True
    window_type: str = "povey"
    preemphasis_coefficient: float = 0.97
    remove_dc_offset: bool = True
    round_to_power_of_two: bool = True
    low_freq: float = 20.0
    high_freq: float = 0.0
    use_energy: bool = False
    raw_energy: bool = True
    use_log_fbank: bool = True
    use_power: bool = True
    blackman_coeff: float = 0.42

    def __post_init__(self) -> None:
        _validate_frame_options(self)
        _validate_mel_options(self)
        _mel_matrix_f64(self)  # raises if a mel bin covers no FFT bin

    @property
    def window_size(self) -> int:
        """Samples per frame."""
        return _samples(self.sample_frequency, self.frame_length)

    @property
    def window_shift(self) -> int:
        """Samples between the starts of consecutive frames."""
        return _samples(self.sample_frequency, self.frame_shift)

    @property
    def padded_window_size(self) -> int:
        """FFT length: ``window_size`` rounded up to a power of two if requested."""
        n = self.window_size
        return 1 << (n - 1).bit_length() if self.round_to_power_of_two else n

    @property
    def feature_dim(self) -> int:
        """Features per frame: ``num_mel_bins`` (+1 for the log energy with ``use_energy``)."""
        return self.num_mel_bins + int(self.use_energy)

    @property
    def nyquist(self) -> float:
        return 0.5 * self.sample_frequency

    @property
    def resolved_high_freq(self) -> float:
        return self.high_freq if self.high_freq > 0.0 else self.nyquist + self.high_freq


def _fail(msg: str) -> None:
    raise UnsupportedOptionError(f"FbankOptions: {msg}")


def _validate_frame_options(o: FbankOptions) -> None:
    if o.window_type not in WINDOW_TYPES:
        _fail(f"window_type {o.window_type!r} is not one of {', '.join(WINDOW_TYPES)}")
    if not o.sample_frequency > 0:
        _fail(f"sample_frequency must be > 0, got {o.sample_frequency}")
    if o.window_size < 2:
        _fail(f"frame_length {o.frame_length} ms is under 2 samples at {o.sample_frequency} Hz")
    if o.window_shift < 1:
        _fail(f"frame_shift {o.frame_shift} ms is under 1 sample at {o.sample_frequency} Hz")
    if o.padded_window_size % 2:
        _fail(f"the FFT length {o.padded_window_size} must be even (round_to_power_of_two=False)")
    if not 0.0 <= o.preemphasis_coefficient <= 1.0:
        _fail(f"preemphasis_coefficient must be in [0, 1], got {o.preemphasis_coefficient}")
    if not o.dither >= 0.0:
        _fail(f"dither must be >= 0, got {o.dither}")
    if not o.energy_floor >= 0.0:
        _fail(f"energy_floor must be >= 0, got {o.energy_floor}")


def _validate_mel_options(o: FbankOptions) -> None:
    if o.num_mel_bins < 3:
        _fail(f"num_mel_bins must be >= 3 (as in Kaldi), got {o.num_mel_bins}")
    low, high, nyq = o.low_freq, o.resolved_high_freq, o.nyquist
    if not (0.0 <= low < nyq and 0.0 < high <= nyq and low < high):
        _fail(
            f"need 0 <= low_freq < high_freq <= nyquist; got low_freq {low}, "
            f"high_freq {high} (from {o.high_freq}), nyquist {nyq}"
        )


def num_frames(num_samples: int | torch.Tensor, opts: FbankOptions) -> int | torch.Tensor:
    """Frames Kaldi produces from ``num_samples`` samples (int, or an int tensor of any shape).

    ``snip_edges=True``: ``1 + (N - window_size) // window_shift`` (0 if ``N < window_size``);
    ``snip_edges=False``: ``(N + window_shift // 2) // window_shift``.
    """
    shift = opts.window_shift
    if opts.snip_edges:
        n = (num_samples - opts.window_size) // shift + 1
    else:
        n = (num_samples + shift // 2) // shift
    return n.clamp(min=0) if isinstance(n, torch.Tensor) else max(0, n)


def _window_f64(opts: FbankOptions) -> torch.Tensor:
    """Kaldi's window function, shape (window_size,), float64 on CPU."""
    n = opts.window_size
    i = torch.arange(n, dtype=torch.float64)
    a = 2 * math.pi / (n if opts.window_type == "hann" else n - 1)
    kind = opts.window_type
    if kind == "povey":
        return (0.5 - 0.5 * torch.cos(a * i)).pow(0.85)
    if kind in ("hanning", "hann"):
        return 0.5 - 0.5 * torch.cos(a * i)
    if kind == "hamming":
        return 0.54 - 0.46 * torch.cos(a * i)
    if kind == "sine":
        return torch.sin(0.5 * a * i)
    if kind == "blackman":
        c = opts.blackman_coeff
        return c - 0.5 * torch.cos(a * i) + (0.5 - c) * torch.cos(2 * a * i)
    return torch.ones(n, dtype=torch.float64)  # rectangular


def _mel_scale(freq: torch.Tensor | float) -> torch.Tensor | float:
    """HTK mel scale: ``1127 * ln(1 + f / 700)``."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


@functools.lru_cache(maxsize=32)
def _mel_matrix_f64(opts: FbankOptions) -> torch.Tensor:
    """Kaldi's triangular mel filters (padded_window_size // 2, num_mel_bins), float64 on CPU."""
    num_fft_bins = opts.padded_window_size // 2
    bin_width = opts.sample_frequency / opts.padded_window_size
    mel_low = _mel_scale(opts.low_freq)
    delta = (_mel_scale(opts.resolved_high_freq) - mel_low) / (opts.num_mel_bins + 1)
    edges = mel_low + delta * torch.arange(opts.num_mel_bins + 2, dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1)
    mel = _mel_scale(bin_width * torch.arange(num_fft_bins, dtype=torch.float64))[None]  # (1, K)
    rising = (mel - left) / (center - left)
    falling = (right - mel) / (right - center)
    weights = torch.where(mel <= center, rising, falling)
    weights = torch.where((mel > left) & (mel < right), weights, 0.0)  # (M, K)
    empty = (weights.sum(1) == 0).nonzero().flatten()
    if empty.numel():
        _fail(
            f"mel bin {int(empty[0])} covers no FFT bin: num_mel_bins {opts.num_mel_bins} is too "
            f"large for a {opts.padded_window_size}-point FFT"
        )
    return weights.T.contiguous()  # (K, M)


_DEVICE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(
    opts: FbankOptions, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(window (W,) in ``dtype``, mel matrix (K, M) float64) on ``device``, cached.

    Both are computed once in float64 on the CPU and copied, so every device uses identical values.
    """
    key = (opts, device, dtype)
    if key not in _DEVICE_CACHE:
        if len(_DEVICE_CACHE) >= 32:
            _DEVICE_CACHE.clear()
        window = _window_f64(opts).to(device=device, dtype=dtype)
        _DEVICE_CACHE[key] = (window, _mel_matrix_f64(opts).to(device))
    return _DEVICE_CACHE[key]


def _as_batch(
    waveforms: torch.Tensor, lengths: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes; return (B, N) float32 waveforms and (B,) int64 lengths on their device."""
    if waveforms.dim() not in (1, 2) or waveforms.is_complex():
        shape = tuple(waveforms.shape)
        raise AudioError(f"fbank expects real waveforms (N,) or (B, N), got shape {shape}")
    wav = waveforms.reshape(1, -1) if waveforms.dim() == 1 else waveforms  # (B, N)
    wav = wav.to(torch.float32)
    batch, n = wav.shape
    if lengths is None:
        return wav, torch.full((batch,), n, dtype=torch.int64, device=wav.device)
    lengths = torch.as_tensor(lengths, device=wav.device).to(torch.int64).reshape(-1)
    if lengths.numel() != batch:
        raise AudioError(f"fbank got {lengths.numel()} lengths for {batch} waveforms")
    if batch and bool(((lengths < 0) | (lengths > n)).any()):
        raise AudioError(f"fbank lengths must lie in [0, {n}], got {lengths.tolist()}")
    return wav, lengths


def _extract_frames(
    wav: torch.Tensor, lengths: torch.Tensor, t_max: int, opts: FbankOptions
) -> torch.Tensor:
    """Frames (B, t_max, window_size) of each row, mirrored at that row's own ends.

    Sample positions are mapped into ``[0, length)`` by Kaldi's reflection (period ``2 * length``),
    so padding beyond ``length`` never enters a frame.
    """
    size, shift = opts.window_size, opts.window_shift
    first = 0 if opts.snip_edges else shift // 2 - size // 2  # start of frame 0
    span = (t_max - 1) * shift + size
    pos = first + torch.arange(span, device=wav.device)  # (S,)
    period = 2 * lengths.clamp(min=1)[:, None]  # (B, 1)
    idx = torch.remainder(pos[None, :], period)  # (B, S)
    idx = torch.where(idx >= period // 2, period - 1 - idx, idx)
    ext = torch.gather(wav, 1, idx)  # (B, S)
    return ext.unfold(1, size, shift)  # (B, T, W)


def _log_energy(frames: torch.Tensor) -> torch.Tensor:
    """``log(max(sum(x^2), FLT_EPSILON))`` over the last dim: (B, T, W) -> (B, T)."""
    return frames.square().sum(-1).clamp(min=_FLT_EPSILON).log()


def _preemphasize(frames: torch.Tensor, coeff: float) -> torch.Tensor:
    """Kaldi pre-emphasis per frame: ``y[i] = x[i] - c*x[i-1]``, ``y[0] = x[0] - c*x[0]``."""
    if coeff == 0.0:
        return frames
    first = frames[..., :1] - coeff * frames[..., :1]
    return torch.cat([first, frames[..., 1:] - coeff * frames[..., :-1]], dim=-1)


def _frames_to_features(
    frames: torch.Tensor, opts: FbankOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """Kaldi's per-frame pipeline (see module docstring): (B, T, W) -> (B, T, feature_dim)."""
    window, mel = _constants(opts, frames.device, frames.dtype)
    if opts.dither > 0.0:
        noise = torch.randn(
            frames.shape, generator=generator, device=frames.device, dtype=frames.dtype
        )
        frames = frames + opts.dither * noise
    if opts.remove_dc_offset:
        frames = frames - frames.mean(dim=-1, keepdim=True)
    energy = _log_energy(frames) if opts.use_energy and opts.raw_energy else None
    frames = _preemphasize(frames, opts.preemphasis_coefficient) * window
    if opts.use_energy and not opts.raw_energy:
        energy = _log_energy(frames)
    spec = torch.view_as_real(torch.fft.rfft(frames, n=opts.padded_window_size))  # (B, T, F, 2)
    power = spec.square().sum(-1)  # (B, T, F)
    if not opts.use_power:
        power = power.sqrt()
    feats = (power[..., : mel.shape[0]].double() @ mel).float()  # (B, T, M)
    if opts.use_log_fbank:
        feats = feats.clamp(min=_FLT_EPSILON).log()
    if energy is None:
        return feats
    if opts.energy_floor > 0.0:
        energy = energy.clamp(min=math.log(opts.energy_floor))
    return torch.cat([energy[..., None], feats], dim=-1)  # (B, T, 1 + M)


DEFAULT_OPTIONS = FbankOptions()


def fbank(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    opts: FbankOptions = DEFAULT_OPTIONS,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaldi log-mel filterbank of a padded batch.

    Args:
        waveforms: (B, N) or (N,) samples in the caller's scale; nothing is rescaled here. WeNet
            models expect int16 scale, ``waveform * (1 << 15)`` of [-1, 1] audio (see
            :func:`wenet_fbank`). (N,) is a batch of one. Any real dtype; computed in float32.
        lengths: (B,) valid samples per row (None: all N). Samples beyond a row's length never
            influence its frames.
        opts: feature options.
        generator: random generator for dither (unused when ``opts.dither == 0``), on the
            waveforms' device.

    Returns:
        feats: (B, T_max, feature_dim) float32 on the waveforms' device, zero beyond each row's
            frame count; ``feature_dim = num_mel_bins (+1 with use_energy)``.
        frame_counts: (B,) int64, ``num_frames(lengths, opts)``.
    """
    wav, lengths = _as_batch(waveforms, lengths)
    counts = num_frames(lengths, opts)  # (B,)
    t_max = int(counts.max()) if counts.numel() else 0  # the one host sync
    if t_max == 0:
        empty = wav.new_zeros(wav.shape[0], 0, opts.feature_dim)
        return empty, counts
    frames = _extract_frames(wav, lengths, t_max, opts)  # (B, T, W)
    feats = _frames_to_features(frames, opts, generator)  # (B, T, D)
    valid = torch.arange(t_max, device=wav.device)[None, :] < counts[:, None]  # (B, T)
    return torch.where(valid[..., None], feats, 0.0), counts


def wenet_fbank(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    num_mel_bins: int = 80,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    dither: float = 0.0,
    sample_frequency: float = 16000.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WeNet's ``compute_fbank``: takes [-1, 1] audio and feeds ``waveforms * (1 << 15)`` to fbank.

    Options as WeNet: povey window, energy_floor 0.0, snip_edges, no energy. Shapes as
    :func:`fbank`: (B, N) or (N,) in -> ((B, T_max, num_mel_bins) float32, (B,) int64).
    """
    opts = FbankOptions(
        num_mel_bins=num_mel_bins,
        frame_length=frame_length,
        frame_shift=frame_shift,
        dither=dither,
        energy_floor=0.0,
        sample_frequency=sample_frequency,
        window_type="povey",
    )
    return fbank(waveforms.to(torch.float32) * _WAVE_SCALE, lengths, opts, generator)
