"""Whisper model dimensions: a frozen, validated config with presets by exact name."""

from __future__ import annotations

from dataclasses import dataclass, fields

from speechrt.errors import ModelFormatError

# The token layout fixes the vocabulary: 50257 (multilingual) or 50256 (English) BPE ranks,
# then <|endoftext|>/<|startoftranscript|>, the language tokens, 6 task/control tokens and 1501
# timestamps. ``n_vocab - 51765`` is the number of language tokens plus one for multilingual.
_MIN_VOCAB = 51864
_BASE_VOCAB = 51765


@dataclass(frozen=True)
class WhisperDims:
    """The ten numbers that define a Whisper network (names as in OpenAI's checkpoints).

    The audio encoder takes ``(B, n_mels, 2 * n_audio_ctx)`` log-mel frames and returns
    ``(B, n_audio_ctx, n_audio_state)``; the text decoder takes up to ``n_text_ctx`` tokens.
    """

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelFormatError(
                    f"WhisperDims.{f.name} must be a positive int, got {value!r}"
                )
        if self.n_audio_state % self.n_audio_head:
            raise ModelFormatError(
                f"n_audio_state {self.n_audio_state} is not divisible by n_audio_head "
                f"{self.n_audio_head}"
            )
        if self.n_text_state % self.n_text_head:
            raise ModelFormatError(
                f"n_text_state {self.n_text_state} is not divisible by n_text_head "
                f"{self.n_text_head}"
            )
        if self.n_audio_state % 2 or self.n_audio_state < 4:
            raise ModelFormatError(
                f"n_audio_state must be even and >= 4 (sinusoids), got {self.n_audio_state}"
            )
        if self.n_vocab < _MIN_VOCAB:
            raise ModelFormatError(
                f"n_vocab {self.n_vocab} is smaller than Whisper's token layout ({_MIN_VOCAB})"
            )

    @property
    def is_multilingual(self) -> bool:
        """True for the multilingual vocabulary (51865 or more tokens)."""
        return self.n_vocab >= _MIN_VOCAB + 1

    @property
    def num_languages(self) -> int:
        """Number of language tokens in the vocabulary (99, or 100 from large-v3 on)."""
        return self.n_vocab - _BASE_VOCAB - int(self.is_multilingual)

    def to_dict(self) -> dict[str, int]:
        """The dims as OpenAI's checkpoint ``dims`` dictionary."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _dims(n_mels: int, width: int, heads: int, enc: int, dec: int, vocab: int) -> WhisperDims:
    return WhisperDims(n_mels, 1500, width, heads, enc, vocab, 448, width, heads, dec)


PRESETS: dict[str, WhisperDims] = {
    "tiny.en": _dims(80, 384, 6, 4, 4, 51864),
    "tiny": _dims(80, 384, 6, 4, 4, 51865),
    "base.en": _dims(80, 512, 8, 6, 6, 51864),
    "base": _dims(80, 512, 8, 6, 6, 51865),
    "small.en": _dims(80, 768, 12, 12, 12, 51864),
    "small": _dims(80, 768, 12, 12, 12, 51865),
    "medium.en": _dims(80, 1024, 16, 24, 24, 51864),
    "medium": _dims(80, 1024, 16, 24, 24, 51865),
    "large-v2": _dims(80, 1280, 20, 32, 32, 51865),
    "large-v3": _dims(128, 1280, 20, 32, 32, 51866),
    "large-v3-turbo": _dims(128, 1280, 20, 32, 4, 51866),
}


def preset(name: str) -> WhisperDims:
    """The dims of the released model ``name`` (exact name, e.g. ``"large-v3"``)."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(PRESETS)
        raise ModelFormatError(f"unknown Whisper preset {name!r}; known: {known}") from None
