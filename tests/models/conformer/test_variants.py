"""Every WeNet layout speechrt accepts loads from a WeNet-format directory and decodes.

The shared fixtures cover conv2d / conv2d6, rel_pos, batch_norm / layer_norm, causal and not.
The other layouts (conv2d8 and linear input layers, abs_pos / no_pos, the Transformer encoder,
relu / gelu, post-norm) have no WeNet reference here; they are held to what WeNet defines
independently of our modules: the valid lengths of its mask slicing, the key names of its state
dict, streaming == chunk-masked batch for causal models, and batch invariance.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import speechrt
from speechrt.errors import ModelFormatError, UnsupportedOptionError
from speechrt.models.conformer.config import parse_train_yaml
from speechrt.models.conformer.convert import wenet_key_map
from speechrt.models.conformer.model import ConformerASR

BASE_ENC = dict(
    output_size=32,
    attention_heads=2,
    linear_units=48,
    num_blocks=2,
    cnn_module_kernel=5,
    dropout_rate=0.1,
)
VARIANTS = {
    "conv2d8_abs_pos": dict(
        encoder="conformer",
        input_layer="conv2d8",
        pos_enc_layer_type="abs_pos",
        selfattention_layer_type="selfattn",
    ),
    "linear_no_pos": dict(
        encoder="conformer",
        input_layer="linear",
        pos_enc_layer_type="no_pos",
        selfattention_layer_type="selfattn",
        activation_type="gelu",
    ),
    "transformer_enc": dict(encoder="transformer", input_layer="conv2d"),
    "causal_chunk": dict(
        encoder="conformer",
        input_layer="conv2d",
        causal=True,
        use_dynamic_chunk=True,
        cnn_module_norm="layer_norm",
        activation_type="relu",
    ),
    "post_norm": dict(
        encoder="conformer", input_layer="conv2d6", normalize_before=False, macaron_style=False
    ),
}
WENET_SLICES = {
    "conv2d": [(2, 2), (2, 2)],
    "conv2d6": [(2, 2), (4, 3)],
    "conv2d8": [(2, 2), (2, 2), (2, 2)],
    "linear": [],
}


def _write_model(tmp_path, name: str, decoder: str = "bitransformer"):
    v = dict(VARIANTS[name])
    enc = v.pop("encoder")
    raw = {
        "encoder": enc,
        "encoder_conf": {**BASE_ENC, **v},
        "decoder": decoder,
        "decoder_conf": {
            "attention_heads": 2,
            "linear_units": 48,
            "num_blocks": 1,
            "r_num_blocks": 1,
            "dropout_rate": 0.1,
        },
        "input_dim": 80,
        "output_dim": 12,
        "model": "asr_model",
        "model_conf": {"ctc_weight": 0.3, "reverse_weight": 0.3},
        "tokenizer_conf": {
            "special_tokens": {"<blank>": 0, "<unk>": 1, "<sos>": 11, "<eos>": 11},
            "symbol_table_path": "units.txt",
        },
        "cmvn_conf": {"cmvn_file": "global_cmvn", "is_json_cmvn": True},
    }
    if decoder == "transformer":
        del raw["decoder_conf"]["r_num_blocks"]
    cfg = parse_train_yaml(raw)
    torch.manual_seed(0)
    net = ConformerASR(cfg)
    ours = net.state_dict()
    with torch.no_grad():
        for k, t in ours.items():
            if t.is_floating_point() and not k.endswith("running_var"):
                t.copy_(torch.randn_like(t) * 0.3)
    inverse = {o: w for w, o in wenet_key_map(cfg).items()}
    wenet_sd = {inverse[k]: t for k, t in ours.items()}
    d = tmp_path / name
    d.mkdir()
    (d / "train.yaml").write_text(yaml.safe_dump(raw))
    torch.save(wenet_sd, d / "final.pt")
    units = ["<blank>", "<unk>"] + [chr(ord("a") + i) for i in range(9)] + ["<sos/eos>"]
    (d / "units.txt").write_text("".join(f"{u} {i}\n" for i, u in enumerate(units)))
    return d, cfg


def _wenet_lengths(kind: str, lengths: torch.Tensor, t: int) -> list[int]:
    """Valid output frames by slicing a (B, 1, T) mask exactly as WeNet's subsampling does."""
    mask = (torch.arange(t)[None, :] < lengths[:, None]).unsqueeze(1)
    for start, step in WENET_SLICES[kind]:
        mask = mask[:, :, start::step]
    return mask.sum(-1).squeeze(1).tolist()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_loads_and_decodes(tmp_path, name):
    d, cfg = _write_model(tmp_path, name)
    model = speechrt.load_model(d, device="cpu")
    t = 123
    feats = torch.randn(3, t, 80)
    lens = torch.tensor([123, 97, 60])
    enc, enc_lens = model.encode(feats, lens)
    assert enc_lens.tolist() == _wenet_lengths(cfg.encoder.input_layer, lens, t)
    assert enc.shape[1] >= int(enc_lens.max()) and torch.isfinite(enc).all()
    for b in range(3):  # batch invariance
        alone, n = model.encode(feats[b : b + 1, : lens[b]], lens[b : b + 1])
        torch.testing.assert_close(alone[0, : n[0]], enc[b, : enc_lens[b]], atol=1e-5, rtol=1e-5)
    for method in (
        "ctc_greedy_search",
        "ctc_prefix_beam_search",
        "attention",
        "attention_rescoring",
    ):
        out = model.decode(feats, lens, method=method, beam_size=3, reverse_weight=0.3)
        assert len(out) == 3 and all(len(o) >= 1 for o in out)
        assert all(0 <= tok < 11 for o in out for tok in o[0][0])  # eos (11) never in text


def test_causal_streaming_equals_chunk_mask(tmp_path):
    d, _ = _write_model(tmp_path, "causal_chunk")
    model = speechrt.load_model(d, device="cpu")
    feats = torch.randn(1, 150, 80)
    lens = torch.tensor([150])
    for chunk, left in ((4, -1), (4, 2), (7, 1)):
        full, n = model.encode(
            feats, lens, decoding_chunk_size=chunk, num_decoding_left_chunks=left
        )
        stream, m = model.encode(
            feats,
            lens,
            decoding_chunk_size=chunk,
            num_decoding_left_chunks=left,
            simulate_streaming=True,
        )
        k = int(m[0])  # streaming drops a trailing partial window, as WeNet does
        assert 0 < k <= int(n[0])
        torch.testing.assert_close(stream[0, :k], full[0, :k], atol=1e-4, rtol=1e-4)


def test_key_map_errors_name_the_key(tmp_path):
    d, cfg = _write_model(tmp_path, "transformer_enc", decoder="transformer")
    sd = torch.load(d / "final.pt")
    key = next(k for k in sd if k.startswith("encoder.encoders.0.self_attn.linear_q.weight"))
    bad = dict(sd)
    bad[key] = torch.zeros(3, 3)
    torch.save(bad, d / "final.pt")
    with pytest.raises(ModelFormatError, match="linear_q.weight.*shape"):
        speechrt.load_model(d, device="cpu")
    bad = dict(sd)
    del bad[key]
    torch.save(bad, d / "final.pt")
    with pytest.raises(ModelFormatError, match="lacks"):
        speechrt.load_model(d, device="cpu")
    bad = dict(sd, **{"encoder.encoders.0.surprise": torch.zeros(1)})
    torch.save(bad, d / "final.pt")
    with pytest.raises(ModelFormatError, match="encoder.encoders.0.surprise"):
        speechrt.load_model(d, device="cpu")


def test_config_errors(tmp_path):
    d, _ = _write_model(tmp_path, "transformer_enc", decoder="transformer")
    raw = yaml.safe_load((d / "train.yaml").read_text())
    for key, value, err in (
        ("layer_norm_type", "rms_norm", UnsupportedOptionError),
        ("bogus_knob", 1, ModelFormatError),
        ("input_layer", "conv3d", UnsupportedOptionError),
    ):
        broken = dict(raw, encoder_conf={**raw["encoder_conf"], key: value})
        (d / "train.yaml").write_text(yaml.safe_dump(broken))
        with pytest.raises(err, match=key if key != "input_layer" else "conv3d"):
            speechrt.load_model(d, device="cpu")
    (d / "train.yaml").write_text(yaml.safe_dump(raw))
    (d / "units.txt").write_text("a 0\n")
    with pytest.raises(ModelFormatError, match="units"):
        speechrt.load_model(d, device="cpu")
