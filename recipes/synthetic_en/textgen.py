"""English sentences from a simple grammar over a core lexicon and a dictionary word list.

The dictionary (Debian ``wamerican``'s ``/usr/share/dict/words``: ~100k words, names and
possessives) supplies variety; words are sorted into rough classes by their endings (``-ly``
adverbs, ``-ous`` adjectives, ``-ed`` verbs, ...). The hand-written :mod:`lexicon` supplies the
frequent core. Sentences are lower case ``a-z``, apostrophe and single spaces, the units the model
is trained on.

Splits are disjoint by construction: the held-out test sentences are drawn first from their own
seed, and training sentences equal to a test sentence, or containing any held-out transcript line
(LibriSpeech) as a run of whole words, are rejected.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from . import lexicon as lx

ALLOWED = re.compile(r"^[a-z']+$")
VOWELS = set("aeiou")
DOUBLE_FINAL = {"stop", "drop", "plan", "shop", "skip", "step", "clap", "rob", "beg", "grab"}
MAX_WORDS = 22


def normalize(text: str) -> str:
    """Lower-case; keep a-z and apostrophes; everything else separates words (single spaces)."""
    text = re.sub(r"[^a-z']+", " ", text.lower())
    return " ".join(w.strip("'") for w in text.split() if w.strip("'"))


def plural(noun: str) -> str:
    if noun in lx.IRREGULAR_PLURALS:
        return lx.IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


def third_person(verb: str) -> str:
    if verb in ("go", "do"):
        return verb + "es"
    if verb == "have":
        return "has"
    return plural(verb) if verb not in lx.IRREGULAR_PLURALS else verb + "s"


def past(verb: str) -> str:
    if verb in lx.IRREGULAR_VERBS:
        return lx.IRREGULAR_VERBS[verb][0]
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2:-1] not in VOWELS:
        return verb[:-1] + "ied"
    if verb in DOUBLE_FINAL:
        return verb + verb[-1] + "ed"
    return verb + "ed"


def participle(verb: str) -> str:
    return lx.IRREGULAR_VERBS[verb][1] if verb in lx.IRREGULAR_VERBS else past(verb)


def gerund(verb: str) -> str:
    if verb.endswith("ie"):
        return verb[:-2] + "ying"
    if verb.endswith("e") and not verb.endswith(("ee", "ye")) and verb != "be":
        return verb[:-1] + "ing"
    if verb in DOUBLE_FINAL or verb in {"run", "swim", "sit", "hit", "cut", "win", "dig"}:
        return verb + verb[-1] + "ing"
    return verb + "ing"


@dataclass(frozen=True)
class Dictionary:
    """Dictionary words sorted into rough classes by their endings."""

    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    adverbs: tuple[str, ...]
    past_verbs: tuple[str, ...]
    gerunds: tuple[str, ...]
    names: tuple[str, ...]
    possessives: tuple[str, ...]

    @property
    def all_words(self) -> tuple[str, ...]:
        return self.nouns + self.adjectives + self.adverbs + self.past_verbs + self.gerunds


_ADJ_ENDINGS = ("ous", "ful", "ive", "able", "ible", "ical", "less", "ish", "ary", "some")


def _word_class(word: str) -> str:
    if word.endswith("ly") and len(word) > 4:
        return "adverbs"
    if word.endswith(_ADJ_ENDINGS) and len(word) > 5:
        return "adjectives"
    if word.endswith("ing") and len(word) > 5:
        return "gerunds"
    if word.endswith("ed") and len(word) > 4:
        return "past_verbs"
    return "nouns"


def load_dictionary(path: str | Path, max_len: int = 14) -> Dictionary:
    """Read a one-word-per-line list; classify lower-case words, keep names and possessives."""
    classes: dict[str, list[str]] = {
        k: [] for k in ("nouns", "adjectives", "adverbs", "past_verbs", "gerunds")
    }
    names, possessives = [], []
    text = Path(path).read_text(encoding="utf-8", errors="ignore")
    for raw in sorted(set(text.split())):
        word = raw.lower()
        if not ALLOWED.match(word) or len(word) > max_len or len(word) < 2:
            continue
        if word.endswith("'s"):
            if raw[0].islower() and len(word) > 4:
                possessives.append(word)
            continue
        if "'" in word:
            continue
        if raw[0].isupper():
            names.append(word)
        else:
            classes[_word_class(word)].append(word)
    return Dictionary(
        **{k: tuple(v) for k, v in classes.items()},
        names=tuple(sorted(set(names))),
        possessives=tuple(possessives),
    )


class SentenceGenerator:
    """Draws sentences from a small English grammar. ``p_dict``: share of dictionary words."""

    def __init__(self, dictionary: Dictionary, rng: random.Random, p_dict: float = 0.35):
        self.d = dictionary
        self.rng = rng
        self.p_dict = p_dict
        self.templates = (
            (self._declarative, 30), (self._copula, 10), (self._compound, 10),
            (self._question, 8), (self._imperative, 6), (self._there_is, 5),
            (self._word_list, 8), (self._numbers, 5), (self._possessive, 6),
            (self._contraction, 7), (self._interjection, 5),
        )
        self.weights = [w for _, w in self.templates]

    # -------------------------------------------------------------- words
    def _pick(self, core, extra=()):
        if extra and self.rng.random() < self.p_dict:
            return self.rng.choice(extra)
        return self.rng.choice(core)

    def _noun(self, plural_: bool) -> str:
        if self.rng.random() < self.p_dict:
            return self.rng.choice(self.d.nouns)  # dictionary nouns come inflected as they are
        noun = self.rng.choice(lx.NOUNS)
        return plural(noun) if plural_ else noun

    def _adj(self) -> str:
        return self._pick(lx.ADJECTIVES, self.d.adjectives)

    def _adv(self) -> str:
        return self._pick(lx.ADVERBS, self.d.adverbs)

    def _name(self) -> str:
        return self._pick(lx.FIRST_NAMES, self.d.names)

    def _np(self, plural_: bool | None = None, allow_pp: bool = True) -> list[str]:
        r = self.rng
        if plural_ is None:
            plural_ = r.random() < 0.3
        if plural_:
            det = r.choice(["the", "some", "these", "those", "many", "my", "our", "their",
                            r.choice(lx.NUMBER_WORDS[1:])])
        else:
            det = r.choice(lx.DETERMINERS)
        words = det.split()
        for _ in range(r.choices([0, 1, 2], [0.5, 0.4, 0.1])[0]):
            words.append(self._adj())
        words.append(self._noun(plural_))
        if allow_pp and r.random() < 0.2:
            words += [r.choice(lx.PREPOSITIONS)] + self._np(allow_pp=False)
        if words[0] == "a" and words[1][0] in VOWELS:
            words[0] = "an"
        return words

    def _subject(self) -> tuple[list[str], str]:
        """(words, person): person is '1s' (i), '3s' (singular) or 'pl'."""
        r = self.rng.random()
        if r < 0.3:
            p = self.rng.choice(lx.SUBJECT_PRONOUNS)
            return [p], {"i": "1s", "he": "3s", "she": "3s", "it": "3s"}.get(p, "pl")
        if r < 0.5:
            return [self._name()], "3s"
        plural_ = self.rng.random() < 0.35
        return self._np(plural_), "pl" if plural_ else "3s"

    def _object(self) -> list[str]:
        r = self.rng.random()
        if r < 0.15:
            return [self.rng.choice(lx.OBJECT_PRONOUNS)]
        if r < 0.25:
            return [self._name()]
        return self._np()

    def _verb(self) -> tuple[str, bool]:
        verb = self.rng.choice(list(lx.VERBS))
        return verb, lx.VERBS[verb]

    def _verb_phrase(self, person: str) -> list[str]:
        r = self.rng
        verb, transitive = self._verb()
        tense = r.choices(["past", "present", "future", "modal", "progressive", "perfect"],
                          [0.35, 0.2, 0.1, 0.1, 0.15, 0.1])[0]
        if tense == "past":
            if r.random() < self.p_dict * 0.5:
                words = [r.choice(self.d.past_verbs)]
            else:
                words = [past(verb)]
        elif tense == "present":
            words = [third_person(verb) if person == "3s" else verb]
        elif tense == "future":
            words = ["will", verb]
        elif tense == "modal":
            words = [r.choice(lx.MODALS), verb]
        elif tense == "progressive":
            be = {"1s": "am", "3s": "is", "pl": "are"}[person]
            if r.random() < 0.4:
                be = "were" if person == "pl" else "was"
            if r.random() < self.p_dict * 0.5:
                words = [be, r.choice(self.d.gerunds)]
            else:
                words = [be, gerund(verb)]
        else:
            words = ["has" if person == "3s" else "have", participle(verb)]
        if transitive:
            words += self._object()
        if r.random() < 0.3:
            words.append(self._adv())
        if r.random() < 0.35:
            words += [r.choice(lx.PREPOSITIONS)] + self._np(allow_pp=False)
        return words

    # -------------------------------------------------------------- templates
    def _declarative(self) -> list[str]:
        subj, person = self._subject()
        return subj + self._verb_phrase(person)

    def _copula(self) -> list[str]:
        subj, person = self._subject()
        be = {"1s": "am", "3s": "is", "pl": "are"}[person]
        if self.rng.random() < 0.4:
            be = "were" if person == "pl" else "was"
        words = subj + [be]
        if self.rng.random() < 0.3:
            words.append(self.rng.choice(["very", "not", "quite", "so", "really"]))
        return words + [self._adj()]

    def _compound(self) -> list[str]:
        return self._declarative() + [self.rng.choice(lx.CONJUNCTIONS)] + self._declarative()

    def _question(self) -> list[str]:
        r = self.rng
        subj, person = self._subject()
        verb, transitive = self._verb()
        aux = r.choice(["did", "will", "can", "should", "does" if person == "3s" else "do"])
        words = [r.choice(lx.QUESTION_WORDS)] if r.random() < 0.6 else []
        words += [aux] + subj + [verb]
        return words + self._object() if transitive else words

    def _imperative(self) -> list[str]:
        verb, transitive = self._verb()
        words = (["please"] if self.rng.random() < 0.3 else []) + [verb]
        words += self._object() if transitive else [self._adv()]
        if self.rng.random() < 0.5:
            words += [self.rng.choice(lx.PREPOSITIONS)] + self._np(allow_pp=False)
        return words

    def _there_is(self) -> list[str]:
        plural_ = self.rng.random() < 0.4
        be = ("are" if plural_ else "is") if self.rng.random() < 0.6 else (
            "were" if plural_ else "was")
        return ["there", be] + self._np(plural_, allow_pp=False) + [
            self.rng.choice(lx.PREPOSITIONS)] + self._np(allow_pp=False)

    def _word_list(self) -> list[str]:
        pool = self.d.all_words
        return [self.rng.choice(pool) for _ in range(self.rng.randint(2, 7))]

    def _numbers(self) -> list[str]:
        r = self.rng
        tens = r.choice(lx.NUMBER_WORDS[19:])
        count = [tens, r.choice(lx.NUMBER_WORDS[:9])] if r.random() < 0.5 else [
            r.choice(lx.NUMBER_WORDS[1:])]
        if r.random() < 0.3:
            count = [r.choice(lx.NUMBER_WORDS[:9]), "hundred", "and"] + count
        return count + [plural(r.choice(lx.NOUNS))] + self._verb_phrase("pl")

    def _possessive(self) -> list[str]:
        r = self.rng
        if r.random() < 0.3 and self.d.possessives:
            owner = [r.choice(self.d.possessives)]
        else:
            owner = [self._name() + "'s"]
        return owner + [self._noun(False)] + self._verb_phrase("3s")

    def _contraction(self) -> list[str]:
        r = self.rng
        c = r.choice(lx.CONTRACTIONS)
        if c.endswith("n't") and r.random() < 0.6:
            subj = r.choice(["i", "we", "they", "you"])
            tail = [c if c in ("don't", "didn't", "can't", "won't", "couldn't", "wouldn't")
                    else "don't", "think", "so"]
            return [subj] + tail if r.random() < 0.2 else [subj, tail[0]] + [
                self._verb()[0]] + self._object()
        return [c] + ([self._adj()] if r.random() < 0.5 else self._np())

    def _interjection(self) -> list[str]:
        return [self.rng.choice(lx.INTERJECTIONS)] + self._declarative()

    def sentence(self) -> str:
        """One sentence of 1..MAX_WORDS words (normalised)."""
        while True:
            make = self.rng.choices(self.templates, self.weights)[0][0]
            text = normalize(" ".join(make()))
            if 0 < len(text.split()) <= MAX_WORDS:
                return text


def contains_line(sentence: str, lines: list[str]) -> bool:
    """True if any of ``lines`` (normalised) occurs in ``sentence`` as a run of whole words."""
    padded = f" {sentence} "
    return any(f" {line} " in padded for line in lines if line)


def read_transcripts(path: str | Path) -> list[str]:
    """Kaldi/LibriSpeech ``<id> <TEXT>`` lines -> normalised texts."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and normalize(parts[1]):
            out.append(normalize(parts[1]))
    return out


def generate_sentences(
    n: int,
    seed: int,
    dictionary: Dictionary,
    exclude: set[str] | frozenset[str] = frozenset(),
    forbidden_lines: list[str] | None = None,
) -> list[str]:
    """``n`` distinct sentences from ``seed``, none in ``exclude``, none containing a forbidden
    line. Deterministic for a given (n, seed, dictionary, exclude, forbidden_lines)."""
    gen = SentenceGenerator(dictionary, random.Random(seed))
    forbidden = sorted(set(forbidden_lines or ()))
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        s = gen.sentence()
        if s in seen or s in exclude or (forbidden and contains_line(s, forbidden)):
            continue
        seen.add(s)
        out.append(s)
    return out
