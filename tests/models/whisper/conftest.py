"""Fixtures for the Whisper tests: a small random-weight model built with openai-whisper (the
reference), saved as an OpenAI ``.pt`` and as a Hugging Face directory, plus real audio.

The reference model has the real window geometry (80 mels, 1500 audio positions, 448 text
positions, the 51865-token multilingual vocabulary) but width 64 and 2 layers. Its weights are
random with one bias: each decoder position's embedding leans towards a scripted token (text,
a timestamp pair every 9 positions, EOT every 37), so greedy decoding ends, emits timestamp
pairs and seeks like a trained model, while the audio and the previous tokens still matter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

whisper = pytest.importorskip("whisper")

DIMS = dict(
    n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
    n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=2,
)  # fmt: skip
EOT, TIMESTAMP_BEGIN = 50257, 50364
ALIGNMENT_HEADS = [[1, 0], [1, 1], [0, 1]]


def _init_weights(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding" in name:
                std, mean = 1.0, 0.0
            elif p.ndim > 1:
                out_proj = name.startswith("decoder") and ("out." in name or "mlp.2" in name)
                std, mean = (0.05 if out_proj else 0.25), 0.0
            elif name.endswith("ln.weight") or name.endswith("ln_post.weight"):
                std, mean = 0.1, 1.0
            else:
                std, mean = 0.1, 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * std + mean)
        emb = model.decoder.token_embedding.weight
        text = torch.randint(300, 20000, (DIMS["n_text_ctx"],), generator=gen)
        for pos in range(DIMS["n_text_ctx"]):
            if pos % 37 == 36:
                token = EOT
            elif pos % 9 in (0, 8):
                token = TIMESTAMP_BEGIN + min(1500, 7 * pos)
            else:
                token = int(text[pos])
            model.decoder.positional_embedding[pos] += 16.0 * emb[token] / emb[token].norm()


def build_reference(seed: int = 0):
    """The openai-whisper reference model (eval mode, FP32, CPU)."""
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**DIMS))
    _init_weights(model, seed)
    return model.eval()


# OpenAI -> Hugging Face key pieces (transformers' naming), applied in order.
_HF_RENAMES = [
    ("encoder.positional_embedding", "encoder.embed_positions.weight"),
    ("decoder.positional_embedding", "decoder.embed_positions.weight"),
    ("decoder.token_embedding", "decoder.embed_tokens"),
    (".blocks.", ".layers."),
    (".cross_attn_ln.", ".encoder_attn_layer_norm."),
    (".cross_attn.query.", ".encoder_attn.q_proj."),
    (".cross_attn.key.", ".encoder_attn.k_proj."),
    (".cross_attn.value.", ".encoder_attn.v_proj."),
    (".cross_attn.out.", ".encoder_attn.out_proj."),
    (".attn_ln.", ".self_attn_layer_norm."),
    (".attn.query.", ".self_attn.q_proj."),
    (".attn.key.", ".self_attn.k_proj."),
    (".attn.value.", ".self_attn.v_proj."),
    (".attn.out.", ".self_attn.out_proj."),
    (".mlp_ln.", ".final_layer_norm."),
    (".mlp.0.", ".fc1."),
    (".mlp.2.", ".fc2."),
    ("encoder.ln_post.", "encoder.layer_norm."),
    ("decoder.ln.", "decoder.layer_norm."),
]


def hf_key(openai_key: str) -> str:
    for old, new in _HF_RENAMES:
        openai_key = openai_key.replace(old, new)
    return "model." + openai_key


def save_openai(model, path: Path, **extra) -> Path:
    torch.save({"dims": dict(DIMS), "model_state_dict": model.state_dict(), **extra}, path)
    return path


def save_hf(model, directory: Path, safetensors: bool = True) -> Path:
    """Write config.json, generation_config.json and the weights in HF's layout."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {hf_key(k): v.contiguous() for k, v in model.state_dict().items()}
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"].clone()
    d = DIMS["n_audio_state"]
    config = {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
        "num_mel_bins": DIMS["n_mels"], "max_source_positions": DIMS["n_audio_ctx"],
        "d_model": d, "encoder_attention_heads": DIMS["n_audio_head"],
        "encoder_layers": DIMS["n_audio_layer"], "vocab_size": DIMS["n_vocab"],
        "max_target_positions": DIMS["n_text_ctx"],
        "decoder_attention_heads": DIMS["n_text_head"], "decoder_layers": DIMS["n_text_layer"],
        "encoder_ffn_dim": 4 * d, "decoder_ffn_dim": 4 * d, "activation_function": "gelu",
        "scale_embedding": False,
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(
        json.dumps({"alignment_heads": ALIGNMENT_HEADS})
    )
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")
    return directory


@pytest.fixture(scope="session")
def reference():
    return build_reference()


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory, reference) -> Path:
    root = tmp_path_factory.mktemp("whisper")
    save_openai(reference, root / "model.pt")
    save_hf(reference, root / "hf")
    return root


@pytest.fixture(scope="session")
def pt_path(whisper_dir) -> Path:
    return whisper_dir / "model.pt"


@pytest.fixture(scope="session")
def hf_path(whisper_dir) -> Path:
    return whisper_dir / "hf"


@pytest.fixture(scope="session")
def model(pt_path):
    from speechrt.models.whisper import load_whisper

    return load_whisper(pt_path, device="cpu")


@pytest.fixture(scope="session")
def jfk(shared) -> torch.Tensor:
    """jfk.flac as 16 kHz mono float32 (N,), decoded and resampled once for both sides."""
    from speechrt.audio.io import load_audio

    return load_audio(shared / "assets" / "whisper_assets" / "jfk.flac")


@pytest.fixture(scope="session")
def long_audio(jfk) -> torch.Tensor:
    """38 s: jfk, a quiet jfk, 5 s of silence, jfk -> several windows and seeks."""
    return torch.cat([jfk, 0.3 * jfk, torch.zeros(5 * 16000), jfk])
