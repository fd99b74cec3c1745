"""Batched attention rescoring and attention beam search against the slow oracles."""

from __future__ import annotations

import pytest
import torch

from speechrt.decoding.attention import attention_beam_search
from speechrt.decoding.reference import attention_beam_search_ref, attention_rescoring_ref
from speechrt.decoding.rescoring import decoder_inputs, rescoring_scores


def _random_nbest(gen, b, w, v, max_len):
    lens = torch.randint(0, max_len + 1, (b, w), generator=gen)
    lens[torch.rand(b, w, generator=gen) < 0.2] = -1  # absent hypotheses
    lens[:, 0] = lens[:, 0].clamp(min=0)
    hyps = torch.randint(1, v - 1, (b, w, max(max_len, 1)), generator=gen)
    hyps = torch.where(torch.arange(hyps.shape[2]) < lens.unsqueeze(-1), hyps, -1)
    ctc = torch.randn(b, w, generator=gen, dtype=torch.float64) * 3
    return hyps, lens, ctc


@pytest.mark.parametrize("seed", range(25))
def test_rescoring_matches_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    b, w, v, max_len = 1 + seed % 3, 1 + seed % 5, 7 + seed % 4, seed % 6
    eos = sos = v - 1
    hyps, lens, ctc = _random_nbest(gen, b, w, v, max_len)
    l2r_in, r2l_in, in_lens = decoder_inputs(hyps, lens, sos, eos)
    l_width = l2r_in.shape[2]
    l2r = torch.log_softmax(torch.randn(b, w, l_width, v, generator=gen), -1)
    r2l = torch.log_softmax(torch.randn(b, w, l_width, v, generator=gen), -1)
    rw, cw = [0.0, 0.3, 1.0][seed % 3], [0.0, 0.5, 1.0][seed % 3]
    res = rescoring_scores(l2r, r2l, hyps, lens, ctc, eos, cw, rw)
    for bi in range(b):
        idx = [i for i in range(w) if lens[bi, i] >= 0]
        nbest = [(hyps[bi, i, : lens[bi, i]].tolist(), float(ctc[bi, i])) for i in idx]
        for i in idx:  # teacher-forcing inputs as WeNet builds them
            n = int(lens[bi, i])
            assert l2r_in[bi, i, : n + 1].tolist() == [sos] + nbest[idx.index(i)][0]
            assert r2l_in[bi, i, : n + 1].tolist() == [sos] + nbest[idx.index(i)][0][::-1]
            assert int(in_lens[bi, i]) == n + 1
        best, best_score, scores = attention_rescoring_ref(
            nbest, [l2r[bi, i] for i in idx], [r2l[bi, i] for i in idx], eos, cw, rw
        )
        assert idx[best] == int(res.best_index[bi])
        assert float(res.best_score[bi]) == pytest.approx(best_score, abs=1e-9)
        for k, i in enumerate(idx):
            assert float(res.scores[bi, i]) == pytest.approx(scores[k], abs=1e-9)
        assert all(res.scores[bi, i] == float("-inf") for i in range(w) if lens[bi, i] < 0)


class _TableLM:
    """A deterministic toy decoder: next-token log-probs depend on (last token, position)."""

    def __init__(self, v: int, seed: int, eos: int, eos_bias: float):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(v, 64, v, generator=gen) * 2.5
        self.table[..., eos] += eos_bias
        self.table = torch.log_softmax(self.table, -1)

    def next(self, prefix: list[int]) -> torch.Tensor:
        return self.table[prefix[-1], len(prefix) - 1]

    def step_fn(self, b: int, w: int):
        def step(tokens, i, parents):
            return self.table[tokens, i].float()  # (B, W, V)

        return step


@pytest.mark.parametrize("seed", range(30))
def test_beam_search_matches_oracle_on_toy_decoder(seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    v = 5 + seed % 6
    eos = sos = v - 1
    b, w = 1 + seed % 4, 1 + seed % min(4, v)
    lm = _TableLM(v, seed, eos, eos_bias=[-3.0, 0.0, 2.0][seed % 3])
    max_lens = torch.randint(1, 20, (b,), generator=gen)
    lp = [0.0, 1.0, 0.5][seed % 3 if seed >= 12 else 0]  # WeNet's final score / len**lp ranking
    res = attention_beam_search(lm.step_fn(b, w), b, w, sos, eos, max_lens, "cpu", lp)
    for bi in range(b):
        tokens, score = attention_beam_search_ref(lm.next, w, sos, eos, int(max_lens[bi]), lp)
        n = int(res.lengths[bi])
        assert res.tokens[bi, :n].tolist() == tokens
        assert float(res.scores[bi]) == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("name", ["conformer_ctc_aed", "u2pp_bidecoder"])
def test_beam_search_with_kv_cache_matches_full_recompute(shared, name):
    """The model's cached incremental decoder gives the oracle's search on full recomputation."""
    import numpy as np

    import speechrt

    d = shared / "fixtures" / "wenet" / name
    ref = np.load(d / "reference.npz")
    model = speechrt.load_model(d, device="cpu")
    feats = torch.from_numpy(ref["feats"])
    lens = torch.from_numpy(ref["feats_lengths"]).long()
    beam = 3
    results = model.decode(feats, lens, method="attention", beam_size=beam)
    enc, enc_lens = model.encode(feats, lens)
    dec = model.net.decoder.l2r
    for bi in range(feats.shape[0]):
        mem = enc[bi : bi + 1, : enc_lens[bi]]
        kv = dec.project_memory(mem)

        def next_log_probs(prefix, kv=kv, n=enc_lens[bi : bi + 1]):
            toks = torch.tensor(prefix).view(1, 1, -1)
            with torch.inference_mode():
                lp = dec(toks, torch.tensor([[len(prefix)]]), kv, n)
            return lp[0, 0, -1]

        tokens, score = attention_beam_search_ref(
            next_log_probs, beam, model.cfg.sos, model.cfg.eos, int(enc_lens[bi])
        )
        assert results[bi][0][0] == tokens
        assert results[bi][0][1] == pytest.approx(score, abs=1e-3)
