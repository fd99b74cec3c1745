"""Resolve a Whisper model name or Hugging Face repo id to a local directory (lazy import)."""

from __future__ import annotations

import re
from pathlib import Path

from speechrt.errors import ModelFormatError
from speechrt.models.whisper.config import PRESETS

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what the converter reads: configs and safetensors weights.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
]


def repo_id_for(name: str) -> str | None:
    """ "tiny" -> "openai/whisper-tiny"; "org/name" stays; anything else -> None."""
    if name in PRESETS:
        return f"openai/whisper-{name}"
    return name if _REPO_ID.match(name) else None


def resolve_model_path(
    name: str | Path, cache_dir: str | Path | None = None, local_files_only: bool = False
) -> Path:
    """An existing path as is; else a model name or repo id fetched (or found, with
    ``local_files_only``) by ``huggingface_hub.snapshot_download`` in ``cache_dir``."""
    path = Path(name)
    if path.exists():
        return path
    repo = repo_id_for(str(name))
    if repo is None:
        raise ModelFormatError(f"model path not found: {name}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelFormatError(
            f"{name} is not a local path; resolving model names needs `pip install huggingface_hub`"
        ) from None
    try:
        local = snapshot_download(
            repo,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=local_files_only,
            allow_patterns=ALLOW_PATTERNS,
        )
    except Exception as e:  # noqa: BLE001 - hub errors (offline, missing repo) have many types
        raise ModelFormatError(f"cannot fetch Whisper model {repo!r}: {e}") from None
    return Path(local)
