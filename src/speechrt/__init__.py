"""speechrt: fast, exact inference for transformer speech recognition.

Public surface::

    import speechrt
    model = speechrt.load_model("path/to/wenet_model_dir")  # or () for the bundled default
    print(model.transcribe("audio.wav").text)
"""

from __future__ import annotations

from speechrt.errors import (
    AudioError,
    ModelFormatError,
    SpeechrtError,
    UnsupportedOptionError,
)
from speechrt.results import Segment, Transcript, Word

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "ModelFormatError",
    "Segment",
    "SpeechrtError",
    "Transcript",
    "UnsupportedOptionError",
    "Word",
    "load_model",
    "__version__",
]


def load_model(path=None, device=None, dtype=None):
    """Load a model from ``path``; the format is detected from its contents.

    ``path`` None (or ``"synthetic_en"``) loads the small English model shipped with speechrt
    (trained on synthetic espeak-ng speech by ``recipes/synthetic_en``; see its MODEL.md)."""
    from speechrt.models.registry import load_model as _load

    return _load(path, device=device, dtype=dtype)
