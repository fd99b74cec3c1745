"""Load a WeNet model directory: train.yaml + a .pt checkpoint + units + (optional) global_cmvn."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from speechrt.engine.precision import Precision, parse_dtype
from speechrt.errors import ModelFormatError, UnsupportedOptionError
from speechrt.models.conformer.config import ModelConfig, parse_train_yaml
from speechrt.models.conformer.convert import convert_wenet_state_dict
from speechrt.models.conformer.model import ConformerASR
from speechrt.models.conformer.recognizer import WenetModel
from speechrt.models.conformer.tokenizer import SymbolTable

CONFIG_NAMES = ("train.yaml",)
UNIT_NAMES = ("units.txt", "words.txt", "tokens.txt")


def is_wenet_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / n).is_file() for n in CONFIG_NAMES)


def _checkpoint(path: Path) -> Path:
    final = path / "final.pt"
    if final.is_file():
        return final
    cands = sorted(path.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not cands:
        raise ModelFormatError(f"{path} has train.yaml but no .pt checkpoint (expected final.pt)")
    return cands[0]


def _find(path: Path, configured: str | None, defaults: tuple[str, ...]) -> Path | None:
    names = ([Path(configured).name] if configured else []) + list(defaults)
    for n in names:
        if (path / n).is_file():
            return path / n
    return None


def _read_config(path: Path) -> ModelConfig:
    cfg_path = path / "train.yaml"
    try:
        raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{cfg_path} is not valid YAML: {e}") from None
    return parse_train_yaml(raw)


def _read_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a broken file
        raise ModelFormatError(f"cannot read checkpoint {ckpt}: {e}") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFormatError(f"{ckpt} does not hold a state dict of tensors")
    return sd


def load_wenet(
    path: str | Path, device=None, dtype=None, engine: str = "auto", cuda_graphs: bool = True
) -> WenetModel:
    """Load a WeNet directory onto ``device`` (default: CUDA if available, else CPU).

    engine: ``"auto"`` runs the fused Triton kernels and CUDA graphs on CUDA when the model's
    layout has a fused path, ``"fused"`` insists (an error if impossible; on CPU it needs
    ``TRITON_INTERPRET=1``), ``"torch"`` runs the plain torch modules (the reference) in ``dtype``.
    """
    from speechrt.audio.cmvn import load_global_cmvn

    path = Path(path)
    if not is_wenet_dir(path):
        raise ModelFormatError(f"{path} is not a WeNet model directory (no train.yaml)")
    cfg = _read_config(path)
    units_path = _find(path, cfg.symbol_table, UNIT_NAMES)
    if units_path is None:
        raise ModelFormatError(f"{path} has no symbol table (units.txt or words.txt)")
    symbols = SymbolTable.load(units_path)
    if len(symbols) != cfg.vocab_size:
        raise ModelFormatError(
            f"{units_path.name} has {len(symbols)} units but the model's vocab is {cfg.vocab_size}"
        )
    net = ConformerASR(cfg)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    wenet_sd = _read_state_dict(_checkpoint(path))
    has_cmvn = "encoder.global_cmvn.mean" in wenet_sd
    sd = convert_wenet_state_dict(
        wenet_sd,
        cfg,
        shapes,
        allow_missing=() if has_cmvn else ("encoder.cmvn_mean", "encoder.cmvn_istd"),
    )
    if not has_cmvn:
        cmvn_path = _find(path, cfg.cmvn_file, ("global_cmvn",))
        if cfg.cmvn_file and cmvn_path is None:
            raise ModelFormatError(f"{path}: train.yaml names cmvn file {cfg.cmvn_file}, not found")
        if cmvn_path is not None:
            sd["encoder.cmvn_mean"], sd["encoder.cmvn_istd"] = load_global_cmvn(cmvn_path)
        else:
            sd["encoder.cmvn_mean"] = torch.zeros(cfg.input_dim)
            sd["encoder.cmvn_istd"] = torch.ones(cfg.input_dim)
    net.load_state_dict(sd, strict=True)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = parse_dtype(dtype)
    fast = want_fused_engine(net, device, engine)
    # The fused engine keeps its own compute-dtype weights; the torch modules stay float32.
    net = net.to(device=device, dtype=torch.float32 if fast else dtype)
    if fast:
        from speechrt.engine.runner import ConformerEngine  # imports Triton: only when used

        fast = ConformerEngine(net, Precision.of(dtype), cuda_graphs=cuda_graphs)
    return WenetModel(net, symbols, path, device, dtype, engine=fast or None)


def want_fused_engine(net, device, engine: str, unsupported=None) -> bool:
    """Whether to build the fused engine for this request (``engine``: auto, fused or torch).

    unsupported: ``net -> reason or None`` (default :func:`~speechrt.models.conformer.fused.
    supports_fused`); "fused" raises with that reason, "auto" quietly falls back to torch.
    """
    from speechrt.kernels._utils import triton_available
    from speechrt.models.conformer.fused import supports_fused

    if engine not in ("auto", "fused", "torch"):
        raise UnsupportedOptionError(f"unknown engine '{engine}' (auto, fused, torch)")
    if engine == "torch":
        return False
    reason = (unsupported or supports_fused)(net)
    on_cuda = torch.device(device).type == "cuda"
    if engine == "auto":
        return reason is None and on_cuda and triton_available()
    if reason is not None:
        raise UnsupportedOptionError(f"engine 'fused' cannot run this model: {reason}")
    if not triton_available():
        raise UnsupportedOptionError(
            "engine 'fused' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU)"
        )
    return True
