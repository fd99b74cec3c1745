"""speechrt.metrics against jiwer 4 (counts, not only rates) and a slow obvious Levenshtein."""

from __future__ import annotations

import functools
import json
import random
import unicodedata

import jiwer
import pytest

from speechrt import metrics
from speechrt.errors import SpeechrtError, UnsupportedOptionError
from speechrt.metrics import (
    ErrorCounts,
    EvalReport,
    align,
    cer,
    error_counts,
    error_rate,
    normalize_text,
    report,
    tokenize,
    wer,
)


def _jiwer_words(refs, hyps) -> tuple[int, int, int, int, float]:
    out = jiwer.process_words(refs, hyps)
    return out.substitutions, out.deletions, out.insertions, out.hits, out.wer


def _jiwer_chars(refs, hyps) -> tuple[int, int, int, int, float]:
    out = jiwer.process_characters(refs, hyps)
    return out.substitutions, out.deletions, out.insertions, out.hits, out.cer


_JIWER_OP = {"equal": "ok", "substitute": "sub", "delete": "del", "insert": "ins"}


def _jiwer_ops(ref: list[str], hyp: list[str]) -> list[tuple[str, str | None, str | None]]:
    """jiwer's alignment of one pair of token lists, expanded to one op per token."""
    chunks = jiwer.process_words(" ".join(ref), " ".join(hyp)).alignments[0]
    ops = []
    for c in chunks:
        r, h = ref[c.ref_start_idx : c.ref_end_idx], hyp[c.hyp_start_idx : c.hyp_end_idx]
        kind = _JIWER_OP[c.type]
        if kind == "del":
            ops += [(kind, t, None) for t in r]
        elif kind == "ins":
            ops += [(kind, None, t) for t in h]
        else:
            ops += [(kind, a, b) for a, b in zip(r, h, strict=True)]
    return ops


def _ours(c: ErrorCounts) -> tuple[int, int, int, int, float]:
    return c.substitutions, c.deletions, c.insertions, c.hits, c.rate


def _check_ops(ref: list[str], hyp: list[str], counts: ErrorCounts, ops) -> None:
    """The ops spell out both sequences, are well formed, and add up to the counts."""
    assert [r for op, r, _ in ops if op != "ins"] == ref
    assert [h for op, _, h in ops if op != "del"] == hyp
    for op, r, h in ops:
        assert (op == "ok") == (r == h)
        assert (r is None) == (op == "ins") and (h is None) == (op == "del")
    kinds = [op for op, _, _ in ops]
    assert (kinds.count("sub"), kinds.count("del"), kinds.count("ins"), kinds.count("ok")) == (
        counts.substitutions,
        counts.deletions,
        counts.insertions,
        counts.hits,
    )


# --------------------------------------------------------------------------- ErrorCounts


def test_error_counts_arithmetic():
    a, b = ErrorCounts(1, 2, 3, 4), ErrorCounts(5, 6, 7, 8)
    s = a + b
    assert s == ErrorCounts(6, 8, 10, 12)
    assert (s.ref_len, s.errors) == (6 + 8 + 12, 6 + 8 + 10)
    assert s.rate == pytest.approx(24 / 26)
    assert sum([a, b], ErrorCounts()) == s
    d = a.to_dict()
    assert d == {
        "substitutions": 1,
        "deletions": 2,
        "insertions": 3,
        "hits": 4,
        "ref_len": 7,
        "errors": 6,
        "rate": 6 / 7,
    }
    with pytest.raises(ValueError):
        ErrorCounts(-1, 0, 0, 0)


@pytest.mark.parametrize(
    "refs, hyps",
    [("", ""), ("", "a b c"), (["", ""], ["x", "y z"]), (["", "a"], ["", ""])],
)
def test_empty_reference_rule_matches_jiwer(refs, hyps):
    """N == 0: rate is the error count itself (jiwer 4), 0.0 when nothing was inserted."""
    got = error_counts(refs, hyps, unit="word", normalize=False)
    assert _ours(got) == _jiwer_words(refs, hyps)
    if got.ref_len == 0:
        assert got.rate == float(got.insertions)
    json.dumps(got.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- alignment

TRICKY = [
    ("a b c", ""),  # empty hyp: all deletions
    ("", "a b c"),  # empty ref: all insertions
    ("", ""),
    ("a b c", "a b c"),
    ("a b", "b c"),  # 2 S or 1 D + 1 I: equal cost, different counts
    ("a b", "b a"),  # transposition
    ("a b c d", "b a d c"),
    ("a a a a", "a a"),  # repeated words
    ("a a", "a a a a a"),
    ("a b a b a b", "b a b a b a"),
    ("the cat sat on the mat", "the the cat sat on mat mat"),
    ("x y z", "p q r s t"),
    ("a b c d e", "e d c b a"),
    ("naïve café über straße", "naive café uber strasse"),  # unicode words
    ("ёлка 🙂 日本", "елка 🙂 日本 語"),
    ("one two three four five six", "one three two four six five seven"),
]


@pytest.mark.parametrize("ref, hyp", TRICKY)
def test_align_tricky_cases_match_jiwer(ref, hyp):
    r, h = ref.split(), hyp.split()
    counts, ops = align(r, h)
    _check_ops(r, h, counts, ops)
    assert _ours(counts) == _jiwer_words(ref, hyp)
    assert ops == _jiwer_ops(r, h)


@functools.cache
def _optimal_splits(a: str, b: str) -> tuple[int, frozenset[tuple[int, int, int]]]:
    """(distance, every (S, D, I) of a minimum-cost alignment), by brute-force recursion."""
    if not a or not b:
        return len(a) + len(b), frozenset({(0, len(a), len(b))})
    moves = [
        (_optimal_splits(a[1:], b), (0, 1, 0)),
        (_optimal_splits(a, b[1:]), (0, 0, 1)),
        (_optimal_splits(a[1:], b[1:]), (int(a[0] != b[0]), 0, 0)),
    ]
    best = min(d + sum(step) for (d, _), step in moves)
    splits = {
        (s + step[0], d_ + step[1], i + step[2])
        for (d, subs), step in moves
        if d + sum(step) == best
        for s, d_, i in subs
    }
    return best, frozenset(splits)


def test_tie_break_picks_jiwers_split_among_optimal_ones():
    """Where optimal alignments disagree on S/D/I, ours is optimal and is the one jiwer picks."""
    rng = random.Random(5)
    ambiguous = 0
    for _ in range(400):
        a = "".join(rng.choice("xy") for _ in range(rng.randint(0, 6)))
        b = "".join(rng.choice("xy") for _ in range(rng.randint(0, 6)))
        counts, _ = align(list(a), list(b))
        ours = (counts.substitutions, counts.deletions, counts.insertions)
        assert ours in _optimal_splits(a, b)[1], (a, b)
        assert ours == _jiwer_words(" ".join(a), " ".join(b))[:3], (a, b)
        ambiguous += len(_optimal_splits(a, b)[1]) > 1
    assert ambiguous >= 10  # the tie-break really decides the counts


def _random_pair(rng: random.Random, vocab: list[str], max_len: int) -> tuple[str, str]:
    ref = [rng.choice(vocab) for _ in range(rng.randint(0, max_len))]
    if rng.random() < 0.5:  # an edited copy, like a recogniser's output
        hyp = list(ref)
        for _ in range(rng.randint(0, max(1, len(ref) // 2))):
            k = rng.randint(0, len(hyp))
            kind = rng.choice("sdi") if hyp else "i"
            if kind == "i":
                hyp.insert(k, rng.choice(vocab))
            elif kind == "d":
                del hyp[min(k, len(hyp) - 1)]
            else:
                hyp[min(k, len(hyp) - 1)] = rng.choice(vocab)
    else:  # unrelated
        hyp = [rng.choice(vocab) for _ in range(rng.randint(0, max_len))]
    return " ".join(ref), " ".join(hyp)


def test_random_word_pairs_match_jiwer_exactly():
    rng = random.Random(20240607)
    vocab = ["a", "b", "c", "the", "cat", "sat"]
    pairs = [_random_pair(rng, vocab[: rng.randint(2, 6)], 15) for _ in range(300)]
    for ref, hyp in pairs:
        got = error_counts(ref, hyp, unit="word", normalize=False)
        assert _ours(got) == _jiwer_words(ref, hyp), (ref, hyp)
        assert align(ref.split(), hyp.split())[1] == _jiwer_ops(ref.split(), hyp.split())
    refs, hyps = zip(*pairs)
    total = error_counts(list(refs), list(hyps), unit="word", normalize=False)
    assert _ours(total) == _jiwer_words(list(refs), list(hyps))


def test_random_char_pairs_match_jiwer_exactly():
    rng = random.Random(7)
    alphabet = list("abc日本語")
    for _ in range(300):
        ref, hyp = (s.replace(" ", "") for s in _random_pair(rng, alphabet, 20))
        got = error_counts(ref, hyp, unit="char", normalize=False)
        assert _ours(got) == _jiwer_chars(ref, hyp), (ref, hyp)


def test_long_pairs_match_jiwer():
    """References over 64 tokens, where rapidfuzz bands its bit matrix."""
    rng = random.Random(3)
    for _ in range(30):
        vocab = [f"w{k}" for k in range(rng.choice([2, 5, 50]))]
        ref, hyp = _random_pair(rng, vocab, 600)
        counts, ops = align(ref.split(), hyp.split())
        assert _ours(counts) == _jiwer_words(ref, hyp)
        assert ops == _jiwer_ops(ref.split(), hyp.split())


@pytest.mark.parametrize("seed", [0, 6, 11])
def test_very_long_pairs_follow_jiwers_split(seed, monkeypatch):
    """~2100 random tokens: rapidfuzz splits the problem (Hirschberg); so must we, to agree."""
    rng = random.Random(seed)
    ref = " ".join(f"w{rng.randrange(4)}" for _ in range(2100))
    hyp = " ".join(f"w{rng.randrange(4)}" for _ in range(2101))
    expected = _jiwer_words(ref, hyp)
    counts, ops = align(ref.split(), hyp.split())
    assert _ours(counts) == expected
    assert ops == _jiwer_ops(ref.split(), hyp.split())
    # never split: the same rate, but other counts
    monkeypatch.setattr(metrics, "_SPLIT_MIN_BYTES", 1 << 62)
    unsplit = error_counts(ref, hyp, unit="word", normalize=False)
    assert unsplit.rate == expected[4]
    assert _ours(unsplit) != expected


def test_short_reference_is_never_split():
    """64 reference tokens against 66000: big enough to split, but rapidfuzz does not; nor do we."""
    rng = random.Random(0)
    ref = [f"w{rng.randrange(3)}" for _ in range(64)]
    hyp = [f"w{rng.randrange(3)}" for _ in range(66000)]
    assert align(ref, hyp)[1] == _jiwer_ops(ref, hyp)


def test_very_long_split_may_put_the_whole_reference_right():
    """The split point can be reference position 0 (here: the hypothesis' first half inserted)."""
    x = [f"x{k}" for k in range(2100)]
    ref, hyp = [*x, "z"], [f"y{k}" for k in range(2100)] + [*x, "q"]
    counts, ops = align(ref, hyp)
    assert counts == ErrorCounts(substitutions=1, insertions=2100, hits=2100)
    assert ops == _jiwer_ops(ref, hyp)


@functools.cache
def _oracle_distance(a: str, b: str) -> int:
    """Textbook recursive Levenshtein distance."""
    if not a or not b:
        return len(a) + len(b)
    return min(
        _oracle_distance(a[1:], b) + 1,
        _oracle_distance(a, b[1:]) + 1,
        _oracle_distance(a[1:], b[1:]) + (a[0] != b[0]),
    )


def test_edit_distance_equals_recursive_oracle():
    rng = random.Random(11)
    for _ in range(500):
        a = "".join(rng.choice("xyz") for _ in range(rng.randint(0, 8)))
        b = "".join(rng.choice("xyz") for _ in range(rng.randint(0, 8)))
        counts, ops = align(list(a), list(b))
        assert counts.errors == _oracle_distance(a, b), (a, b)
        _check_ops(list(a), list(b), counts, ops)


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Don't STOP!  Now.", "don't stop now"),
        ("Don’t stop", "don't stop"),  # curly apostrophe inside a word -> '
        ("'quoted' students' 90's rock'n'roll", "quoted students 90's rock'n'roll"),
        ("你好，世界！「测试」。", "你好 世界 测试"),  # full-width / ideographic punctuation
        ("ＧＰＵ加速", "gpu加速"),  # NFKC folds full-width letters
        ("well-known\t e.g.\n", "well known e g"),
        ("50% of $5 + 2°", "50 of $5 + 2°"),  # S* symbols stay; % is P* (Po)
        ("カタカナ・テスト", "カタカナ テスト"),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_normalize_text_flags():
    assert normalize_text("  Hi,  THERE ") == "hi there"
    assert normalize_text("  Hi,  THERE ", lowercase=False) == "Hi THERE"
    assert normalize_text("  Hi,  THERE ", remove_punctuation=False) == "hi, there"
    assert normalize_text("ﬁ Ａ", lowercase=False, remove_punctuation=False) == "fi A"


def test_tokenize_units():
    assert tokenize("我们 use GPU加速") == ["我", "们", "use", "GPU", "加", "速"]
    assert tokenize("我们 use GPU加速", "char") == list("我们useGPU加速")
    assert tokenize("  a  b\tc\n", "word") == ["a", "b", "c"]
    assert tokenize("ひらがなカタカナ한국어 ok", "auto") == [*"ひらがなカタカナ한국어", "ok"]
    assert tokenize("", "auto") == tokenize("   ", "char") == []
    with pytest.raises(UnsupportedOptionError):
        tokenize("a", "syllable")


_CJK_NAMES = (
    "CJK UNIFIED IDEOGRAPH",
    "CJK COMPATIBILITY IDEOGRAPH",
    "CJK RADICAL",
    "KANGXI RADICAL",
    "IDEOGRAPHIC ITERATION MARK",
    "IDEOGRAPHIC NUMBER ZERO",
    "HANGZHOU NUMERAL",
    "HIRAGANA",
    "HENTAIGANA",
    "KATAKANA",
    "HANGUL",
)


def test_auto_tokenize_cjk_set_matches_unicode_names():
    """Independent oracle: letters/marks/numerals (and radicals) named after the four scripts."""
    mismatches = []
    for cp in range(0x1000, 0x40000):
        ch = chr(cp)
        name = unicodedata.name(ch, "")
        if not name or ch.isspace():
            continue
        is_cjk = any(k in name for k in _CJK_NAMES) and (
            unicodedata.category(ch)[0] in "LMN" or "RADICAL" in name
        )
        alone = tokenize(f"a{ch}b", "auto") == ["a", ch, "b"]
        if alone != is_cjk:
            mismatches.append(f"U+{cp:04X} {name}")
    assert mismatches == []


# --------------------------------------------------------------------------- corpus metrics


def test_chinese_cer_matches_jiwer():
    refs = ["今天天气很好", "我们去公园散步吧", "语音识别"]
    hyps = ["今天天汽很好啊", "我门去公园步吧", ""]
    got = error_counts(refs, hyps, unit="char", normalize=False)
    assert _ours(got) == _jiwer_chars(refs, hyps)
    assert cer(refs, hyps) == jiwer.cer(refs, hyps)
    # auto unit on pure Chinese text is the same as char
    assert error_counts(refs, hyps, unit="auto", normalize=False) == got


def test_mixed_auto_unit_matches_jiwer_on_tokens():
    refs = ["我们 use GPU加速 inference", "打开 Wi-Fi 设置"]
    hyps = ["我们用 GPU 加速 inference", "打开 wifi 设置了"]
    toks = [[" ".join(tokenize(normalize_text(t), "auto")) for t in side] for side in (refs, hyps)]
    assert _ours(error_counts(refs, hyps, unit="auto")) == _jiwer_words(*toks)


def test_cer_ignores_spaces_unlike_jiwer_default():
    refs, hyps = ["ab cd", "e f"], ["abd c", "ef"]
    stripped = [[t.replace(" ", "") for t in side] for side in (refs, hyps)]
    assert cer(refs, hyps, normalize=False) == jiwer.cer(*stripped)


def test_normalised_wer_matches_jiwer_on_normalised_text():
    refs = ["Hello, World! It's   a TEST.", "“Quotes” — and dashes-here", "Don’t panic…"]
    hyps = ["hello world its a test", "quotes and dashes here!!", "DON'T PANIC"]
    norm = [[normalize_text(t) for t in side] for side in (refs, hyps)]
    assert _ours(error_counts(refs, hyps, unit="word")) == _jiwer_words(*norm)
    assert wer(refs, hyps) == jiwer.wer(*norm)
    assert error_rate(refs, hyps, unit="word") == wer(refs, hyps)
    assert wer(refs, hyps, normalize=False) == jiwer.wer(refs, hyps)


def test_single_strings_are_one_pair():
    assert wer("a b c", "a x c") == jiwer.wer("a b c", "a x c")
    assert error_counts("a b", ["a b"]) == ErrorCounts(hits=2)


def test_length_mismatch_and_bad_unit_raise():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_counts(["a", "b"], ["a"])
    with pytest.raises(SpeechrtError):
        wer(["a"], [])
    with pytest.raises(UnsupportedOptionError):
        error_rate(["a"], ["a"], unit="phone")


def test_500_token_utterance_matches_jiwer():
    rng = random.Random(5)
    ref = [f"w{rng.randrange(30)}" for _ in range(500)]
    hyp = [t if rng.random() < 0.8 else f"w{rng.randrange(30)}" for t in ref if rng.random() < 0.9]
    counts, ops = align(ref, hyp)
    assert _ours(counts) == _jiwer_words(" ".join(ref), " ".join(hyp))
    assert ops == _jiwer_ops(ref, hyp)


# --------------------------------------------------------------------------- report


def test_report_json_totals_and_rows():
    ids = ["u1", "u2", "u3"]
    refs = ["The cat sat.", "", "我们 use GPU加速"]
    hyps = ["the cat sat on", "uh", "我 use GPU 加速了"]
    rep = report(ids, refs, hyps)
    json.loads(json.dumps(rep, allow_nan=False))
    assert rep["unit"] == "auto" and rep["normalized"] is True and rep["num_utterances"] == 3
    rows = rep["utterances"]
    assert [(r["id"], r["ref"], r["hyp"]) for r in rows] == list(zip(ids, refs, hyps))
    toks = [[" ".join(tokenize(normalize_text(t))) for t in side] for side in (refs, hyps)]
    for row, r, h in zip(rows, *toks):
        s, d, i, hits, rate = _jiwer_words(r, h)
        assert (row["substitutions"], row["deletions"], row["insertions"], row["hits"]) == (
            s,
            d,
            i,
            hits,
        )
        assert row["rate"] == rate and row["rate_percent"] == pytest.approx(100 * rate)
    tot = rep["totals"]
    s, d, i, hits, rate = _jiwer_words(*toks)
    assert (tot["substitutions"], tot["deletions"], tot["insertions"], tot["hits"]) == (
        s,
        d,
        i,
        hits,
    )
    assert tot["ref_len"] == s + d + hits and tot["errors"] == s + d + i
    assert tot["rate"] == pytest.approx(rate) and tot["rate_percent"] == pytest.approx(100 * rate)


def test_eval_report_object():
    rep = EvalReport.from_texts(["a", "b"], ["x y", "z"], ["x", "z w"], unit="word")
    assert rep.totals == ErrorCounts(deletions=1, insertions=1, hits=2)
    assert rep.to_dict()["totals"]["rate_percent"] == pytest.approx(100 * 2 / 3)
    with pytest.raises(ValueError):
        report(["a"], ["x", "y"], ["x", "y"])
