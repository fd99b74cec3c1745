"""Result types returned by the public API: plain frozen dataclasses, lists not generators."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Word:
    """One word with its time span in seconds and its probability."""

    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    """A time span of a transcript (Whisper-style)."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    """The recognition result of one input.

    ``text`` is the detokenised text, ``tokens`` the model's token ids (no special tokens),
    ``score`` the decoding method's score of the chosen hypothesis (log domain; what WeNet reports
    for the same method).
    """

    text: str
    tokens: tuple[int, ...]
    score: float
    language: str | None = None
    segments: tuple[Segment, ...] = ()
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens"] = list(self.tokens)
        return d
