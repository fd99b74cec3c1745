"""Batched long-form transcription against one-by-one transcription (itself checked against
openai-whisper in test_transcribe.py): same tokens, segments, timestamps and words."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.results import Transcript


def _same(batched: Transcript, alone: Transcript) -> None:
    """Equal up to the last float bits of log-probs (batched GEMMs sum in another order)."""
    assert (batched.text, batched.tokens, batched.language) == (
        alone.text,
        alone.tokens,
        alone.language,
    )
    assert math.isclose(batched.score, alone.score, rel_tol=1e-5, abs_tol=1e-5)
    assert len(batched.segments) == len(alone.segments)
    for b, a in zip(batched.segments, alone.segments):
        assert (b.id, b.seek, b.start, b.end, b.text, b.tokens) == (
            a.id,
            a.seek,
            a.start,
            a.end,
            a.text,
            a.tokens,
        )
        assert b.compression_ratio == a.compression_ratio
        assert math.isclose(b.avg_logprob, a.avg_logprob, rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(b.no_speech_prob, a.no_speech_prob, rel_tol=1e-4, abs_tol=1e-9)
        assert [(w.word, w.start, w.end) for w in b.words] == [
            (w.word, w.start, w.end) for w in a.words
        ]


@pytest.fixture(scope="module")
def audios(long_audio, jfk):
    return [long_audio, jfk, jfk[16000:64000]]


OPTIONS = [
    {"temperature": 0.0},
    {"temperature": 0.0, "condition_on_previous_text": False},
    {"temperature": 0.0, "without_timestamps": True},
    {"temperature": 0.0, "beam_size": 2},
    {"temperature": 0.0, "word_timestamps": True},
    # some windows fall back (deterministically, at T=0 again) and are re-decoded as a batch
    {"temperature": (0.0, 0.0), "logprob_threshold": -0.21, "beam_size": 2},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_batched_matches_one_by_one(model, audios, options):
    alone = [model.transcribe(a, **options) for a in audios]
    batched = model.transcribe(audios, batch_size=8, **options)
    assert len(batched) == len(alone)
    for b, a in zip(batched, alone):
        _same(b, a)


def test_windows_of_several_files_share_decode_calls(model, audios, monkeypatch):
    sizes = []
    decode_features = model.decode_features

    def counting(features, options, prompts=None):
        sizes.append(features.shape[0])
        return decode_features(features, options, prompts)

    monkeypatch.setattr(model, "decode_features", counting)
    options = {"temperature": 0.0, "condition_on_previous_text": False, "language": "en"}
    batched = model.transcribe(audios + audios[1:], batch_size=2, **options)
    assert max(sizes) == 2 and len(batched) == 5
    monkeypatch.undo()
    for b, audio in zip(batched, audios + audios[1:]):
        _same(b, model.transcribe(audio, **options))


def test_batch_size_errors_and_sequential_path(model, jfk):
    with pytest.raises(UnsupportedOptionError, match="batch_size"):
        model.transcribe([jfk], batch_size=0)
    one = model.transcribe(jfk, temperature=0.0)
    assert model.transcribe([jfk, jfk], batch_size=1, temperature=0.0) == [one, one]
    assert model.transcribe([], batch_size=4) == []


def test_per_window_prompts_match_one_prompt_each(model, long_audio, jfk):
    from speechrt.audio.log_mel import N_FRAMES, N_SAMPLES
    from speechrt.decoding.whisper import WhisperDecodeOptions

    mels = [model.log_mel(a, padding=N_SAMPLES)[:, :N_FRAMES] for a in (long_audio, jfk)]
    features = model.embed_audio(torch.stack(mels))  # (2, S, D)
    prompts = [[1000, 2000, 3000], [4000, 5000, 6000]]
    options = WhisperDecodeOptions(language="en", prompt=prompts[0])
    batched = model.decode_features(features, options, prompts)
    for k, prompt in enumerate(prompts):
        alone = model.decode_features(features[k : k + 1], replace(options, prompt=prompt))[0]
        assert batched[k].tokens == alone.tokens
        assert math.isclose(batched[k].sum_logprob, alone.sum_logprob, rel_tol=1e-5)
    assert batched[0].tokens != batched[1].tokens
    with pytest.raises(ValueError, match="one prompt per window"):
        model.decode_features(features, options, [[1000], [2000]])
