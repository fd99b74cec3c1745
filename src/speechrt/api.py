"""The public model facade shared by every family, and the decode options WeNet users know.

``speechrt.load_model(path)`` returns a :class:`Model`; its ``transcribe`` takes audio (a path,
bytes, an array with a sample rate, or a list of those) and returns a :class:`Transcript` (a list
for a list). ``encode``/``decode`` work on features for programs that bring their own front-end.
"""

from __future__ import annotations

from dataclasses import dataclass

from speechrt.errors import UnsupportedOptionError

METHODS = ("ctc_greedy_search", "ctc_prefix_beam_search", "attention", "attention_rescoring")


@dataclass(frozen=True)
class DecodeOptions:
    """WeNet's decoding options, names and defaults (``wenet/bin/recognize.py``).

    decoding_chunk_size: -1 full attention; > 0 chunk attention of that many encoder frames (only
    for models trained with dynamic or static chunks). simulate_streaming: run the encoder chunk by
    chunk with attention and convolution caches (batch 1 per utterance), as a streaming server does.
    """

    method: str = "attention_rescoring"
    beam_size: int = 10
    ctc_weight: float = 0.5
    reverse_weight: float = 0.0
    decoding_chunk_size: int = -1
    num_decoding_left_chunks: int = -1
    simulate_streaming: bool = False
    length_penalty: float = 0.0  # method "attention": rank final beams by score / len**penalty

    def __post_init__(self):
        if self.method not in METHODS:
            raise UnsupportedOptionError(
                f"unknown decoding method '{self.method}' (choose from {', '.join(METHODS)})"
            )
        if self.beam_size < 1:
            raise UnsupportedOptionError(f"beam_size must be >= 1, got {self.beam_size}")
        if not 0.0 <= self.reverse_weight <= 1.0:
            raise UnsupportedOptionError(
                f"reverse_weight must be in [0, 1], got {self.reverse_weight}"
            )
        if self.length_penalty < 0:
            raise UnsupportedOptionError(f"length_penalty must be >= 0, got {self.length_penalty}")
        if self.ctc_weight < 0:
            raise UnsupportedOptionError(f"ctc_weight must be >= 0, got {self.ctc_weight}")
        if self.decoding_chunk_size == 0 or self.decoding_chunk_size < -1:
            raise UnsupportedOptionError(
                "decoding_chunk_size must be -1 (full attention) or > 0 (chunk size), "
                f"got {self.decoding_chunk_size}"
            )
        if self.num_decoding_left_chunks < -1:
            raise UnsupportedOptionError(
                f"num_decoding_left_chunks must be >= -1, got {self.num_decoding_left_chunks}"
            )
        if self.simulate_streaming and self.decoding_chunk_size <= 0:
            raise UnsupportedOptionError("simulate_streaming needs decoding_chunk_size > 0")


class Model:
    """Facade every model family implements (see :mod:`speechrt.models`)."""

    family: str = "abstract"
    sample_rate: int = 16000

    def transcribe(self, audio, **options):  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, feats, lengths, **options):  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, feats, lengths, **options):  # pragma: no cover - interface
        raise NotImplementedError
