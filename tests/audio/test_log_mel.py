"""speechrt.audio.log_mel against openai-whisper's log_mel_spectrogram on real audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechrt.audio.log_mel import N_SAMPLES, log_mel_spectrogram, mel_filters, num_frames
from speechrt.errors import AudioError

whisper_audio = pytest.importorskip("whisper.audio")


@pytest.fixture(scope="module")
def jfk(shared) -> torch.Tensor:
    from speechrt.audio.io import load_audio

    return load_audio(shared / "assets" / "whisper_assets" / "jfk.flac")


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("padding", [0, 123, N_SAMPLES])
def test_matches_openai_whisper(jfk, n_mels, padding):
    ref = whisper_audio.log_mel_spectrogram(jfk, n_mels, padding=padding)
    ours = log_mel_spectrogram(jfk.numpy(), n_mels, padding=padding)
    assert ours.shape == ref.shape == (n_mels, num_frames(jfk.shape[0], padding))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_filters_are_the_shipped_ones():
    for n_mels in (80, 128):
        torch.testing.assert_close(mel_filters(n_mels), whisper_audio.mel_filters("cpu", n_mels))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_batch_rows_equal_single_utterances(jfk, n_mels):
    """Ragged batch: each row equals its utterance alone (own max - 8 floor, own edges)."""
    loud, quiet, short = jfk, 0.01 * jfk[16000:90000], jfk[5000:5423]
    batch = torch.zeros(3, loud.shape[0])
    for i, x in enumerate((loud, quiet, short)):
        batch[i, : x.shape[0]] = x
    lengths = [loud.shape[0], quiet.shape[0], short.shape[0]]
    mel = log_mel_spectrogram(batch, n_mels, padding=1000, lengths=lengths)
    assert mel.shape == (3, n_mels, num_frames(loud.shape[0], 1000))
    for i, x in enumerate((loud, quiet, short)):
        ref = whisper_audio.log_mel_spectrogram(x, n_mels, padding=1000)
        frames = ref.shape[-1]
        torch.testing.assert_close(mel[i, :, :frames], ref, atol=1e-4, rtol=0)
        assert not mel[i, :, frames:].any()


def test_clamp_is_per_utterance_not_per_batch(jfk):
    """A quiet row next to a loud one keeps its own dynamic range."""
    quiet = 1e-3 * jfk
    mel = log_mel_spectrogram(torch.stack([jfk, quiet]))
    alone = log_mel_spectrogram(quiet)
    torch.testing.assert_close(mel[1], alone)
    batch_floor = mel[0].max() - 2.0  # (max - 8 + 4) / 4 with the loud row's max
    assert alone.min() < batch_floor - 0.5  # a batch-wide floor would have changed this row


def test_device_and_numpy_input(jfk):
    out = log_mel_spectrogram(jfk.numpy().astype(np.float64), device="cpu")
    assert out.dtype == torch.float32 and out.device.type == "cpu"


@pytest.mark.parametrize(
    "audio, kwargs, match",
    [
        (np.zeros(0, np.float32), {}, "empty"),
        (np.zeros((2, 3, 400), np.float32), {}, "shape"),
        (np.zeros(1600, np.float32), {"n_mels": 40}, "n_mels"),
        (np.zeros((2, 1600), np.float32), {"lengths": [1600]}, "lengths"),
    ],
)
def test_errors(audio, kwargs, match):
    with pytest.raises(AudioError, match=match):
        log_mel_spectrogram(audio, **kwargs)


@pytest.mark.gpu
def test_cuda_matches_cpu(jfk):
    cpu = log_mel_spectrogram(jfk, 128, padding=N_SAMPLES)
    gpu = log_mel_spectrogram(jfk, 128, padding=N_SAMPLES, device="cuda")
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
