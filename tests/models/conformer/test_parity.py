"""FP32 CPU parity with WeNet's own outputs (shared/fixtures/wenet/*/reference.npz).

Tolerances are the fixtures' own (REFERENCE.md / meta_json): 10x the float32-vs-float64 deviation of
WeNet's code. ``pad_mode="wenet"`` reproduces WeNet's padded-batch conv-module leak; the default
``"zero"`` mode must equal it on the unpadded (longest) utterance and be batch-invariant.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import speechrt
from speechrt.decoding.rescoring import rescoring_scores

FIXTURES = ["conformer_ctc_aed", "u2pp_bidecoder"]


@pytest.fixture(scope="module", params=FIXTURES)
def case(request, shared):
    d = shared / "fixtures" / "wenet" / request.param
    ref = dict(np.load(d / "reference.npz"))
    meta = json.loads(str(ref.pop("meta_json")))
    model = speechrt.load_model(d, device="cpu")
    return request.param, model, ref, meta


def _tol(meta, name):
    t = meta["tolerances"][name]
    return t["atol"], t.get("rtol", 0.0)


def _inputs(ref):
    return torch.from_numpy(ref["feats"]), torch.from_numpy(ref["feats_lengths"]).long()


def _close_valid(ours, theirs, lengths, atol, rtol):
    for b, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(ours[b, :n].numpy(), theirs[b, :n], atol=atol, rtol=rtol)


def test_encoder_and_ctc(case):
    name, model, ref, meta = case
    feats, lens = _inputs(ref)
    out, out_lens = model.encode(feats, lens, pad_mode="wenet")
    assert out_lens.tolist() == ref["encoder_out_lens"].tolist()
    _close_valid(out, ref["encoder_out"], out_lens, *_tol(meta, "encoder_out"))
    logp = model.net.ctc_log_probs(out)
    _close_valid(logp, ref["ctc_log_probs"], out_lens, *_tol(meta, "ctc_log_probs"))


def test_zero_pad_mode_is_batch_invariant(case):
    name, model, ref, meta = case
    feats, lens = _inputs(ref)
    batch, batch_lens = model.encode(feats, lens)
    atol, rtol = _tol(meta, "encoder_out")
    # The longest utterance has no padding: both modes equal WeNet there.
    n0 = int(batch_lens[0])
    np.testing.assert_allclose(
        batch[0, :n0].numpy(), ref["encoder_out"][0, :n0], atol=atol, rtol=rtol
    )
    for b in range(feats.shape[0]):
        n = int(lens[b])
        alone, alone_lens = model.encode(feats[b : b + 1, :n], lens[b : b + 1])
        assert int(alone_lens[0]) == int(batch_lens[b])
        torch.testing.assert_close(
            alone[0, : alone_lens[0]], batch[b, : batch_lens[b]], atol=1e-5, rtol=1e-5
        )
        # Extra padding with garbage changes nothing either.
        padded = torch.cat([feats[b : b + 1, :n], 50 * torch.randn(1, 37, feats.shape[2])], dim=1)
        more, _ = model.encode(padded, lens[b : b + 1])
        torch.testing.assert_close(
            more[0, : alone_lens[0]], alone[0, : alone_lens[0]], atol=1e-5, rtol=1e-5
        )


def test_decoder_log_probs_and_rescoring(case):
    name, model, ref, meta = case
    feats, lens = _inputs(ref)
    enc, enc_lens = model.encode(feats, lens, pad_mode="wenet")
    hyps = torch.from_numpy(ref["prefix_nbest"])
    hyp_lens = torch.from_numpy(ref["prefix_nbest_lens"])
    rw = meta["decode"]["reverse_weight"]
    with torch.inference_mode():
        l2r, r2l = model.net.rescoring_log_probs(enc, enc_lens, hyps, hyp_lens, with_r2l=rw > 0)
    in_lens = ref["att_hyps_in_lens"]
    atol, rtol = _tol(meta, "att_l2r_log_probs")
    for b in range(hyps.shape[0]):
        for i in range(hyps.shape[1]):
            n = int(in_lens[b, i])
            if n < 0:
                continue
            np.testing.assert_allclose(
                l2r[b, i, :n].numpy(), ref["att_l2r_log_probs"][b, i, :n], atol=atol, rtol=rtol
            )
            if "att_r2l_log_probs" in ref:
                np.testing.assert_allclose(
                    r2l[b, i, :n].numpy(), ref["att_r2l_log_probs"][b, i, :n], atol=atol, rtol=rtol
                )
    res = rescoring_scores(
        l2r,
        r2l,
        hyps,
        hyp_lens,
        torch.from_numpy(ref["prefix_nbest_scores"]),
        model.cfg.eos,
        0.5,
        rw,
    )
    assert res.best_index.tolist() == ref["rescoring_best_index"].tolist()
    atol, rtol = _tol(meta, "rescoring_score")
    np.testing.assert_allclose(res.best_score.numpy(), ref["rescoring_score"], atol=atol, rtol=rtol)
    valid = np.isfinite(ref["rescoring_hyp_scores"])
    np.testing.assert_allclose(
        res.scores.numpy()[valid],
        ref["rescoring_hyp_scores"][valid],
        atol=_tol(meta, "rescoring_hyp_scores")[0],
        rtol=1e-5,
    )
    assert np.all(np.isneginf(res.scores.numpy()[~valid]))


def test_every_mode_end_to_end(case):
    """decode() with each WeNet method reproduces WeNet's tokens and scores."""
    name, model, ref, meta = case
    feats, lens = _inputs(ref)
    # WeNet's references are of a padded batch: decode with its padding semantics.
    common = dict(meta["decode"], pad_mode="wenet")
    greedy = model.decode(feats, lens, method="ctc_greedy_search", **common)
    prefix = model.decode(feats, lens, method="ctc_prefix_beam_search", **common)
    resc = model.decode(feats, lens, method="attention_rescoring", **common)
    for b in range(feats.shape[0]):
        n = int(ref["ctc_greedy_lens"][b])
        assert greedy[b][0][0] == ref["ctc_greedy_hyps"][b, :n].tolist()
        count = int(ref["prefix_nbest_count"][b])
        assert len(prefix[b]) == count
        for i in range(count):
            n = int(ref["prefix_nbest_lens"][b, i])
            assert prefix[b][i][0] == ref["prefix_nbest"][b, i, :n].tolist()
            assert prefix[b][i][1] == pytest.approx(ref["prefix_nbest_scores"][b, i], abs=2e-4)
        n = int(ref["rescoring_hyp_len"][b])
        assert resc[b][0][0] == ref["rescoring_hyp"][b, :n].tolist()
        assert resc[b][0][1] == pytest.approx(ref["rescoring_score"][b], abs=5e-4)


def test_chunk_mask_and_streaming(shared):
    d = shared / "fixtures" / "wenet" / "u2pp_bidecoder"
    ref = dict(np.load(d / "reference.npz"))
    model = speechrt.load_model(d, device="cpu")
    feats, lens = _inputs(ref)
    out, out_lens = model.encode(feats, lens, decoding_chunk_size=8, pad_mode="wenet")
    _close_valid(out, ref["encoder_out_chunk8_left-1"], out_lens, 5e-5, 1e-5)
    n0 = int(lens[0])
    with torch.inference_mode():
        y, windows = model.net.encoder.forward_chunk_by_chunk(feats[0:1, :n0], 8, -1)
    assert [list(w) for w in windows] == ref["stream_chunk8_left-1_windows"].tolist()
    np.testing.assert_allclose(y.numpy(), ref["stream_chunk8_left-1_utt0"], atol=5e-5, rtol=1e-5)
    # The caches after the first chunk and at the end.
    enc = model.net.encoder
    with torch.inference_mode():
        start, end, offset, _ = windows[0]
        empty = feats.new_zeros(0, 0, 0, 0)
        _, att, cnn = enc.forward_chunk(feats[0:1, start:end], offset, -8, empty, empty)
    np.testing.assert_allclose(
        att.numpy(), ref["stream_chunk8_left-1_att_cache_after_chunk0"], atol=5e-5, rtol=1e-5
    )
    np.testing.assert_allclose(
        cnn.numpy(), ref["stream_chunk8_left-1_cnn_cache_after_chunk0"], atol=5e-5, rtol=1e-5
    )
    # simulate_streaming through the public API gives the same encoder output.
    s_out, s_lens = model.encode(
        feats[0:1, :n0], lens[0:1], decoding_chunk_size=8, simulate_streaming=True
    )
    np.testing.assert_allclose(
        s_out[0, : s_lens[0]].numpy(), ref["stream_chunk8_left-1_utt0"][0], atol=5e-5, rtol=1e-5
    )
