"""WeNet's ``mlp_type`` moe and gated feed-forwards (encoder macaron + second FFN, decoder FFN),
held to WeNet's own outputs in tests/data/wenet_mlp/*/reference.npz (see REFERENCE.md there).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import speechrt
from speechrt.errors import ModelFormatError, UnsupportedOptionError
from speechrt.models.conformer.config import parse_train_yaml
from speechrt.models.conformer.convert import convert_wenet_state_dict
from speechrt.models.conformer.fused import supports_fused
from speechrt.models.conformer.model import ConformerASR

TYPES = ["moe", "gated"]


@pytest.fixture(scope="module", params=TYPES)
def case(request, data_dir):
    d = data_dir / "wenet_mlp" / request.param
    ref = dict(np.load(d / "reference.npz"))
    meta = json.loads(str(ref.pop("meta_json")))
    return d, speechrt.load_model(d, device="cpu"), ref, meta


def _inputs(ref):
    return torch.from_numpy(ref["feats"]), torch.from_numpy(ref["feats_lengths"]).long()


def test_encoder_and_ctc_equal_wenet(case):
    _, model, ref, _ = case
    feats, lens = _inputs(ref)
    out, out_lens = model.encode(feats, lens, pad_mode="wenet")
    assert out_lens.tolist() == ref["encoder_out_lens"].tolist()
    logp = model.net.ctc_log_probs(out)
    for b, n in enumerate(out_lens.tolist()):
        np.testing.assert_allclose(out[b, :n].numpy(), ref["encoder_out"][b, :n], atol=5e-5)
        np.testing.assert_allclose(logp[b, :n].numpy(), ref["ctc_log_probs"][b, :n], atol=5e-4)


def test_decode_methods_equal_wenet(case):
    _, model, ref, meta = case
    feats, lens = _inputs(ref)
    enc_lens = ref["encoder_out_lens"]
    for method in meta["methods"]:
        res = model.decode(feats, lens, method=method, pad_mode="wenet", **meta["decode"])
        for b in range(feats.shape[0]):
            theirs = ref[f"{method}_hyps"][b, : ref[f"{method}_lens"][b]].tolist()
            if method == "attention":
                # WeNet caps every utterance of a batch at the padded encoder length, speechrt
                # at the utterance's own; these random-weight decoders never emit eos.
                theirs = theirs[: enc_lens[b]]
            assert res[b][0][0] == theirs, (method, b)
            if method in ("ctc_prefix_beam_search", "attention_rescoring"):
                want = ref[f"{method}_scores"][b]
                assert res[b][0][1] == pytest.approx(want, abs=5e-4), (method, b)


def test_every_ffn_uses_the_mlp_type(case):
    d, model, _, _ = case
    kind = {"moe": "MoEFeedForward", "gated": "GatedFeedForward"}[d.name]
    enc = model.net.encoder
    ffns = [m for layer in enc.layers for m in (layer.ff_macaron, layer.ff)]
    ffns += [layer.ff for layer in model.net.decoder.l2r.layers]
    assert [type(m).__name__ for m in ffns] == [kind] * len(ffns)


def test_fused_path_declines(case):
    _, model, _, _ = case
    reason = supports_fused(model.net)
    assert reason is not None and "mlp_type" in reason


def _net_and_sd(d):
    cfg = parse_train_yaml(yaml.safe_load((d / "train.yaml").read_text()))
    sd = torch.load(d / "final.pt", map_location="cpu", weights_only=True)
    shapes = {k: v.shape for k, v in ConformerASR(cfg).state_dict().items()}
    return cfg, sd, shapes


def test_moe_converter_stacks_experts_and_names_bad_keys(data_dir):
    d = data_dir / "wenet_mlp" / "moe"
    cfg, sd, shapes = _net_and_sd(d)
    ours = convert_wenet_state_dict(sd, cfg, shapes)
    src = "encoder.encoders.1.feed_forward_macaron."
    dst = "encoder.layers.1.ff_macaron."
    torch.testing.assert_close(ours[dst + "router_weight"], sd[src + "gate.weight"].t())
    torch.testing.assert_close(ours[dst + "w1"][2], sd[src + "experts.2.w_1.weight"])
    torch.testing.assert_close(ours[dst + "b2"][1], sd[src + "experts.1.w_2.bias"])

    missing = {k: v for k, v in sd.items() if k != src + "experts.2.w_1.weight"}
    with pytest.raises(ModelFormatError, match=f"'{src}experts.2.w_1.weight'"):
        convert_wenet_state_dict(missing, cfg, shapes)
    bad = dict(sd, **{src + "gate.weight": sd[src + "gate.weight"].t()})
    with pytest.raises(ModelFormatError, match=f"'{src}gate.weight' has shape"):
        convert_wenet_state_dict(bad, cfg, shapes)
    extra = dict(sd, **{src + "experts.3.w_1.weight": sd[src + "experts.0.w_1.weight"]})
    with pytest.raises(ModelFormatError, match=f"'{src}experts.3.w_1.weight'"):
        convert_wenet_state_dict(extra, cfg, shapes)


def test_gated_converter_without_bias(data_dir):
    d = data_dir / "wenet_mlp" / "gated"
    cfg, sd, shapes = _net_and_sd(d)
    assert "encoder.encoders.0.feed_forward.w_1.bias" not in sd  # mlp_bias: false
    ours = convert_wenet_state_dict(sd, cfg, shapes)
    torch.testing.assert_close(
        ours["decoder.l2r.layers.0.ff.up.weight"], sd["decoder.decoders.0.feed_forward.w_1.weight"]
    )
    bad = dict(sd, **{"encoder.encoders.0.feed_forward.w_1.bias": torch.zeros(32)})
    with pytest.raises(ModelFormatError, match="encoder.encoders.0.feed_forward.w_1.bias"):
        convert_wenet_state_dict(bad, cfg, shapes)


@pytest.mark.parametrize(
    "conf, error, words",
    [
        ({"mlp_type": "moe", "n_expert": 2, "n_expert_activated": 3}, ModelFormatError, "n_expert"),
        ({"mlp_type": "moe", "activation_type": "tanh"}, UnsupportedOptionError, "tanh"),
        ({"mlp_type": "rwkv"}, UnsupportedOptionError, "rwkv"),
    ],
)
@pytest.mark.parametrize("section", ["encoder_conf", "decoder_conf"])
def test_bad_mlp_options_are_errors(data_dir, conf, error, words, section):
    raw = yaml.safe_load((data_dir / "wenet_mlp" / "moe" / "train.yaml").read_text())
    raw[section].update(conf)
    with pytest.raises(error, match=words):
        parse_train_yaml(raw)
