"""Exceptions raised by speechrt.

Every error a user can cause (a bad file, a bad option, a checkpoint that does not fit its
config) is a :class:`SpeechrtError` whose message names the problem in one line; the CLI prints
that line and exits non-zero, a server turns it into a 4xx answer. Anything else is a bug.
"""

from __future__ import annotations


class SpeechrtError(Exception):
    """Base class of every error caused by user input."""


class AudioError(SpeechrtError):
    """Audio that cannot be used: missing, unreadable, corrupt, empty, silent or too long."""


class ModelFormatError(SpeechrtError):
    """A model path that is not a model speechrt can load, or a checkpoint that does not fit."""


class UnsupportedOptionError(SpeechrtError):
    """An option the model or the method cannot honour (e.g. streaming on a non-chunk model)."""
