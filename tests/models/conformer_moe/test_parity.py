"""3M-ASR Conformer-MoE: FP32 CPU parity with 3M-ASR's own outputs (fixtures/conformer_moe).

Tolerances are the fixture's (SPEC.md section 9, ``meta_json["atol"]``: 10x the float32-vs-float64
deviation of 3M-ASR's code); (B, T, ...) arrays are compared on valid frames, flattened (B*T, ...)
router arrays on the rows of valid frames. ``pad_mode="wenet"`` reproduces 3M-ASR's padded batch
(first-frame subsampling mask: 25 valid frames for the 97-frame utterance, not 23).
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
import yaml

import speechrt
from speechrt.errors import ModelFormatError, UnsupportedOptionError
from speechrt.layers.moe import router_aux_losses
from speechrt.layers.subsampling import Subsampling
from speechrt.models.conformer.config import EncoderConfig
from speechrt.models.conformer.encoder import Encoder
from speechrt.models.conformer_moe import is_conformer_moe_dir, load_conformer_moe
from speechrt.models.conformer_moe.config import parse_3m_config
from speechrt.models.conformer_moe.convert import key_map
from speechrt.models.conformer_moe.model import ConformerMoEASR

T_OUT = 36  # encoder frames of the padded batch


@pytest.fixture(scope="module")
def fx(shared):
    d = shared / "fixtures" / "conformer_moe"
    ref = dict(np.load(d / "reference.npz"))
    meta = json.loads(str(ref.pop("meta_json")))
    model = speechrt.load_model(d, device="cpu")
    feats = torch.from_numpy(ref["feats_cmvn"])
    lens = torch.from_numpy(ref["feats_lengths"]).long()
    return dict(dir=d, model=model, ref=ref, meta=meta, atol=meta["atol"], feats=feats, lens=lens)


def _close_valid(ours, name, fx):
    ref, atol = fx["ref"], fx["atol"][name]
    for b, n in enumerate(ref["out_lens"].tolist()):
        np.testing.assert_allclose(ours[b, :n].numpy(), ref[name][b, :n], atol=atol, rtol=0,
                                   err_msg=name)


def _valid_rows(ref) -> np.ndarray:
    return np.concatenate([b * T_OUT + np.arange(n) for b, n in enumerate(ref["out_lens"])])


def test_loads_through_the_registry(fx):
    assert type(fx["model"]).__name__ == "ConformerMoEModel"
    assert fx["model"].family == "conformer_moe"
    assert is_conformer_moe_dir(fx["dir"])
    assert not is_conformer_moe_dir(fx["dir"].parent / "wenet" / "conformer_ctc_aed")
    cfg = fx["model"].cfg
    assert (cfg.moe.num_experts, cfg.moe.hidden_units, cfg.encoder.norm_eps) == (4, 128, 1e-12)


def test_encoder_and_embedding_network(fx):
    net = fx["model"].net
    with torch.inference_mode():
        emb = net.encoder.embedding(fx["feats"], fx["lens"], pad_mode="wenet")
        out, out_lens = net.encoder(fx["feats"], fx["lens"], pad_mode="wenet")
        logits, emb_logits = net.ctc(out), net.encoder.embed_ctc(emb)
    assert out_lens.tolist() == fx["ref"]["out_lens"].tolist() == [36, 25]
    _close_valid(out, "encoder_hidden", fx)
    _close_valid(logits, "encoder_out_nosm", fx)
    _close_valid(emb, "embed_hidden", fx)
    _close_valid(emb_logits, "embed_out_nosm", fx)


@pytest.mark.parametrize("i", [0, 1])
def test_moe_layer_internals(fx, i):
    """Inputs, router, top-1 choice, gate and output of block i's MoE."""
    net, ref, atol = fx["model"].net, fx["ref"], fx["atol"]
    ff = net.moe_layers()[i]
    seen = {}
    handle = ff.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    try:
        with torch.inference_mode():
            net.encoder(fx["feats"], fx["lens"], pad_mode="wenet")
    finally:
        handle.remove()
    x, emb = seen["args"]
    _close_valid(x, f"l{i}_ff_in", fx)
    _close_valid(emb, f"l{i}_embed_in", fx)
    _close_valid(seen["out"], f"l{i}_ff_out", fx)
    with torch.inference_mode():
        r = ff.route(x, emb)
    rows = _valid_rows(ref)
    router_in = torch.cat([emb, x], dim=-1).reshape(-1, x.shape[-1] + emb.shape[-1])
    np.testing.assert_allclose(router_in.numpy()[rows], ref[f"l{i}_router_inputs"][rows],
                               atol=atol[f"l{i}_router_inputs"], rtol=0)
    np.testing.assert_allclose(r.logits.numpy()[rows], ref[f"l{i}_router_logits"][rows],
                               atol=atol[f"l{i}_router_logits"], rtol=0)
    assert np.array_equal(r.gate_idx[:, 0].numpy()[rows], ref[f"l{i}_gate_idx"][rows])
    np.testing.assert_allclose(r.gate_val[:, 0].numpy()[rows], ref[f"l{i}_gate_value"][rows],
                               atol=atol[f"l{i}_gate_value"], rtol=0)
    # 3M-ASR's aux losses run over every frame, padding included: padded frames match too.
    l1, importance = router_aux_losses(r.logits)
    assert float(l1) == pytest.approx(float(ref[f"l{i}_aux_l1"]), abs=atol[f"l{i}_aux_l1"])
    assert float(importance) == pytest.approx(float(ref[f"l{i}_aux_importance"]),
                                              abs=atol[f"l{i}_aux_importance"])


def _audio_features(fx):
    from speechrt.audio.io import load_audio

    wavs = []
    for inp in fx["meta"]["inputs"]:
        wav = load_audio(fx["dir"].parents[1] / inp["wav"].removeprefix("shared/"),
                         target_rate=16000)
        wavs.append(wav[inp["start_sample"] : inp["start_sample"] + inp["num_samples"]])
    return wavs


def test_audio_to_greedy_hypotheses(fx):
    """Audio -> our fbank -> facade CMVN -> encoder -> CTC greedy = 3M-ASR's hypotheses."""
    model, ref = fx["model"], fx["ref"]
    wavs = _audio_features(fx)
    feats, frames = model.features(wavs)
    assert frames.tolist() == fx["lens"].tolist()
    out, out_lens = model.encode(feats, frames, pad_mode="wenet")
    _close_valid(out, "encoder_hidden", fx)
    greedy = model.decode(feats, frames, method="ctc_greedy_search", pad_mode="wenet")
    for b in range(2):
        want = [t for t in ref["ctc_greedy_hyps"][b].tolist() if t >= 0]
        assert greedy[b][0][0] == want
    tr = model.transcribe(wavs[0], method="ctc_greedy_search", sample_rate=16000)
    assert list(tr.tokens) == greedy[0][0][0]
    assert tr.text == "".join(f"[{t}]" for t in tr.tokens)  # no units.txt: ids as text


def test_zero_pad_mode_is_batch_invariant_and_decodes(fx):
    model, feats, lens = fx["model"], fx["feats"], fx["lens"]
    raw = feats / model.cmvn_istd + model.cmvn_mean  # undo CMVN: the facade reapplies it
    batch, batch_lens = model.encode(raw, lens)
    assert batch_lens.tolist() == [36, 23]  # each utterance's own frames (as 3M-ASR batch 1)
    np.testing.assert_allclose(batch[0].numpy(), fx["ref"]["encoder_hidden"][0], atol=5e-5)
    for b in range(2):
        n = int(lens[b])
        alone, alone_lens = model.encode(raw[b : b + 1, :n], lens[b : b + 1])
        assert int(alone_lens[0]) == int(batch_lens[b])
        torch.testing.assert_close(alone[0], batch[b, : batch_lens[b]], atol=1e-5, rtol=1e-5)
    prefix = model.decode(raw, lens, method="ctc_prefix_beam_search", beam_size=3)
    resc = model.decode(raw, lens, method="attention_rescoring", beam_size=3)
    for b in range(2):
        scores = [s for _, s in prefix[b]]
        assert len(prefix[b]) >= 1 and scores == sorted(scores, reverse=True)
        assert resc[b][0][0] in [h for h, _ in prefix[b]]
    att = model.decode(raw[1:, :97], lens[1:], method="attention", beam_size=1)
    assert all(0 <= t < model.cfg.vocab_size - 1 for t in att[0][0][0])  # eos never emitted
    with pytest.raises(UnsupportedOptionError, match="streaming"):
        model.decode(raw, lens, method="ctc_greedy_search", decoding_chunk_size=4,
                     simulate_streaming=True)


@pytest.mark.parametrize("kind", ["conv2d", "conv2d6", "conv2d8"])
def test_first_frame_subsampling_lengths(kind):
    """3M-ASR's literal mask slicing, e.g. ``x_mask[:, :, :-2:2][:, :, :-2:2]`` for conv2d."""
    slices = {"conv2d": [(2, 2), (2, 2)], "conv2d6": [(2, 2), (4, 3)],
              "conv2d8": [(2, 2), (2, 2), (2, 2)]}[kind]
    sub = Subsampling(kind, 80, 8, mask="first_frame")
    for t in (7, 15, 16, 33, 150):
        lengths = torch.arange(0, t + 1)
        mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
        for cut, step in slices:
            mask = mask[:, :-cut:step]
        assert sub.output_lengths(lengths, t).tolist() == mask.sum(1).tolist()
        # Without the padded length: each utterance alone (WeNet's lengths).
        alone = Subsampling(kind, 80, 8).output_lengths(lengths)
        assert sub.output_lengths(lengths).tolist() == alone.tolist()


def test_encoder_ff_factory_and_context_hook():
    """The Encoder builds the swapped FFN per block and hands it ff_context."""
    calls = []

    class Probe(torch.nn.Module):
        def forward(self, x, ctx):
            calls.append(ctx)
            return x * 0

    cfg = EncoderConfig(output_size=16, attention_heads=2, linear_units=8, num_blocks=2,
                        cnn_module_norm="layer_norm")
    enc = Encoder(cfg, 20, ff_factory=lambda c: Probe())
    feats, ctx = torch.randn(1, 30, 20), torch.randn(1, 6, 4)
    enc(feats, torch.tensor([30]), ff_context=ctx)
    assert len(calls) == 2 and all(c is ctx for c in calls)
    assert all(isinstance(layer.ff, Probe) for layer in enc.layers)


def test_recipe_config_and_key_map(shared):
    """The published 3M-ASR recipe (32 experts = 4 x 8 workers) parses; the key map covers our
    whole network with SPEC.md's shapes."""
    raw = yaml.safe_load((shared / "assets/configs/3m-asr_wenetspeech_moe_config.yaml").read_text())
    cfg = parse_3m_config(raw, vocab_size=5000, num_experts_total=32)
    assert (cfg.moe.num_experts, cfg.moe.expert_world_size, cfg.input_dim) == (32, 8, 80)
    assert cfg.encoder.linear_units == 2048 and cfg.embed_encoder.num_blocks == 6
    with torch.device("meta"):
        net = ConformerMoEASR(cfg)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    kmap = key_map(cfg)
    assert set(kmap.values()) == set(shapes) - {k for k in shapes if "cmvn" in k}
    inv = {v: k for k, v in kmap.items()}
    assert inv["encoder.layers.3.ff.router_weight"] == (
        "encoder.blocks.3.feed_forward.router_weights"
    )
    assert shapes["encoder.layers.3.ff.router_weight"] == (1024, 32)
    assert shapes["encoder.layers.3.ff.w1"] == (32, 2048, 512)
    assert shapes["encoder.layers.3.ff.w2"] == (32, 512, 2048)
    assert shapes["encoder.subsampling.proj.weight"] == (512, 512 * 19)
    emb_raw = (shared / "assets/configs/3m-asr_wenetspeech_embedding_config.yaml").read_text()
    with pytest.raises(UnsupportedOptionError, match="job_type"):
        parse_3m_config(yaml.safe_load(emb_raw), vocab_size=5000)


# ---------------------------------------------------------------------------- loader errors


def _copy(fx, tmp_path, edit_config=None, edit_sd=None):
    for name in ("config.yaml", "global_cmvn"):
        shutil.copy(fx["dir"] / name, tmp_path / name)
    if edit_config is not None:
        raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
        edit_config(raw)
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    sd = torch.load(fx["dir"] / "final.nnet", map_location="cpu", weights_only=True)
    if edit_sd is not None:
        edit_sd(sd)
    torch.save(sd, tmp_path / "final.nnet")
    return tmp_path


def _enc_conf(raw):
    return raw["model_conf"]["encoder_conf"]


def test_expert_count_multiple_of_num_experts_is_accepted(fx, tmp_path, caplog):
    """8 experts for moe_conf.num_experts 4 (two workers): the 4 copies get a -1e4 router bias,
    so the routing and the outputs are the original model's."""

    def double_experts(sd):
        for i in range(2):
            p = f"encoder.blocks.{i}.feed_forward."
            for k in ("w_1.weight", "w_1.bias", "w_2.weight", "w_2.bias"):
                sd[p + "experts." + k] = torch.cat([sd[p + "experts." + k]] * 2)
            sd[p + "router_weights"] = torch.cat([sd[p + "router_weights"]] * 2, dim=1)
            sd[p + "router_bias"] = torch.tensor([0.0] * 4 + [-1e4] * 4)

    d = _copy(fx, tmp_path, lambda r: _enc_conf(r)["moe_conf"].update(router_with_bias=True),
              double_experts)
    with caplog.at_level(logging.INFO, logger="speechrt.models.conformer_moe.config"):
        model = load_conformer_moe(d, device="cpu")
    assert "2 expert workers" in caplog.text
    assert (model.cfg.moe.num_experts, model.cfg.moe.expert_world_size) == (8, 2)
    with torch.inference_mode():
        out, _ = model.net.encoder(fx["feats"], fx["lens"], pad_mode="wenet")
    _close_valid(out, "encoder_hidden", fx)


def _experts_to(n):
    def edit(sd):
        p = "encoder.blocks.0.feed_forward."
        for k in ("experts.w_1.weight", "experts.w_1.bias", "experts.w_2.weight",
                  "experts.w_2.bias"):
            sd[p + k] = sd[p + k][:1].expand(n, *sd[p + k].shape[1:]).clone()
        sd[p + "router_weights"] = sd[p + "router_weights"][:, :1].expand(-1, n).clone()

    return edit


@pytest.mark.parametrize(
    "edit_config, edit_sd, error, match",
    [
        (None, _experts_to(6), ModelFormatError, "6 experts.*not a multiple"),
        (None, _experts_to(8), ModelFormatError, "blocks.1.feed_forward.* has shape"),
        (lambda r: _enc_conf(r)["moe_conf"].update(hidden_units=64), None, ModelFormatError,
         "experts.w_1.weight' has shape"),
        (None, lambda sd: sd.update({"encoder.blocks.0.feed_forward.gate.weight":
                                     torch.zeros(4, 64)}),
         ModelFormatError, "unexpected key 'encoder.blocks.0.feed_forward.gate.weight'"),
        (None, lambda sd: sd.pop("encoder.embed.after_norm.bias"), ModelFormatError,
         "lacks 1 tensor.*encoder.embed.after_norm.bias"),
        (lambda r: _enc_conf(r).update(foo=1), None, ModelFormatError, "encoder_conf.foo"),
        (lambda r: _enc_conf(r).update(conv_subsample_in_ch=2), None, UnsupportedOptionError,
         "conv_subsample_in_ch"),
        (lambda r: r.update(nnet_proto="conformer_aed"), None, UnsupportedOptionError,
         "nnet_proto"),
    ],
    ids=["not_multiple", "blocks_disagree", "hidden_units", "unknown_key", "missing_key",
         "unknown_config_key", "in_ch", "dense_proto"],
)
def test_bad_checkpoints_and_configs(fx, tmp_path, edit_config, edit_sd, error, match):
    d = _copy(fx, tmp_path, edit_config, edit_sd)
    with pytest.raises(error, match=match):
        load_conformer_moe(d, device="cpu")


def test_symbol_table_must_fit(fx, tmp_path):
    d = _copy(fx, tmp_path)
    (d / "units.txt").write_text("".join(f"u{i} {i}\n" for i in range(59)))
    with pytest.raises(ModelFormatError, match="59 units.*60"):
        load_conformer_moe(d, device="cpu")
    (d / "units.txt").write_text("".join(f"u{i} {i}\n" for i in range(60)))
    assert load_conformer_moe(d, device="cpu").symbols.id_to_unit[7] == "u7"
