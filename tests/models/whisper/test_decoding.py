"""Window decoding against openai-whisper's ``decode``: same tokens for every search and option,
plus the batched pieces (timestamp rules, beam search) against their per-row originals."""

from __future__ import annotations

import math

import pytest
import torch

from speechrt.audio.log_mel import N_FRAMES, log_mel_spectrogram
from speechrt.decoding import whisper as whisper_decoding
from speechrt.decoding.whisper import WhisperDecodeOptions, WindowDecoder
from speechrt.decoding.whisper_filters import (
    ApplyTimestampRules,
    ForcedLength,
    SuppressBlank,
    SuppressTokens,
)
from speechrt.decoding.whisper_search import BeamSearch, GreedySearch, rank
from speechrt.errors import UnsupportedOptionError

whisper = pytest.importorskip("whisper")
from whisper import decoding as ref_decoding  # noqa: E402


@pytest.fixture(scope="module")
def mels(long_audio) -> torch.Tensor:
    """(3, 80, 3000): three windows of real audio at different offsets."""
    mel = log_mel_spectrogram(long_audio, 80, padding=480000)
    return torch.stack([mel[:, s : s + N_FRAMES] for s in (0, 700, 2500)])


def _compare(ref_results, ours_results):
    assert len(ref_results) == len(ours_results)
    for r, o in zip(ref_results, ours_results):
        assert o.tokens == r.tokens
        assert o.text == r.text
        assert o.language == r.language
        assert math.isclose(o.avg_logprob, r.avg_logprob, rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(o.no_speech_prob, r.no_speech_prob, rel_tol=1e-4, abs_tol=1e-9)
        assert o.compression_ratio == r.compression_ratio


GREEDY_OPTIONS = [
    {},
    {"language": "de"},
    {"without_timestamps": True, "language": "en"},
    {"prompt": "hello there, general", "prefix": "ok so"},
    {"task": "translate", "language": "fr", "suppress_tokens": "", "suppress_blank": False},
    {"suppress_tokens": [1, 2, 3, -1], "max_initial_timestamp": None, "sample_len": 20},
]


@pytest.mark.parametrize("options", GREEDY_OPTIONS)
def test_greedy_batch_matches(model, reference, mels, options):
    ref = whisper.decode(reference, mels, whisper.DecodingOptions(fp16=False, **options))
    _compare(ref, model.decode(mels, WhisperDecodeOptions(**options)))


SEARCH_OPTIONS = [
    {"beam_size": 3},
    {"beam_size": 5, "patience": 2.0, "length_penalty": 0.5},
    {"beam_size": 4, "patience": 0.5, "prompt": [400, 11, 1770]},
    {"beam_size": 2, "without_timestamps": True, "language": "en", "length_penalty": 1.0},
    {"temperature": 0.7, "best_of": 3},
    {"temperature": 1.0},
]


@pytest.mark.parametrize("options", SEARCH_OPTIONS)
@pytest.mark.parametrize("window", [0, 2])
def test_beam_and_sampling_match(model, reference, mels, options, window):
    """One audio per call: openai-whisper cannot decode several audios with groups > 1."""
    mel = mels[window : window + 1]
    torch.manual_seed(7)
    ref = whisper.decode(reference, mel, whisper.DecodingOptions(fp16=False, **options))
    torch.manual_seed(7)
    _compare(ref, model.decode(mel, WhisperDecodeOptions(**options)))


def test_late_stop_gives_the_same_result(model, mels):
    """Noticing completion a step late (as on CUDA) changes nothing."""
    for options in ({}, {"beam_size": 3, "patience": 0.5}):
        opts = WhisperDecodeOptions(**options)
        features = model.embed_audio(mels[:1])
        results = []
        for lag in (0, 1, 3):
            decoder = WindowDecoder(model.tokenizer, opts, 448, 1500, stop_lag=lag)
            with torch.inference_mode():
                model.net.ensure_caches(decoder.group, 1)
                model.net.set_audio(features)
                results.append(decoder.run(model.net, 1, torch.device("cpu")))
        assert results[0] == results[1] == results[2]


def test_detect_language_matches(model, reference, mels):
    with torch.no_grad():
        ref_tokens, ref_probs = ref_decoding.detect_language(reference, mels)
    codes, probs = model.detect_language_features(model.embed_audio(mels))
    tokenizer = model.tokenizer
    assert [tokenizer.to_language_token(c) for c in codes] == ref_tokens.tolist()
    for ours, ref in zip(probs, ref_probs):
        assert ours.keys() == ref.keys()
        for code in ref:
            assert math.isclose(ours[code], ref[code], rel_tol=1e-4, abs_tol=1e-9)


def test_timestamp_rules_match_per_row_reference():
    """The batched rules equal openai-whisper's per-row loop on random histories."""
    tokenizer = whisper.tokenizer.get_tokenizer(True, language="en", task="transcribe")
    gen = torch.Generator().manual_seed(0)
    tb, eot, sample_begin = tokenizer.timestamp_begin, tokenizer.eot, 3
    for length in (3, 4, 5, 9):
        rows = []
        for _ in range(64):
            hist = torch.randint(0, 400, (length,), generator=gen)
            is_ts = torch.rand(length, generator=gen) < 0.5
            hist = torch.where(is_ts, tb + torch.randint(0, 1501, (length,), generator=gen), hist)
            rows.append(hist)
        tokens = torch.stack(rows)
        tokens[:, :sample_begin] = torch.tensor(tokenizer.sot_sequence)
        logits = torch.randn(64, 51865, generator=gen) * 3
        logits[::5, tb:] += 8.0  # some rows where timestamps dominate
        ref = logits.clone()
        ref_decoding.ApplyTimestampRules(tokenizer, sample_begin, 50).apply(ref, tokens)
        ours = logits.clone()
        ApplyTimestampRules(tb, eot, tokenizer.no_timestamps, sample_begin, 50).apply(
            ours, tokens, length
        )
        assert torch.equal(ours.isinf(), ref.isinf()), length
        assert torch.equal(ours, ref)


def _histories(tokenizer, rows: int, width: int, gen) -> torch.Tensor:
    """(rows, width) random text/timestamp tokens after the SOT sequence."""
    tb = tokenizer.timestamp_begin
    hist = torch.randint(0, 400, (rows, width), generator=gen)
    is_ts = torch.rand(rows, width, generator=gen) < 0.5
    hist = torch.where(is_ts, tb + torch.randint(0, 1501, (rows, width), generator=gen), hist)
    hist[:, :3] = torch.tensor(tokenizer.sot_sequence)
    return hist


@pytest.mark.parametrize("max_initial", [50, None])
def test_filters_apply_at_equal_apply(max_initial):
    """Each filter's fixed-shape ``apply_at`` (device length, the whole token buffer with
    garbage past the length) equals its ``apply`` (host length, the context so far)."""
    tokenizer = whisper.tokenizer.get_tokenizer(True, language="en", task="transcribe")
    gen = torch.Generator().manual_seed(1)
    tb, eot, begin = tokenizer.timestamp_begin, tokenizer.eot, 3
    filters = [
        SuppressBlank([220, eot], begin),
        SuppressTokens([1, 7, 400]),
        ApplyTimestampRules(tb, eot, tokenizer.no_timestamps, begin, max_initial),
        ForcedLength(torch.tensor([0, 1, 2, 5] * 16), begin, eot),
    ]
    tokens = _histories(tokenizer, 64, 40, gen)  # (B, W): columns >= length are garbage
    for length in (3, 4, 5, 9, 40):
        logits = torch.randn(64, 51865, generator=gen) * 3
        logits[::5, tb:] += 8.0  # some rows where timestamps dominate
        for f in filters:
            old, new = logits.clone(), logits.clone()
            f.apply(old, tokens[:, :length], length)
            f.apply_at(new, tokens, torch.tensor(length))
            assert torch.equal(new, old), (type(f).__name__, length)
    # all filters in order, timestamps dominating every row: a row whose forced length is
    # reached still ends with EOT (the timestamp rule masks EOT with the text first)
    logits = torch.randn(64, 51865, generator=gen)
    logits[:, tb:] += 20.0
    for f in filters:
        f.apply(logits, tokens[:, :5], 5)
    ends = filters[-1].lengths == 2  # 5 - begin tokens sampled
    assert (logits[ends].argmax(dim=-1) == eot).all()
    assert logits[ends].isfinite().sum() == ends.sum()  # EOT alone


def test_greedy_update_at_equals_update():
    """``update_at`` (device length, state in place) = ``update``: tokens, sums, done."""
    gen = torch.Generator().manual_seed(2)
    eot, rows, width = 50, 6, 12
    tokens = torch.randint(0, 40, (rows, width), generator=gen)
    tokens[1, 4], tokens[3, 4] = eot, eot  # rows already ended before length 5
    old, new = GreedySearch(0.0, eot, rows, "cpu"), GreedySearch(0.0, eot, rows, "cpu")
    sums, done = new.sum_logprobs, new.done
    t_old, t_new = tokens.clone(), tokens.clone()
    for length in (5, 6, 7):
        logits = torch.randn(rows, 60, generator=gen)
        logits[0, eot] = 10.0  # row 0 ends now
        old.update(t_old, length, logits.clone())
        new.update_at(t_new, torch.tensor(length), logits.clone())
        assert torch.equal(t_new, t_old)
        assert torch.equal(new.sum_logprobs, old.sum_logprobs) and bool(new.done) == bool(old.done)
    assert new.sum_logprobs is sums and new.done is done  # updated in place
    with pytest.raises(UnsupportedOptionError, match="temperature 0"):
        GreedySearch(0.5, eot, rows, "cpu").update_at(t_new, torch.tensor(8), logits)


@pytest.mark.parametrize("options", [{}, {"without_timestamps": True, "language": "en"}])
def test_greedy_post_path_equals_host_loop(model, mels, options, monkeypatch):
    """The GreedyPost step tail and the host loop over filters/search give the same windows,
    also with forced lengths (the benchmarks' mode) and over several batches reusing it."""
    features = model.embed_audio(mels)
    opts = WhisperDecodeOptions(**options)
    forced = torch.tensor([3, 7, 1])
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(whisper_decoding, "GREEDY_POST", on)
        runs[on] = [model.decode_features(features, opts),
                    model.decode_features(features, opts, forced_lengths=forced),
                    model.decode_features(features[1:], opts)]  # fmt: skip
    assert runs[True] == runs[False]
    assert [len(r.tokens) for r in runs[True][1]] == forced.tolist()


class _Recorder(ref_decoding.Inference):
    def rearrange_kv_cache(self, source_indices) -> None:
        pass


@pytest.mark.parametrize("beam, patience", [(3, None), (4, 1.5), (5, 0.6)])
def test_beam_search_matches_reference_on_several_audios(beam, patience):
    """Drive both searches with logits that depend on each row's last token, for 3 audios."""
    gen = torch.Generator().manual_seed(beam)
    vocab, eot, n_audio, steps = 300, 299, 3, 30
    table = torch.randn(vocab, vocab, generator=gen) * 2
    table[:, eot] += torch.linspace(-6, 1, vocab)  # EOT grows likelier after some tokens

    def logits_for(tokens):
        return table[tokens[:, -1]] + 0.1 * tokens.shape[1]

    start = torch.tensor([[5, 6]] * n_audio).repeat_interleave(beam, 0)
    ref_search = ref_decoding.BeamSearchDecoder(beam, eot, _Recorder(), patience)
    ref_tokens, ref_sum = start.clone(), torch.zeros(n_audio * beam)
    ours = BeamSearch(beam, eot, patience, n_audio, 40, torch.device("cpu"))
    buffer = torch.full((n_audio * beam, 41), eot)
    buffer[:, :2] = start
    length = 2
    for _ in range(steps):
        ref_tokens, completed = ref_search.update(ref_tokens, logits_for(ref_tokens), ref_sum)
        ours.update(buffer, length, logits_for(buffer[:, :length]), lambda src: None)
        length += 1
        assert bool(ours.done) == completed
        if completed:
            break
        assert torch.equal(buffer[:, :length], ref_tokens)
    ref_final = ref_search.finalize(
        ref_tokens.reshape(n_audio, beam, -1), ref_sum.reshape(n_audio, beam)
    )
    ours_final = ours.finalize(buffer, length, beam)
    for a in range(n_audio):
        assert [seq for seq, _ in ours_final[a]] == [t.tolist() for t in ref_final[0][a]]
        assert [score for _, score in ours_final[a]] == ref_final[1][a]
    assert (
        rank(ours_final, 2, eot, None)[0][0]
        == ref_final[0][0][
            ref_decoding.MaximumLikelihoodRanker(None).rank(
                [[t[2 : (t == eot).nonzero()[0, 0]] for t in s] for s in ref_final[0]], ref_final[1]
            )[0]
        ][2:-1].tolist()
    )


@pytest.mark.parametrize(
    "options, match",
    [
        ({"beam_size": 2, "best_of": 2}, "together"),
        ({"best_of": 2}, "temperature"),
        ({"patience": 2.0}, "patience"),
        ({"length_penalty": 2.0}, "length_penalty"),
        ({"task": "summarize"}, "task"),
        ({"beam_size": 0}, "beam_size"),
    ],
)
def test_option_errors(options, match):
    with pytest.raises(UnsupportedOptionError, match=match):
        WhisperDecodeOptions(**options)


def test_unknown_language_is_an_error(model, mels):
    with pytest.raises(UnsupportedOptionError, match="xx"):
        model.decode(mels[:1], WhisperDecodeOptions(language="xx"))
