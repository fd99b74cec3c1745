"""WhisperDims validation and presets."""

from __future__ import annotations

import dataclasses

import pytest

from speechrt.errors import ModelFormatError
from speechrt.models.whisper.config import PRESETS, WhisperDims, preset

whisper_model = pytest.importorskip("whisper.model")
from .conftest import DIMS  # noqa: E402


def test_presets_by_exact_name():
    large = preset("large-v3")
    assert (large.n_mels, large.n_vocab, large.n_text_layer) == (128, 51866, 32)
    assert preset("large-v3-turbo").n_text_layer == 4
    assert preset("tiny").num_languages == 99 and large.num_languages == 100
    assert not preset("base.en").is_multilingual
    for name in ("tiny", "base", "small", "medium", "large-v2", "large-v3", "large-v3-turbo"):
        assert name in PRESETS
    with pytest.raises(ModelFormatError, match="Tiny"):
        preset("Tiny")


def test_frozen_and_matches_openai_names():
    dims = WhisperDims(**DIMS)
    assert dims.to_dict() == dataclasses.asdict(whisper_model.ModelDimensions(**DIMS))
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.n_mels = 128


@pytest.mark.parametrize(
    "change, match",
    [
        ({"n_audio_head": 3}, "divisible"),
        ({"n_text_head": 5}, "divisible"),
        ({"n_vocab": 50000}, "n_vocab"),
        ({"n_text_layer": 0}, "n_text_layer"),
        ({"n_mels": 80.0}, "n_mels"),
        ({"n_audio_state": 5, "n_audio_head": 5}, "even"),
    ],
)
def test_validation(change, match):
    with pytest.raises(ModelFormatError, match=match):
        WhisperDims(**{**DIMS, **change})
