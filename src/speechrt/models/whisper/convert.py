"""Whisper checkpoints -> (WhisperDims, our state dict, alignment heads).

Two formats, each converted by an explicit key map with a shape check per tensor:

* OpenAI ``.pt``: ``{"dims": {...}, "model_state_dict": {...}}`` (keys ``encoder.blocks.0.attn.query
  .weight`` ...), optionally an ``alignment_heads`` entry (bool (layers, heads), a list of
  ``[layer, head]`` pairs or OpenAI's base85 dump);
* Hugging Face directory: ``config.json`` (``model_type: "whisper"``) with ``model.safetensors``
  (or shards with an index) or ``pytorch_model.bin``; ``generation_config.json`` may give
  ``alignment_heads`` as ``[layer, head]`` pairs.

Unknown, missing or mis-shaped keys raise :class:`ModelFormatError` naming the key.
"""

from __future__ import annotations

import base64
import gzip
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speechrt.errors import ModelFormatError
from speechrt.models.whisper.config import WhisperDims

# Per-layer suffixes: ours <- OpenAI <- Hugging Face.
_ENCODER_LAYER = [
    ("attn.wq.weight", "attn.query.weight", "self_attn.q_proj.weight"),
    ("attn.wq.bias", "attn.query.bias", "self_attn.q_proj.bias"),
    ("attn.wk.weight", "attn.key.weight", "self_attn.k_proj.weight"),
    ("attn.wv.weight", "attn.value.weight", "self_attn.v_proj.weight"),
    ("attn.wv.bias", "attn.value.bias", "self_attn.v_proj.bias"),
    ("attn.wo.weight", "attn.out.weight", "self_attn.out_proj.weight"),
    ("attn.wo.bias", "attn.out.bias", "self_attn.out_proj.bias"),
    ("attn_norm.weight", "attn_ln.weight", "self_attn_layer_norm.weight"),
    ("attn_norm.bias", "attn_ln.bias", "self_attn_layer_norm.bias"),
    ("ffn.fc1.weight", "mlp.0.weight", "fc1.weight"),
    ("ffn.fc1.bias", "mlp.0.bias", "fc1.bias"),
    ("ffn.fc2.weight", "mlp.2.weight", "fc2.weight"),
    ("ffn.fc2.bias", "mlp.2.bias", "fc2.bias"),
    ("ffn_norm.weight", "mlp_ln.weight", "final_layer_norm.weight"),
    ("ffn_norm.bias", "mlp_ln.bias", "final_layer_norm.bias"),
]
_DECODER_LAYER = [
    (ours.replace("attn", "self_attn", 1), oa, hf) for ours, oa, hf in _ENCODER_LAYER
] + [
    ("cross_attn.wq.weight", "cross_attn.query.weight", "encoder_attn.q_proj.weight"),
    ("cross_attn.wq.bias", "cross_attn.query.bias", "encoder_attn.q_proj.bias"),
    ("cross_attn.wk.weight", "cross_attn.key.weight", "encoder_attn.k_proj.weight"),
    ("cross_attn.wv.weight", "cross_attn.value.weight", "encoder_attn.v_proj.weight"),
    ("cross_attn.wv.bias", "cross_attn.value.bias", "encoder_attn.v_proj.bias"),
    ("cross_attn.wo.weight", "cross_attn.out.weight", "encoder_attn.out_proj.weight"),
    ("cross_attn.wo.bias", "cross_attn.out.bias", "encoder_attn.out_proj.bias"),
    ("cross_attn_norm.weight", "cross_attn_ln.weight", "encoder_attn_layer_norm.weight"),
    ("cross_attn_norm.bias", "cross_attn_ln.bias", "encoder_attn_layer_norm.bias"),
]
_GLOBAL = [
    ("encoder.conv1.weight", "encoder.conv1.weight", "encoder.conv1.weight"),
    ("encoder.conv1.bias", "encoder.conv1.bias", "encoder.conv1.bias"),
    ("encoder.conv2.weight", "encoder.conv2.weight", "encoder.conv2.weight"),
    ("encoder.conv2.bias", "encoder.conv2.bias", "encoder.conv2.bias"),
    ("encoder.pos_emb", "encoder.positional_embedding", "encoder.embed_positions.weight"),
    ("encoder.norm.weight", "encoder.ln_post.weight", "encoder.layer_norm.weight"),
    ("encoder.norm.bias", "encoder.ln_post.bias", "encoder.layer_norm.bias"),
    ("decoder.tok_emb.weight", "decoder.token_embedding.weight", "decoder.embed_tokens.weight"),
    ("decoder.pos_emb", "decoder.positional_embedding", "decoder.embed_positions.weight"),
    ("decoder.norm.weight", "decoder.ln.weight", "decoder.layer_norm.weight"),
    ("decoder.norm.bias", "decoder.ln.bias", "decoder.layer_norm.bias"),
]
_OPENAI_LAYERS = ("encoder.blocks", "decoder.blocks")
_HF_LAYERS = ("encoder.layers", "decoder.layers")


def key_map(dims: WhisperDims, fmt: str) -> dict[str, str]:
    """Source key -> our key for ``fmt`` "openai" or "hf" (HF keys without the "model." prefix)."""
    col = {"openai": 1, "hf": 2}[fmt]
    enc_prefix, dec_prefix = _OPENAI_LAYERS if fmt == "openai" else _HF_LAYERS
    mapping = {row[col]: row[0] for row in _GLOBAL}
    for i in range(dims.n_audio_layer):
        for row in _ENCODER_LAYER:
            mapping[f"{enc_prefix}.{i}.{row[col]}"] = f"encoder.layers.{i}.{row[0]}"
    for i in range(dims.n_text_layer):
        for row in _DECODER_LAYER:
            mapping[f"{dec_prefix}.{i}.{row[col]}"] = f"decoder.layers.{i}.{row[0]}"
    return mapping


def expected_shapes(dims: WhisperDims) -> dict[str, tuple[int, ...]]:
    """Our state-dict key -> tensor shape, from a network built on the meta device."""
    from speechrt.models.whisper.model import WhisperNet

    with torch.device("meta"):
        net = WhisperNet(dims)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def convert_state_dict(
    source: dict[str, torch.Tensor], dims: WhisperDims, fmt: str, where: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` to our keys; unknown/missing/mis-shaped keys raise ModelFormatError."""
    mapping = key_map(dims, fmt)
    shapes = expected_shapes(dims)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        ours = mapping.get(key)
        if ours is None:
            raise ModelFormatError(f"{where}: unexpected Whisper key {key!r}")
        if not torch.is_tensor(tensor) or tuple(tensor.shape) != shapes[ours]:
            got = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise ModelFormatError(f"{where}: {key!r} has shape {got}, expected {shapes[ours]}")
        out[ours] = tensor
    missing = [src for src, ours in mapping.items() if ours not in out]
    if missing:
        raise ModelFormatError(f"{where}: missing Whisper key {missing[0]!r}")
    return out


def parse_alignment_heads(value: object, dims: WhisperDims) -> torch.Tensor:
    """Alignment heads as bool (n_text_layer, n_text_head) from a bool tensor/array (dense or
    sparse), a list of ``[layer, head]`` pairs or OpenAI's base85-gzip dump."""
    shape = (dims.n_text_layer, dims.n_text_head)
    try:
        if isinstance(value, (bytes, str)):
            raw = gzip.decompress(base64.b85decode(value))
            mask = torch.from_numpy(np.frombuffer(raw, dtype=bool).copy()).reshape(shape)
        elif torch.is_tensor(value) or isinstance(value, np.ndarray):
            mask = torch.as_tensor(value)
            mask = (mask.to_dense() if mask.is_sparse else mask).to(torch.bool).reshape(shape)
        else:
            mask = torch.zeros(shape, dtype=torch.bool)
            for layer, head in value:
                mask[int(layer), int(head)] = True
    except (ValueError, TypeError, IndexError, RuntimeError, OSError) as e:
        raise ModelFormatError(f"alignment_heads do not fit {shape}: {e}") from None
    return mask


@dataclass
class WhisperCheckpoint:
    """A converted checkpoint: dims, our state dict (source dtypes), alignment heads or None."""

    dims: WhisperDims
    state_dict: dict[str, torch.Tensor]
    alignment_heads: torch.Tensor | None
    source: str


def _dims_from(raw: object, where: str) -> WhisperDims:
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{where}: 'dims' is not a dictionary")
    names = WhisperDims.__dataclass_fields__
    for name in names:
        if name not in raw:
            raise ModelFormatError(f"{where}: 'dims' lacks {name!r}")
    extra = sorted(set(raw) - set(names))
    if extra:
        raise ModelFormatError(f"{where}: unknown 'dims' entry {extra[0]!r}")
    return WhisperDims(**{name: raw[name] for name in names})


def _torch_load(path: Path) -> object:
    mmap = zipfile.is_zipfile(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_openai(path: str | Path) -> WhisperCheckpoint:
    """Read and convert an OpenAI ``.pt`` checkpoint."""
    path = Path(path)
    try:
        ckpt = _torch_load(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ModelFormatError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ModelFormatError(
            f"{path}: not an OpenAI Whisper checkpoint (needs 'dims' and 'model_state_dict')"
        )
    dims = _dims_from(ckpt["dims"], str(path))
    source = dict(ckpt["model_state_dict"])
    in_state = source.pop("alignment_heads", None)  # some exports keep the buffer
    heads = ckpt.get("alignment_heads", in_state)
    state = convert_state_dict(source, dims, "openai", str(path))
    heads = None if heads is None else parse_alignment_heads(heads, dims)
    return WhisperCheckpoint(dims, state, heads, str(path))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def _hf_dims(config: dict, where: str) -> WhisperDims:
    names = {
        "n_mels": "num_mel_bins", "n_audio_ctx": "max_source_positions",
        "n_audio_state": "d_model", "n_audio_head": "encoder_attention_heads",
        "n_audio_layer": "encoder_layers", "n_vocab": "vocab_size",
        "n_text_ctx": "max_target_positions", "n_text_state": "d_model",
        "n_text_head": "decoder_attention_heads", "n_text_layer": "decoder_layers",
    }  # fmt: skip
    for hf_name in names.values():
        if hf_name not in config:
            raise ModelFormatError(f"{where}: config.json lacks {hf_name!r}")
    d = config["d_model"]
    for key, want in (("encoder_ffn_dim", 4 * d), ("decoder_ffn_dim", 4 * d)):
        if config.get(key, want) != want:
            raise ModelFormatError(f"{where}: unsupported {key}={config[key]} (need {want})")
    if config.get("activation_function", "gelu") != "gelu":
        raise ModelFormatError(f"{where}: unsupported activation {config['activation_function']!r}")
    if config.get("scale_embedding", False):
        raise ModelFormatError(f"{where}: unsupported scale_embedding=true")
    return WhisperDims(**{ours: config[hf] for ours, hf in names.items()})


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    files = [directory / "model.safetensors"]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in _read_json(index).get("weight_map", {}).values()})
    if all(f.is_file() for f in files):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelFormatError(
                f"{directory}: reading safetensors needs `pip install safetensors`"
            ) from None
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(f), device="cpu"))
        return out
    for name in ("pytorch_model.bin",):
        if (directory / name).is_file():
            loaded = _torch_load(directory / name)
            if isinstance(loaded, dict):
                return dict(loaded)
    raise ModelFormatError(f"{directory}: no model.safetensors or pytorch_model.bin")


def read_hf(directory: str | Path) -> WhisperCheckpoint:
    """Read and convert a Hugging Face Whisper directory."""
    directory = Path(directory)
    config = _read_json(directory / "config.json")
    if config.get("model_type") != "whisper":
        raise ModelFormatError(
            f"{directory}: config.json model_type is {config.get('model_type')!r}, not 'whisper'"
        )
    dims = _hf_dims(config, str(directory))
    source: dict[str, torch.Tensor] = {}
    for key, tensor in _hf_tensors(directory).items():
        source[key.removeprefix("model.")] = tensor
    tied = source.pop("proj_out.weight", None)  # tied to the token embedding
    if tied is not None and tuple(tied.shape) != (dims.n_vocab, dims.n_text_state):
        raise ModelFormatError(f"{directory}: 'proj_out.weight' has shape {tuple(tied.shape)}")
    state = convert_state_dict(source, dims, "hf", str(directory))
    heads = None
    gen = directory / "generation_config.json"
    if gen.is_file() and _read_json(gen).get("alignment_heads") is not None:
        heads = parse_alignment_heads(_read_json(gen)["alignment_heads"], dims)
    return WhisperCheckpoint(dims, state, heads, str(directory))


def is_whisper_checkpoint(path: str | Path) -> bool:
    """True for an OpenAI ``.pt`` (with 'dims' and 'model_state_dict') or an HF Whisper dir."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        try:
            return (
                config.is_file()
                and json.loads(config.read_text("utf-8")).get("model_type") == "whisper"
            )
        except (OSError, ValueError, AttributeError):
            return False
    if not path.is_file():
        return False
    try:
        ckpt = _torch_load(path)
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a Whisper checkpoint
        return False
    return isinstance(ckpt, dict) and "dims" in ckpt and "model_state_dict" in ckpt


def read_checkpoint(path: str | Path) -> WhisperCheckpoint:
    """Read an OpenAI ``.pt`` file or a Hugging Face directory."""
    path = Path(path)
    if path.is_dir():
        return read_hf(path)
    if path.is_file():
        return read_openai(path)
    raise ModelFormatError(f"{path}: no such file or directory")
