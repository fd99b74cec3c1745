"""Whisper's tokenizer on tiktoken, with the vocabularies shipped in ``speechrt/assets/whisper``.

Token layout (ids follow the BPE ranks): ``<|endoftext|>``, ``<|startoftranscript|>``, one token
per language (table order below, the first ``num_languages``), ``<|translate|>``,
``<|transcribe|>``, ``<|startoflm|>``, ``<|startofprev|>``, ``<|nospeech|>``,
``<|notimestamps|>`` and 1501 timestamps ``<|0.00|>`` .. ``<|30.00|>`` (0.02 s apart).
"""

from __future__ import annotations

import base64
import functools
import string
from pathlib import Path

import tiktoken

from speechrt.errors import UnsupportedOptionError

_ASSETS = Path(__file__).resolve().parents[2] / "assets" / "whisper"

# GPT-2's pre-tokenisation pattern (contractions, letters, numbers, other symbols, spaces).
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# "code:name" in token order (the order fixes the token ids); "_" stands for a space.
_LANGUAGE_TABLE = """
en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese
pt:portuguese tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian
id:indonesian hi:hindi fi:finnish vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay
cs:czech ro:romanian da:danish hu:hungarian ta:tamil no:norwegian th:thai ur:urdu hr:croatian
bg:bulgarian lt:lithuanian la:latin mi:maori ml:malayalam cy:welsh sk:slovak te:telugu
fa:persian lv:latvian bn:bengali sr:serbian az:azerbaijani sl:slovenian kn:kannada et:estonian
mk:macedonian br:breton eu:basque is:icelandic hy:armenian ne:nepali mn:mongolian bs:bosnian
kk:kazakh sq:albanian sw:swahili gl:galician mr:marathi pa:punjabi si:sinhala km:khmer sn:shona
yo:yoruba so:somali af:afrikaans oc:occitan ka:georgian be:belarusian tg:tajik sd:sindhi
gu:gujarati am:amharic yi:yiddish lo:lao uz:uzbek fo:faroese ht:haitian_creole ps:pashto
tk:turkmen nn:nynorsk mt:maltese sa:sanskrit lb:luxembourgish my:myanmar bo:tibetan tl:tagalog
mg:malagasy as:assamese tt:tatar haw:hawaiian ln:lingala ha:hausa ba:bashkir jw:javanese
su:sundanese yue:cantonese
"""
LANGUAGES: dict[str, str] = {
    code: name.replace("_", " ")
    for code, name in (pair.split(":") for pair in _LANGUAGE_TABLE.split())
}
_ALIASES = {
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
    "castilian": "es", "mandarin": "zh",
}  # fmt: skip
TO_LANGUAGE_CODE: dict[str, str] = {name: code for code, name in LANGUAGES.items()} | _ALIASES

TASKS = ("transcribe", "translate")
# Languages written without spaces: words are split at unicode boundaries instead.
_NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


def normalize_language(language: str) -> str:
    """A language code or name (any case) -> its code; UnsupportedOptionError when unknown."""
    key = language.lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise UnsupportedOptionError(f"unknown Whisper language {language!r}")


def _special_names(num_languages: int) -> list[str]:
    languages = [f"<|{code}|>" for code in list(LANGUAGES)[:num_languages]]
    control = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>"]
    control += ["<|nospeech|>", "<|notimestamps|>"]
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    return ["<|endoftext|>", "<|startoftranscript|>", *languages, *control, *timestamps]


@functools.cache
def get_encoding(name: str, num_languages: int) -> tiktoken.Encoding:
    """The tiktoken encoding ``name`` ("multilingual" or "gpt2") with Whisper's special tokens."""
    ranks: dict[bytes, int] = {}
    with open(_ASSETS / f"{name}.tiktoken", encoding="ascii") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    specials = {tok: len(ranks) + i for i, tok in enumerate(_special_names(num_languages))}
    return tiktoken.Encoding(
        name=f"whisper-{name}-{num_languages}",
        explicit_n_vocab=len(ranks) + len(specials),
        pat_str=_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=specials,
    )


class WhisperTokenizer:
    """Text <-> token ids for one (vocabulary, language, task) choice.

    ``sot_sequence`` is ``(sot, language, task)`` for multilingual models and ``(sot,)`` for
    English-only ones.
    """

    def __init__(
        self,
        multilingual: bool,
        num_languages: int = 99,
        language: str | None = None,
        task: str | None = None,
    ) -> None:
        if task is not None and task not in TASKS:
            raise UnsupportedOptionError(f"unknown Whisper task {task!r}; use one of {TASKS}")
        if language is not None:
            language = normalize_language(language)
            if language not in list(LANGUAGES)[:num_languages]:
                raise UnsupportedOptionError(f"language {language!r} is not in this vocabulary")
        if multilingual:
            language, task = language or "en", task or "transcribe"
        else:
            language, task = None, None
        self.multilingual = multilingual
        self.num_languages = num_languages
        self.language = language
        self.task = task
        self.encoding = get_encoding("multilingual" if multilingual else "gpt2", num_languages)
        self._special = {
            name: self.encoding.encode_single_token(name)
            for name in self.encoding.special_tokens_set
        }  # name -> id

    def with_options(self, language: str | None, task: str | None) -> WhisperTokenizer:
        """The same vocabulary with another language/task (one shared instance per choice:
        building one maps every special token, ~2 ms, and decoding asks once per window)."""
        return get_tokenizer(self.multilingual, self.num_languages, language, task)

    # --- special tokens -------------------------------------------------------------------
    def special(self, name: str) -> int:
        """Id of a special token by its text, e.g. ``"<|nospeech|>"``."""
        return self._special[name]

    @property
    def eot(self) -> int:
        return self._special["<|endoftext|>"]

    @property
    def sot(self) -> int:
        return self._special["<|startoftranscript|>"]

    @property
    def sot_prev(self) -> int:
        return self._special["<|startofprev|>"]

    @property
    def sot_lm(self) -> int:
        return self._special["<|startoflm|>"]

    @property
    def transcribe(self) -> int:
        return self._special["<|transcribe|>"]

    @property
    def translate(self) -> int:
        return self._special["<|translate|>"]

    @property
    def no_speech(self) -> int:
        return self._special["<|nospeech|>"]

    @property
    def no_timestamps(self) -> int:
        return self._special["<|notimestamps|>"]

    @property
    def timestamp_begin(self) -> int:
        return self._special["<|0.00|>"]

    def to_language_token(self, language: str) -> int:
        """Id of ``<|code|>`` for a language code or name."""
        code = normalize_language(language)
        token = self._special.get(f"<|{code}|>")
        if token is None:
            raise UnsupportedOptionError(f"language {code!r} is not in this vocabulary")
        return token

    @property
    def language_token(self) -> int:
        if self.language is None:
            raise UnsupportedOptionError("this (English-only) tokenizer has no language token")
        return self.to_language_token(self.language)

    @functools.cached_property
    def all_language_codes(self) -> tuple[str, ...]:
        return tuple(LANGUAGES)[: self.num_languages]

    @functools.cached_property
    def all_language_tokens(self) -> tuple[int, ...]:
        return tuple(self._special[f"<|{code}|>"] for code in self.all_language_codes)

    @property
    def sot_sequence(self) -> tuple[int, ...]:
        seq = [self.sot]
        if self.language is not None:
            seq.append(self.to_language_token(self.language))
        if self.task is not None:
            seq.append(self.transcribe if self.task == "transcribe" else self.translate)
        return tuple(seq)

    @property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        return (*self.sot_sequence, self.no_timestamps)

    @functools.cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Tokens to suppress so the model does not write speaker tags or sound annotations
        (``♪♪``, ``( SPEAKING FOREIGN LANGUAGE )``, ``[DAVID]``); basic punctuation is kept."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        # U+2640..U+267F symbols share their first UTF-8 bytes: suppress the first token.
        music = set("♩♪♫♬♭♮♯")
        # A hyphen or quote may join words but not start one.
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(music):
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                if len(ids) == 1 or symbol in music:
                    result.add(ids[0])
        return tuple(sorted(result))

    # --- text ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (special-token text is encoded as ordinary text)."""
        return self.encoding.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, timestamp tokens dropped (other special tokens kept as text)."""
        return self.encoding.decode([t for t in ids if t < self.timestamp_begin])

    def decode_with_timestamps(self, ids: list[int]) -> str:
        """Ids -> text with timestamps written as ``<|1.08|>``."""
        return self.encoding.decode(list(ids))

    # --- words (for word timestamps) ----------------------------------------------------
    def split_to_word_tokens(self, ids: list[int]) -> tuple[list[str], list[list[int]]]:
        """Group ids into words: at spaces, or at unicode boundaries for zh/ja/th/lo/my/yue."""
        if self.language in _NO_SPACE_LANGUAGES:
            return self._split_on_unicode(ids)
        return self._split_on_spaces(ids)

    def _split_on_unicode(self, ids: list[int]) -> tuple[list[str], list[list[int]]]:
        full = self.decode_with_timestamps(ids)
        words: list[str] = []
        groups: list[list[int]] = []
        current: list[int] = []
        offset = 0
        for token in ids:
            current.append(token)
            text = self.decode_with_timestamps(current)
            bad = text.find("\ufffd")
            if bad < 0 or full[offset + bad] == "\ufffd":
                words.append(text)
                groups.append(current)
                current = []
                offset += len(text)
        return words, groups

    def _split_on_spaces(self, ids: list[int]) -> tuple[list[str], list[list[int]]]:
        words: list[str] = []
        groups: list[list[int]] = []
        for piece, piece_ids in zip(*self._split_on_unicode(ids)):
            starts_word = (
                piece_ids[0] >= self.eot
                or piece.startswith(" ")
                or piece.strip() in string.punctuation
                or not words
            )
            if starts_word:
                words.append(piece)
                groups.append(list(piece_ids))
            else:
                words[-1] += piece
                groups[-1].extend(piece_ids)
        return words, groups


@functools.cache
def get_tokenizer(
    multilingual: bool,
    num_languages: int = 99,
    language: str | None = None,
    task: str | None = None,
) -> WhisperTokenizer:
    """A tokenizer for a model's vocabulary; ``language`` is a code or name (e.g. "German").
    One shared (read-only) instance per choice."""
    return WhisperTokenizer(multilingual, num_languages, language, task)
