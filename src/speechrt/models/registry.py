"""Detect a model's format from its path and load it with the right family (lazy imports)."""

from __future__ import annotations

from pathlib import Path

from speechrt.errors import ModelFormatError

# Models shipped inside the package (speechrt/assets/models/<name>), usable by name.
DEFAULT_MODEL = "synthetic_en"
BUNDLED_MODELS = ("synthetic_en",)


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The directory of a model shipped with speechrt (``DEFAULT_MODEL``: the small English
    Conformer of ``recipes/synthetic_en``, trained on synthetic speech)."""
    if name not in BUNDLED_MODELS:
        raise ModelFormatError(
            f"no bundled model named '{name}' (bundled: {', '.join(BUNDLED_MODELS)})"
        )
    return Path(__file__).resolve().parents[1] / "assets" / "models" / name


def resolve_model_path(path: str | Path | None) -> Path:
    """None -> the bundled default model; a bundled model's name -> its directory, unless a
    local path of that name is itself a model (e.g. the recipe's own ``synthetic_en`` folder is
    not); anything else unchanged."""
    if path is None:
        return bundled_model_dir()
    name = str(path).rstrip("/")
    if name in BUNDLED_MODELS:
        try:
            detect_format(path)
        except ModelFormatError:
            return bundled_model_dir(name)
    return Path(path)


def detect_format(path: str | Path) -> str:
    """Return 'wenet', 'whisper' or 'conformer_moe' for a path, or raise ModelFormatError."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"model path not found: {p}")
    if p.is_dir():
        if (p / "train.yaml").is_file():
            return "wenet"
        if (p / "final.nnet").is_file() and (p / "config.yaml").is_file():
            return "conformer_moe"
        if (p / "config.json").is_file():
            return "whisper"
        raise ModelFormatError(
            f"{p} is not a model directory speechrt knows (WeNet: train.yaml + .pt; "
            "Hugging Face Whisper: config.json; 3M-ASR: config.yaml + final.nnet)"
        )
    if p.suffix == ".pt":
        return "whisper"
    raise ModelFormatError(f"{p} is not a model speechrt knows (a directory or a Whisper .pt)")


def check_device(device) -> None:
    """Raise a one-line error for a device this machine cannot use (None = pick automatically)."""
    import torch

    from speechrt.errors import UnsupportedOptionError

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UnsupportedOptionError(f"unknown device '{device}' (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedOptionError(f"device '{device}' requested but no CUDA GPU is visible")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UnsupportedOptionError(
                f"device '{device}' does not exist ({torch.cuda.device_count()} GPU(s) visible)"
            )
    elif dev.type != "cpu":
        raise UnsupportedOptionError(f"device '{device}' is not supported (cpu, cuda, cuda:N)")


def load_model(path=None, device=None, dtype=None):
    """``speechrt.load_model``: detect the format and load (None: the bundled default model)."""
    check_device(device)
    path = resolve_model_path(path)
    fmt = detect_format(path)
    if fmt == "wenet":
        from speechrt.models.conformer import load_wenet

        return load_wenet(path, device=device, dtype=dtype)
    if fmt == "whisper":
        try:
            from speechrt.models.whisper import is_whisper_checkpoint, load_whisper
        except ImportError as e:  # pragma: no cover - until the family lands
            raise ModelFormatError(f"Whisper support is not available: {e}") from None
        if not is_whisper_checkpoint(path):
            raise ModelFormatError(f"{path} is not a Whisper checkpoint")
        from speechrt.engine.precision import parse_dtype

        return load_whisper(
            path, device=device, dtype=None if dtype is None else parse_dtype(dtype)
        )
    try:
        from speechrt.models.conformer_moe import load_conformer_moe
    except ImportError as e:  # pragma: no cover - until the family lands
        raise ModelFormatError(f"3M-ASR Conformer-MoE support is not available: {e}") from None
    return load_conformer_moe(path, device=device, dtype=dtype)
