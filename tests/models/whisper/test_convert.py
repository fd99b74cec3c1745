"""Checkpoint reading: OpenAI .pt and Hugging Face directories, key errors, alignment heads."""

from __future__ import annotations

import base64
import gzip
import shutil

import pytest
import torch

import speechrt
from speechrt.errors import ModelFormatError
from speechrt.models.whisper import is_whisper_checkpoint, load_whisper, read_checkpoint
from speechrt.models.whisper.config import WhisperDims

from .conftest import ALIGNMENT_HEADS, DIMS, save_hf, save_openai


def _heads(pairs) -> torch.Tensor:
    mask = torch.zeros(DIMS["n_text_layer"], DIMS["n_text_head"], dtype=torch.bool)
    for layer, head in pairs:
        mask[layer, head] = True
    return mask


def test_openai_and_hf_give_the_same_tensors(pt_path, hf_path, reference):
    pt, hf = read_checkpoint(pt_path), read_checkpoint(hf_path)
    assert pt.dims == hf.dims == WhisperDims(**DIMS)
    assert pt.state_dict.keys() == hf.state_dict.keys()
    for key in pt.state_dict:
        assert torch.equal(pt.state_dict[key], hf.state_dict[key]), key
    # every reference tensor is used exactly once
    ref_values = sorted(float(v.double().sum()) for v in reference.state_dict().values())
    assert sorted(float(v.double().sum()) for v in pt.state_dict.values()) == ref_values


def test_pytorch_model_bin(tmp_path, reference, hf_path):
    directory = save_hf(reference, tmp_path / "bin", safetensors=False)
    a, b = read_checkpoint(directory), read_checkpoint(hf_path)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_alignment_heads(tmp_path, reference, pt_path, hf_path):
    assert read_checkpoint(pt_path).alignment_heads is None
    default = load_whisper(pt_path, device="cpu").net.alignment_heads
    assert torch.equal(default, reference.alignment_heads.to_dense())
    assert torch.equal(read_checkpoint(hf_path).alignment_heads, _heads(ALIGNMENT_HEADS))
    assert torch.equal(
        load_whisper(hf_path, device="cpu").net.alignment_heads, _heads(ALIGNMENT_HEADS)
    )
    mask = _heads([[0, 0], [1, 1]])
    dump = base64.b85encode(gzip.compress(mask.numpy().tobytes()))
    for value in (mask, mask.to_sparse(), [[0, 0], [1, 1]], dump):
        path = save_openai(reference, tmp_path / "heads.pt", alignment_heads=value)
        assert torch.equal(read_checkpoint(path).alignment_heads, mask)
    state = {**reference.state_dict(), "alignment_heads": mask}
    torch.save({"dims": DIMS, "model_state_dict": state}, tmp_path / "in_state.pt")
    assert torch.equal(read_checkpoint(tmp_path / "in_state.pt").alignment_heads, mask)


def _save_state(tmp_path, state, dims=DIMS):
    path = tmp_path / "bad.pt"
    torch.save({"dims": dims, "model_state_dict": state}, path)
    return path


def test_key_errors_name_the_key(tmp_path, reference):
    state = dict(reference.state_dict())
    with pytest.raises(ModelFormatError, match="'decoder.extra.weight'"):
        read_checkpoint(_save_state(tmp_path, {**state, "decoder.extra.weight": torch.zeros(1)}))
    missing = {k: v for k, v in state.items() if k != "decoder.blocks.1.mlp.2.bias"}
    with pytest.raises(ModelFormatError, match="missing .*'decoder.blocks.1.mlp.2.bias'"):
        read_checkpoint(_save_state(tmp_path, missing))
    bad = {**state, "encoder.blocks.0.attn.query.weight": torch.zeros(64, 32)}
    with pytest.raises(
        ModelFormatError, match=r"'encoder.blocks.0.attn.query.weight' has shape \(64, 32\)"
    ):
        read_checkpoint(_save_state(tmp_path, bad))
    with pytest.raises(ModelFormatError, match="n_text_layer"):
        read_checkpoint(
            _save_state(tmp_path, state, {k: v for k, v in DIMS.items() if k != "n_text_layer"})
        )
    with pytest.raises(ModelFormatError, match="'encoder.blocks.2"):
        read_checkpoint(_save_state(tmp_path, state, {**DIMS, "n_audio_layer": 3}))


def test_hf_errors(tmp_path, hf_path):
    directory = tmp_path / "hf"
    shutil.copytree(hf_path, directory)
    config = (directory / "config.json").read_text()
    (directory / "config.json").write_text(config.replace('"whisper"', '"wav2vec2"'))
    assert not is_whisper_checkpoint(directory)
    with pytest.raises(ModelFormatError, match="wav2vec2"):
        read_checkpoint(directory)
    (directory / "config.json").write_text(config.replace('"decoder_layers"', '"n_layers"'))
    with pytest.raises(ModelFormatError, match="decoder_layers"):
        read_checkpoint(directory)
    (directory / "config.json").write_text(config)
    (directory / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no model.safetensors"):
        read_checkpoint(directory)


def test_not_a_whisper_checkpoint(tmp_path, pt_path, hf_path):
    assert is_whisper_checkpoint(pt_path) and is_whisper_checkpoint(hf_path)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    for path in (other, garbage, tmp_path / "missing.pt", tmp_path):
        assert not is_whisper_checkpoint(path)
    with pytest.raises(ModelFormatError, match="not an OpenAI Whisper checkpoint"):
        load_whisper(other)
    with pytest.raises(ModelFormatError, match="not a readable PyTorch checkpoint"):
        load_whisper(garbage)
    with pytest.raises(ModelFormatError, match="not found"):
        load_whisper(tmp_path / "missing.pt")


def test_speechrt_load_model_and_dtypes(pt_path):
    model = speechrt.load_model(pt_path, device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.net.decoder.norm.weight.dtype == torch.float32  # norms stay FP32
    with pytest.raises(speechrt.UnsupportedOptionError, match="dtype"):
        load_whisper(pt_path, device="cpu", dtype=torch.int8)


def test_model_name_through_hub_cache(tmp_path, hf_path):
    pytest.importorskip("huggingface_hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--openai--whisper-tiny"
    shutil.copytree(hf_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = load_whisper("tiny", device="cpu", cache_dir=tmp_path / "cache", local_files_only=True)
    assert model.dims == WhisperDims(**DIMS)
    with pytest.raises(ModelFormatError, match="openai/whisper-base"):
        load_whisper("base", cache_dir=tmp_path / "cache", local_files_only=True)
    with pytest.raises(ModelFormatError, match="not found"):
        load_whisper("no-such-model", cache_dir=tmp_path / "cache", local_files_only=True)
