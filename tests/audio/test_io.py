"""speechrt.audio.io: decoding, mixing, resampling (checked against soxr directly), errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from speechrt.audio.io import audio_duration, check_waveform, load_audio
from speechrt.errors import AudioError

RATES = [8000, 22050, 44100, 48000]
TONE_HZ = 1000.0
LOSSLESS = {"wav16": ("WAV", "PCM_16"), "wav_float": ("WAV", "FLOAT"), "flac": ("FLAC", "PCM_24")}
LOSSY = {"ogg": ("OGG", "VORBIS"), "mp3": ("MP3", "MPEG_LAYER_III")}
HAS_MP3 = "MP3" in sf.available_formats()


def tone(rate: int, seconds: float = 0.5, hz: float = TONE_HZ, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def write(tmp_path, name: str, data: np.ndarray, rate: int, fmt: str, subtype: str):
    path = tmp_path / f"{name}.{fmt.lower()}"
    sf.write(path, data, rate, format=fmt, subtype=subtype)
    return path


def expected_from_file(path, target: int = 16000) -> np.ndarray:
    """Independent oracle: soundfile decode, channel mean, soxr 'HQ'."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1, dtype=np.float32)
    return mono if rate == target else soxr.resample(mono, rate, target, quality="HQ")


def peak_hz(wav: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav.numpy() * np.hanning(len(wav))))
    return spectrum.argmax() * rate / len(wav)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("fmt", list(LOSSLESS))
def test_lossless_files_resampled_like_soxr(tmp_path, fmt, rate):
    path = write(tmp_path, "tone", tone(rate), rate, *LOSSLESS[fmt])
    wav = load_audio(path)
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert abs(len(wav) - round(len(tone(rate)) * 16000 / rate)) <= 1
    torch.testing.assert_close(wav, torch.from_numpy(expected_from_file(path)), atol=1e-6, rtol=0)
    assert abs(peak_hz(wav, 16000) - TONE_HZ) <= 2.0


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
@pytest.mark.parametrize("fmt", list(LOSSY))
def test_lossy_files_decode_to_the_tone(tmp_path, fmt, rate):
    if fmt == "mp3" and not HAS_MP3:
        pytest.skip("this libsndfile cannot write MP3")
    path = write(tmp_path, "tone", tone(rate), rate, *LOSSY[fmt])
    wav = load_audio(path)
    assert abs(len(wav) - 8000) <= 0.01 * 8000  # 0.5 s, codec padding aside
    assert abs(peak_hz(wav, 16000) - TONE_HZ) <= 2.0
    assert 0.4 < float(wav.abs().max()) < 0.6
    torch.testing.assert_close(wav, torch.from_numpy(expected_from_file(path)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rate", [16000, 44100])
def test_stereo_is_averaged(tmp_path, rate):
    left, right = tone(rate, hz=500.0), tone(rate, hz=3000.0, amp=0.25)
    path = write(tmp_path, "stereo", np.stack([left, right], axis=1), rate, "WAV", "FLOAT")
    wav = load_audio(path)
    mono = (left + right) / 2
    expected = mono if rate == 16000 else soxr.resample(mono, rate, 16000, quality="HQ")
    torch.testing.assert_close(wav, torch.from_numpy(expected), atol=1e-6, rtol=0)


def test_int16_wav_is_scaled_exactly(tmp_path):
    pcm = (tone(16000) * 32767).astype(np.int16)
    path = tmp_path / "int16.wav"
    sf.write(path, pcm, 16000, subtype="PCM_16")
    wav = load_audio(path)
    assert torch.equal(wav, torch.from_numpy(pcm.astype(np.float32) / 32768))


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_bytes_equal_path(tmp_path, kind):
    path = write(tmp_path, "tone", tone(22050), 22050, "FLAC", "PCM_16")
    assert torch.equal(load_audio(kind(path.read_bytes())), load_audio(path))


def test_target_rate(tmp_path):
    path = write(tmp_path, "tone", tone(48000), 48000, "WAV", "PCM_16")
    wav = load_audio(str(path), target_rate=8000)
    assert len(wav) == 4000
    assert abs(peak_hz(wav, 8000) - TONE_HZ) <= 2.0


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [(np.int16, 2.0**15), (np.int32, 2.0**31), (np.float64, 1.0), (np.float32, 1.0)],
    ids=["int16", "int32", "float64", "float32"],
)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_arrays_are_scaled(dtype, scale, as_tensor):
    x = (tone(16000).astype(np.float64) * scale * 0.9).astype(dtype)
    wav = load_audio(torch.from_numpy(x) if as_tensor else x, sample_rate=16000)
    torch.testing.assert_close(wav, torch.from_numpy((x / scale).astype(np.float32)))


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_two_dim_arrays_use_the_smaller_dim_as_channels(layout):
    left, right = tone(22050, hz=500.0), tone(22050, hz=2000.0)
    x = np.stack([left, right]) if layout == "channels_first" else np.stack([left, right], axis=1)
    wav = load_audio(torch.from_numpy(x), sample_rate=22050)
    expected = soxr.resample((left + right) / 2, 22050, 16000, quality="HQ")
    torch.testing.assert_close(wav, torch.from_numpy(expected), atol=1e-6, rtol=0)


def test_real_stereo_flac_matches_soxr(shared):
    path = shared / "assets" / "whisper_assets" / "jfk.flac"
    wav = load_audio(path)
    torch.testing.assert_close(wav, torch.from_numpy(expected_from_file(path)), atol=1e-6, rtol=0)
    assert abs(audio_duration(wav, 16000) - 11.0) < 0.01


# ---- errors --------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="audio file not found: .*missing.wav"):
        load_audio(tmp_path / "missing.wav")


def test_directory(tmp_path):
    with pytest.raises(AudioError, match=re.escape(f"{tmp_path} is a directory")):
        load_audio(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("garbage.wav", b"RIFF" + b"\x13" * 300, "cannot decode .*garbage.wav.*expected WAV, FLAC"),
        ("text.mp3", b"this is not audio\n" * 40, "cannot decode .*text.mp3.*expected WAV, FLAC"),
        ("empty.flac", b"", "empty.flac is empty \\(0 bytes\\)"),
    ],
)
def test_undecodable_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AudioError, match=message):
        load_audio(path)


def test_truncated_flac_names_the_file(tmp_path):
    path = write(tmp_path, "cut", tone(16000, seconds=2.0), 16000, "FLAC", "PCM_16")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(AudioError, match="cut.flac"):
        load_audio(path)


def test_file_without_samples(tmp_path):
    path = write(tmp_path, "nothing", np.zeros(0, np.float32), 16000, "WAV", "PCM_16")
    with pytest.raises(AudioError, match="nothing.wav is empty \\(0 samples\\)"):
        load_audio(path)


def test_non_finite_file(tmp_path):
    x = tone(16000)
    x[100] = np.nan
    path = write(tmp_path, "nan", x, 16000, "WAV", "FLOAT")
    with pytest.raises(AudioError, match="nan.wav contains non-finite samples"):
        load_audio(path)


@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        (np.zeros(100, np.float32), {}, "sample_rate is required"),
        (np.ones(100, np.float32), dict(sample_rate=0), "sample_rate must be a positive"),
        (np.ones(100, np.float32), dict(sample_rate=-8000), "sample_rate must be a positive"),
        (np.ones(100, np.float32), dict(sample_rate=16000, target_rate=0), "target_rate"),
        (np.ones((2, 3, 100), np.float32), dict(sample_rate=16000), "must have shape"),
        (np.ones(100, bool), dict(sample_rate=16000), "unsupported sample type bool"),
        (np.zeros(0, np.float32), dict(sample_rate=16000), "audio array is empty"),
        (torch.tensor([0.1, float("inf")]), dict(sample_rate=16000), "non-finite"),
        (b"", {}, "audio bytes is empty"),
        (b"not audio at all" * 20, {}, "cannot decode audio bytes"),
        ([0.1, 0.2], dict(sample_rate=16000), "unsupported audio source of type list"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_sources(source, kwargs, message):
    with pytest.raises(AudioError, match=message):
        load_audio(source, **kwargs)


def test_pyav_fallback_decodes_aac(tmp_path):
    """Runs only where the optional PyAV is installed: AAC is beyond libsndfile."""
    av = pytest.importorskip("av")
    rate, x = 44100, tone(44100, seconds=1.0)
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        frame = av.AudioFrame.from_ndarray(x[None], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    wav = load_audio(path)
    assert abs(len(wav) - 16000) < 2048 and abs(peak_hz(wav, 16000) - TONE_HZ) <= 2.0


# ---- check_waveform / audio_duration ---------------------------------------------------------


@pytest.mark.parametrize(
    ("wav", "rate", "kwargs", "message"),
    [
        (torch.zeros(0), 16000, {}, "clip.wav is empty"),
        (torch.zeros(16000), 16000, {}, "clip.wav is silent"),
        (torch.full((16000,), 5e-8), 16000, {}, "clip.wav is silent"),
        (torch.tensor([0.1, float("nan")]), 16000, {}, "clip.wav contains non-finite"),
        (torch.ones(37234), 10, dict(max_seconds=200.0), "3723.4 s long; the limit is 200.0 s"),
        (torch.ones(1), 10, dict(min_seconds=0.5), "0.100 s long; at least 0.5 s is needed"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_check_waveform_rejects(wav, rate, kwargs, message):
    with pytest.raises(AudioError, match=message):
        check_waveform(wav, rate, name="clip.wav", **kwargs)


def test_check_waveform_accepts_and_duration():
    wav = torch.full((2, 16000), 1e-6)
    check_waveform(wav, 16000, max_seconds=1.0, min_seconds=1.0)
    assert audio_duration(wav, 16000) == 1.0
    assert audio_duration(np.zeros(12000), 8000) == 1.5
    with pytest.raises(AudioError, match="sample_rate must be a positive"):
        audio_duration(wav, 0)
