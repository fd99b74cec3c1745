"""The tokenizer gives the same ids and special tokens as openai-whisper's."""

from __future__ import annotations

import pytest

from speechrt.errors import UnsupportedOptionError
from speechrt.models.whisper.tokenizer import LANGUAGES, get_tokenizer, normalize_language

ref_tokenizer = pytest.importorskip("whisper.tokenizer")

TEXTS = [
    "And so my fellow Americans, ask not what your country can do for you.",
    "Привет, мир! Как дела?",
    "こんにちは世界。東京は晴れです",
    "你好，世界。我们去吃饭吧",
    "Ça va? C'est déjà l'été — naïve café.",
    "עברית, العربية, हिन्दी, ไทย, 한국어",
    "♪♪ [MUSIC] (SPEAKING FOREIGN LANGUAGE) <<>> -- 1,234.5 % $",
    "  double  spaces\tand\nnewlines  ",
]
SPECIALS = ["eot", "sot", "sot_prev", "sot_lm", "transcribe", "translate", "no_speech",
            "no_timestamps", "timestamp_begin"]  # fmt: skip


@pytest.mark.parametrize(
    "multilingual, num_languages, language, task",
    [
        (True, 99, None, None),
        (True, 99, "de", "translate"),
        (True, 100, "yue", "transcribe"),
        (True, 99, "Japanese", None),
        (False, 99, None, None),
    ],
)
def test_same_as_openai_whisper(multilingual, num_languages, language, task):
    ref = ref_tokenizer.get_tokenizer(
        multilingual, num_languages=num_languages, language=language, task=task
    )
    ours = get_tokenizer(multilingual, num_languages, language, task)
    assert ours.sot_sequence == ref.sot_sequence
    assert ours.sot_sequence_including_notimestamps == ref.sot_sequence_including_notimestamps
    assert ours.non_speech_tokens == ref.non_speech_tokens
    assert ours.all_language_tokens == tuple(sorted(ref.all_language_tokens))
    assert ours.encoding.n_vocab == ref.encoding.n_vocab
    for name in SPECIALS:
        assert getattr(ours, name) == getattr(ref, name), name
    for text in TEXTS:
        ids = ref.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids) == ref.decode(ids) == text
        assert ours.split_to_word_tokens(ids) == ref.split_to_word_tokens(ids)
    stamped = [
        ours.sot,
        ours.timestamp_begin + 54,
        *ours.encode(" hi"),
        ours.timestamp_begin + 1500,
    ]
    assert ours.decode_with_timestamps(stamped) == ref.decode_with_timestamps(stamped)
    assert ours.decode_with_timestamps(stamped).endswith(" hi<|30.00|>")
    assert ours.decode(stamped) == "<|startoftranscript|> hi"


def test_language_table_and_tokens():
    assert list(LANGUAGES.items()) == list(ref_tokenizer.LANGUAGES.items())
    tok = get_tokenizer(True, 100)
    assert tok.to_language_token("en") == tok.sot + 1
    assert tok.to_language_token("cantonese") == tok.sot + 100
    assert normalize_language("Mandarin") == "zh"
    assert tok.decode_with_timestamps([tok.timestamp_begin + 1500]) == "<|30.00|>"


def test_unknown_language_and_task():
    with pytest.raises(UnsupportedOptionError, match="klingon"):
        get_tokenizer(True, 99, "klingon")
    with pytest.raises(UnsupportedOptionError, match="yue"):
        get_tokenizer(True, 99, "yue")  # only 99 languages in this vocabulary
    with pytest.raises(UnsupportedOptionError, match="task"):
        get_tokenizer(True, 99, "en", "summarize")


def test_with_options_shares_one_tokenizer_per_choice():
    """Decoding asks for a tokenizer per window: the same choice gives the same instance, other
    choices their own (with their own SOT sequence); bad options still raise."""
    base = get_tokenizer(True, 100)
    fr = base.with_options("fr", "translate")
    assert fr is base.with_options("fr", "translate")
    de = base.with_options("de", "transcribe")
    assert de is not fr and de.sot_sequence != fr.sot_sequence
    assert fr.sot_sequence == get_tokenizer(True, 100, "fr", "translate").sot_sequence
    with pytest.raises(UnsupportedOptionError):
        base.with_options("klingon", "transcribe")
