"""Word / character error rates with alignment counts (what ``speechrt eval`` reports).

Pipeline for one (reference, hypothesis) pair::

    text ──► normalize_text (NFKC, lower-case, punctuation out) ──► tokenize (word | char | auto)
         ──► align (Levenshtein) ──► ErrorCounts (S, D, I, hits) ──► summed over the corpus

The corpus rate is ``(S + D + I) / N`` with ``N = S + D + hits``, the number of reference tokens,
summed over utterances before dividing (not a mean of per-utterance rates), as jiwer does.

**Alignment rule.** Several minimum-cost alignments can have different S/D/I splits
(``"a b"`` -> ``"b c"`` is 2 substitutions or 1 deletion + 1 insertion; the rate is the same,
the counts are not). :func:`align` makes the choice jiwer 4 makes through rapidfuzz 3's
``Levenshtein.opcodes``, so the alignment, and with it S/D/I, agrees with jiwer's:

1. a common prefix and suffix are matched first;
2. the rest is aligned by walking the edit-distance matrix ``D`` (``D[i][j]``: ``ref[:i]`` vs
   ``hyp[:j]``) back from the end; at ``(i, j)`` it takes a deletion if ``D[i-1][j] + 1`` is
   optimal, else an insertion if ``D[i][j-1] == D[i-1][j-1] - 1``, else the diagonal (match or
   substitution) - so a substitution beats an equally good insertion unless that condition holds;
3. very long inputs (``2 * min(n_ref, 2 * distance + 1) * n_hyp / 8 >= 2**20`` after step 1,
   ``n_ref >= 65``, ``n_hyp >= 10``) are first split Hirschberg-style at half the hypothesis and
   the first reference position (0 included) with the least total cost, each half then aligned
   alone (recursively, from step 1).

When the reference (after step 1) has at most 64 tokens rapidfuzz keeps the exact matrix and the
alignments agree always; for longer ones it keeps a banded bit matrix whose bits can, very rarely,
differ from the exact ones (none in thousands of random pairs of up to 800 tokens; about one in
300 random pairs of 1500-6000 tokens), and then S/D/I, never the rate, can differ from jiwer's.
The matrix is computed bit-parallel (Hyyrö 2003) on Python integers: O(n_hyp) big-integer
operations of n_ref bits each, about 1 ms for 500 x 500 tokens.

**Empty references.** ``rate = errors / N`` when ``N > 0``; when ``N == 0`` it is ``errors``
itself (0.0 for an empty hypothesis, else the number of inserted tokens, i.e. 100 % per
insertion). This is jiwer 4's convention and keeps reports JSON-safe (no ``inf``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from speechrt.errors import SpeechrtError, UnsupportedOptionError

__all__ = [
    "ErrorCounts",
    "EvalReport",
    "MetricsInputError",
    "UtteranceScore",
    "align",
    "cer",
    "error_counts",
    "error_rate",
    "normalize_text",
    "report",
    "tokenize",
    "wer",
]

UNITS = ("word", "char", "auto")
Op = tuple[str, str | None, str | None]


class MetricsInputError(SpeechrtError, ValueError):
    """References and hypotheses (or ids) that do not pair up."""


# --------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class ErrorCounts:
    """Edit counts of one or more aligned pairs; ``+`` sums them, ``ErrorCounts()`` is zero."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0

    def __post_init__(self) -> None:
        for name in ("substitutions", "deletions", "insertions", "hits"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ErrorCounts.{name} must be a non-negative int, got {value!r}")

    @property
    def ref_len(self) -> int:
        """N: the number of reference tokens (S + D + hits)."""
        return self.substitutions + self.deletions + self.hits

    @property
    def errors(self) -> int:
        """S + D + I: the edit distance."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """errors / N; for N == 0, errors itself (jiwer 4's rule, see the module docstring)."""
        return self.errors / self.ref_len if self.ref_len else float(self.errors)

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        if not isinstance(other, ErrorCounts):
            return NotImplemented
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.hits + other.hits,
        )

    def to_dict(self) -> dict:
        """Counts, N (``ref_len``), ``errors`` and ``rate`` (a fraction, not %)."""
        return {
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "hits": self.hits,
            "ref_len": self.ref_len,
            "errors": self.errors,
            "rate": self.rate,
        }


# --------------------------------------------------------------------------- alignment

_SPLIT_MIN_BYTES = 1 << 20  # rapidfuzz's bit-matrix size from which it splits (Hirschberg)


def _bit_columns(ref: Sequence[str], hyp: Sequence[str]) -> tuple[list[int], list[int]]:
    """Vertical deltas of the edit-distance matrix D (D[i][j]: ref[:i] vs hyp[:j]), bit-parallel.

    Returns ``vp, vn`` of length len(hyp): bit ``i - 1`` of ``vp[j - 1]`` is set iff
    ``D[i][j] - D[i-1][j] == +1``, of ``vn[j - 1]`` iff it is ``-1`` (Hyyrö 2003). ``ref`` and
    ``hyp`` must not be empty.
    """
    mask = (1 << len(ref)) - 1
    peq: dict[str, int] = {}
    for i, tok in enumerate(ref):
        peq[tok] = peq.get(tok, 0) | (1 << i)
    vp, vn = mask, 0
    vps, vns = [], []
    for tok in hyp:
        x = peq.get(tok, 0) | vn
        d0 = (((x & vp) + vp) ^ vp) | x
        hp = vn | (~(d0 | vp) & mask)
        hn = d0 & vp
        hp = ((hp << 1) | 1) & mask
        hn = (hn << 1) & mask
        vp = hn | (~(d0 | hp) & mask)
        vn = hp & d0
        vps.append(vp)
        vns.append(vn)
    return vps, vns


def _last_column(ref: Sequence[str], hyp: Sequence[str]) -> list[int]:
    """[D(ref[:i], hyp) for i in 0..len(ref)]."""
    if not ref or not hyp:
        return [len(hyp) + i for i in range(len(ref) + 1)]
    vps, vns = _bit_columns(ref, hyp)
    vp, vn = vps[-1], vns[-1]
    col = [len(hyp)]
    for i in range(len(ref)):
        col.append(col[-1] + ((vp >> i) & 1) - ((vn >> i) & 1))
    return col


def _distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    return _last_column(ref, hyp)[-1]


def _backtrack(ref: Sequence[str], hyp: Sequence[str]) -> list[Op]:
    """Rule 2 of the module docstring: the walk back through the full matrix, in forward order."""
    ops: list[Op] = []
    i, j = len(ref), len(hyp)
    if i and j:
        vps, vns = _bit_columns(ref, hyp)
        while i and j:
            bit = 1 << (i - 1)
            if vps[j - 1] & bit:  # D[i][j] == D[i-1][j] + 1
                i -= 1
                ops.append(("del", ref[i], None))
            elif j > 1 and vns[j - 2] & bit:  # D[i][j-1] == D[i-1][j-1] - 1
                j -= 1
                ops.append(("ins", None, hyp[j]))
            else:
                i, j = i - 1, j - 1
                ops.append(("ok" if ref[i] == hyp[j] else "sub", ref[i], hyp[j]))
    ops.extend(("del", ref[k], None) for k in range(i - 1, -1, -1))
    ops.extend(("ins", None, hyp[k]) for k in range(j - 1, -1, -1))
    ops.reverse()
    return ops


def _split_point(ref: Sequence[str], hyp: Sequence[str]) -> tuple[int, int, int, int]:
    """Rule 3: (ref_mid, hyp_mid, distance of the left part, distance of the right part)."""
    hyp_mid = len(hyp) // 2
    left = _last_column(ref, hyp[:hyp_mid])
    right = _last_column(ref[::-1], hyp[hyp_mid:][::-1])  # right[k]: ref[-k:] vs hyp[hyp_mid:]
    n = len(ref)
    mid = min(range(n + 1), key=lambda i: left[i] + right[n - i])  # the first minimum
    return mid, hyp_mid, left[mid], right[n - mid]


def _worth_splitting(ref: Sequence[str], hyp: Sequence[str], dist: int | None) -> bool:
    """Rule 3's size test (rapidfuzz's: its bit matrix would take 1 MiB or more)."""
    if len(ref) < 65 or len(hyp) < 10:
        return False
    dist = _distance(ref, hyp) if dist is None else dist
    return 2 * min(len(ref), 2 * dist + 1) * len(hyp) // 8 >= _SPLIT_MIN_BYTES


def _align_into(ref: Sequence[str], hyp: Sequence[str], out: list[Op], dist: int | None) -> None:
    """Append the alignment of ref/hyp to ``out`` (``dist``: their distance, if known)."""
    lo = 0
    while lo < len(ref) and lo < len(hyp) and ref[lo] == hyp[lo]:
        lo += 1
    tail = 0
    while tail < len(ref) - lo and tail < len(hyp) - lo and ref[-1 - tail] == hyp[-1 - tail]:
        tail += 1
    out.extend(("ok", tok, tok) for tok in ref[:lo])
    r, h = ref[lo : len(ref) - tail], hyp[lo : len(hyp) - tail]
    if _worth_splitting(r, h, dist):
        mid, hyp_mid, left, right = _split_point(r, h)
        _align_into(r[:mid], h[:hyp_mid], out, left)
        _align_into(r[mid:], h[hyp_mid:], out, right)
    else:
        out.extend(_backtrack(r, h))
    out.extend(("ok", tok, tok) for tok in ref[len(ref) - tail :])


def align(ref: Sequence[str], hyp: Sequence[str]) -> tuple[ErrorCounts, list[Op]]:
    """Minimum edit-distance alignment of two token sequences (tie-break: module docstring).

    Returns the counts and the ops in order: ``("ok", r, h)``, ``("sub", r, h)``,
    ``("del", r, None)`` or ``("ins", None, h)``.
    """
    ref, hyp = list(ref), list(hyp)
    ops: list[Op] = []
    _align_into(ref, hyp, ops, None)
    return _count(ops), ops


def _count(ops: Sequence[Op]) -> ErrorCounts:
    n = {"ok": 0, "sub": 0, "del": 0, "ins": 0}
    for op, _, _ in ops:
        n[op] += 1
    return ErrorCounts(n["sub"], n["del"], n["ins"], n["ok"])


# --------------------------------------------------------------------------- text

_APOSTROPHES = "'\u2019"  # ASCII apostrophe, right single quotation mark


def normalize_text(text: str, *, lowercase: bool = True, remove_punctuation: bool = True) -> str:
    """NFKC, lower-case, punctuation to spaces, whitespace collapsed to single spaces.

    Punctuation is every character of Unicode category P* (so also Chinese full-width and
    ideographic marks such as ``，。、「」``), except an apostrophe (``'`` or ``’``) between two
    letters or digits, which is kept as ``'`` (``don’t`` -> ``don't``). Symbols (S*: ``$ + °``)
    are kept; note that ``% # & @ *`` are P*. Each removed mark becomes a space, so
    ``well-known`` -> ``well known`` and ``3.5`` -> ``3 5``.
    """
    text = unicodedata.normalize("NFKC", text)
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        text = _strip_punctuation(text)
    return " ".join(text.split())


def _strip_punctuation(text: str) -> str:
    chars = list(text)
    last = len(chars) - 1
    for k, ch in enumerate(chars):
        if not unicodedata.category(ch).startswith("P"):
            continue
        inside_word = (
            ch in _APOSTROPHES and 0 < k < last and text[k - 1].isalnum() and text[k + 1].isalnum()
        )
        chars[k] = "'" if inside_word else " "
    return "".join(chars)


# Letters, marks and numerals of the Han, Hiragana, Katakana and Hangul scripts, plus the CJK
# radicals (half-width kana, jamo, hentaigana, compatibility ideographs and planes 2-3 included;
# the kana punctuation ゠ ・ and the spacing sound marks ゛ ゜ are not).
_CJK = (
    "\u1100-\u11ff\u2e80-\u2fdf\u3005\u3007\u3021-\u3029\u302e\u302f\u3038-\u303b"
    "\u3041-\u309a\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff\u3130-\u318f\u31f0-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff66-\uff9f"
    "\uffa0-\uffdc\U0001aff0-\U0001b16f\U00020000-\U0003ffff"
)
_AUTO_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def tokenize(text: str, unit: str = "auto") -> list[str]:
    """Split text into scoring tokens.

    ``"word"``: whitespace-separated words. ``"char"``: every non-whitespace character.
    ``"auto"``: each Han / Hiragana / Katakana / Hangul character is a token, other runs of
    non-whitespace are split at whitespace (``"我们 use GPU加速"`` ->
    ``['我', '们', 'use', 'GPU', '加', '速']``).
    """
    if unit == "word":
        return text.split()
    if unit == "char":
        return [ch for ch in text if not ch.isspace()]
    if unit == "auto":
        return _AUTO_TOKEN.findall(text)
    raise UnsupportedOptionError(f"unknown unit {unit!r}; expected one of {', '.join(UNITS)}")


# --------------------------------------------------------------------------- corpus metrics


def _as_list(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _pair_counts(ref: str, hyp: str, unit: str, normalize: bool) -> ErrorCounts:
    if normalize:
        ref, hyp = normalize_text(ref), normalize_text(hyp)
    return align(tokenize(ref, unit), tokenize(hyp, unit))[0]


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise UnsupportedOptionError(f"unknown unit {unit!r}; expected one of {', '.join(UNITS)}")


def error_counts(
    refs: str | Sequence[str],
    hyps: str | Sequence[str],
    unit: str = "auto",
    normalize: bool = True,
) -> ErrorCounts:
    """Summed counts over the pairs ``zip(refs, hyps)`` (a single string is one pair)."""
    refs, hyps = _as_list(refs), _as_list(hyps)
    if len(refs) != len(hyps):
        raise MetricsInputError(f"{len(refs)} references but {len(hyps)} hypotheses")
    _check_unit(unit)
    total = ErrorCounts()
    for ref, hyp in zip(refs, hyps):
        total = total + _pair_counts(ref, hyp, unit, normalize)
    return total


def error_rate(
    refs: str | Sequence[str], hyps: str | Sequence[str], unit: str = "auto", normalize: bool = True
) -> float:
    """Corpus error rate (a fraction) in the given unit."""
    return error_counts(refs, hyps, unit, normalize).rate


def wer(refs: str | Sequence[str], hyps: str | Sequence[str], normalize: bool = True) -> float:
    """Corpus word error rate (a fraction)."""
    return error_rate(refs, hyps, "word", normalize)


def cer(refs: str | Sequence[str], hyps: str | Sequence[str], normalize: bool = True) -> float:
    """Corpus character error rate (a fraction); whitespace is not counted (unlike jiwer.cer)."""
    return error_rate(refs, hyps, "char", normalize)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class UtteranceScore:
    """One scored utterance: its id, the texts as given, and its counts."""

    id: str
    ref: str
    hyp: str
    counts: ErrorCounts

    def to_dict(self) -> dict:
        return {"id": self.id, "ref": self.ref, "hyp": self.hyp, **_counts_row(self.counts)}


@dataclass(frozen=True)
class EvalReport:
    """Per-utterance and total counts of an evaluation set (``speechrt eval``)."""

    unit: str
    normalized: bool
    utterances: tuple[UtteranceScore, ...]

    @property
    def totals(self) -> ErrorCounts:
        return sum((u.counts for u in self.utterances), ErrorCounts())

    @classmethod
    def from_texts(
        cls,
        ids: Sequence[str],
        refs: Sequence[str],
        hyps: Sequence[str],
        unit: str = "auto",
        normalize: bool = True,
    ) -> EvalReport:
        if not len(ids) == len(refs) == len(hyps):
            raise MetricsInputError(
                f"{len(ids)} ids, {len(refs)} references and {len(hyps)} hypotheses"
            )
        _check_unit(unit)
        rows = tuple(
            UtteranceScore(str(i), r, h, _pair_counts(r, h, unit, normalize))
            for i, r, h in zip(ids, refs, hyps)
        )
        return cls(unit, normalize, rows)

    def to_dict(self) -> dict:
        """JSON-serialisable: unit, normalized, num_utterances, totals, utterances (rows)."""
        return {
            "unit": self.unit,
            "normalized": self.normalized,
            "num_utterances": len(self.utterances),
            "totals": _counts_row(self.totals),
            "utterances": [u.to_dict() for u in self.utterances],
        }


def _counts_row(counts: ErrorCounts) -> dict:
    return {**counts.to_dict(), "rate_percent": 100.0 * counts.rate}


def report(
    ids: Sequence[str],
    refs: Sequence[str],
    hyps: Sequence[str],
    unit: str = "auto",
    normalize: bool = True,
) -> dict:
    """``EvalReport.from_texts(...).to_dict()``: totals and rows with S, D, I, hits, N, rate, %."""
    return EvalReport.from_texts(ids, refs, hyps, unit, normalize).to_dict()
