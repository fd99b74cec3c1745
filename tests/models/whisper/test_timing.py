"""Word timestamps: DTW and median filter against openai-whisper's, and end-to-end words."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from speechrt.models.whisper.timing import dtw, median_filter

whisper = pytest.importorskip("whisper")
ref_timing = pytest.importorskip("whisper.timing")


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (5, 123), (40, 300)])
def test_dtw_matches(shape):
    gen = np.random.default_rng(shape[0] * 1000 + shape[1])
    for costs in (gen.standard_normal(shape), gen.integers(0, 3, shape).astype(np.float64)):
        ours = dtw(costs)  # integer costs exercise the tie rules
        ref = ref_timing.dtw_cpu(costs.copy())
        assert np.array_equal(np.stack(ours), ref)


@pytest.mark.parametrize("shape, width", [((3, 9, 50), 7), ((2, 4), 3), ((10,), 7), ((3,), 7)])
def test_median_filter_matches(shape, width):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(median_filter(x, width), ref_timing.median_filter(x, width))


@pytest.mark.parametrize(
    "audio, options",
    [("long_audio", {}), ("jfk", {"beam_size": 2, "condition_on_previous_text": False})],
)
def test_word_timestamps_match(model, reference, request, audio, options):
    audio = request.getfixturevalue(audio).numpy()
    ref = whisper.transcribe(reference, audio, fp16=False, word_timestamps=True, **options)
    ours = model.transcribe(audio, word_timestamps=True, best_of=None, **options)
    assert [(s.seek, s.start, s.end, s.text) for s in ours.segments] == [
        (s["seek"], s["start"], s["end"], s["text"]) for s in ref["segments"]
    ]
    n_words = 0
    for seg, ref_seg in zip(ours.segments, ref["segments"]):
        assert [(w.word, w.start, w.end) for w in seg.words] == [
            (w["word"], w["start"], w["end"]) for w in ref_seg["words"]
        ]
        for w, r in zip(seg.words, ref_seg["words"]):
            assert math.isclose(w.probability, r["probability"], rel_tol=1e-4, abs_tol=1e-6)
        n_words += len(seg.words)
    assert n_words > 5
