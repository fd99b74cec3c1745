"""Whisper (OpenAI .pt and Hugging Face checkpoints): network, tokenizer, decoding, transcribe.

Entry points for :func:`speechrt.load_model`: :func:`is_whisper_checkpoint` and
:func:`load_whisper`.
"""

from __future__ import annotations

from speechrt.models.whisper.config import PRESETS, WhisperDims, preset
from speechrt.models.whisper.convert import is_whisper_checkpoint, read_checkpoint
from speechrt.models.whisper.runtime import WhisperModel, load_whisper

__all__ = [
    "PRESETS",
    "WhisperDims",
    "WhisperModel",
    "is_whisper_checkpoint",
    "load_whisper",
    "preset",
    "read_checkpoint",
]
