"""Batched CTC decoding (speechrt.decoding.ctc) against WeNet's fixture arrays and the oracles.

The oracles of speechrt.decoding.reference mirror WeNet's per-utterance Python loops; both they
and the batched decoders must reproduce the arrays WeNet itself wrote into the fixtures.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from speechrt.decoding.ctc import (
    CTCPrefixBeamResult,
    ctc_greedy_search,
    ctc_prefix_beam_search,
    nbest_lists,
)
from speechrt.decoding.reference import ctc_greedy_search_ref, ctc_prefix_beam_search_ref
from speechrt.errors import UnsupportedOptionError

FIXTURES = ("conformer_ctc_aed", "u2pp_bidecoder")
NEG_INF = float("-inf")
SCORE_ATOL = 1e-9


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FIXTURES)
def wenet(request, shared) -> dict:
    """The arrays of one WeNet fixture plus its decode settings and score tolerance."""
    with np.load(shared / "fixtures" / "wenet" / request.param / "reference.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays.pop("meta_json")))
    arrays["beam_size"] = meta["decode"]["beam_size"]
    arrays["score_tol"] = meta["tolerances"]["prefix_nbest_scores"]
    return arrays


def _inputs(wenet: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(wenet["ctc_log_probs"]), torch.from_numpy(wenet["encoder_out_lens"])


def _assert_padded(rows: torch.Tensor, expected: np.ndarray) -> None:
    """rows (..., L) equal expected (..., L') on the first L' columns and -1 beyond."""
    width = expected.shape[-1]
    assert rows.shape[-1] >= width
    np.testing.assert_array_equal(rows[..., :width].numpy(), expected)
    assert bool((rows[..., width:] == -1).all())


def _same_score(a: float, b: float, atol: float = SCORE_ATOL) -> bool:
    return a == b or abs(a - b) <= atol


def _assert_matches_oracle(
    result: CTCPrefixBeamResult,
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    beam: int,
    blank: int,
) -> None:
    """Every utterance of a batched result equals the oracle: tokens, order, count, times
    exactly (padding included), scores to SCORE_ATOL (-inf for -inf)."""
    assert result.hyps.shape[:2] == (log_probs.shape[0], beam)
    for b in range(log_probs.shape[0]):
        nbest = ctc_prefix_beam_search_ref(log_probs[b], int(lengths[b]), beam, blank)
        assert int(result.count[b]) == len(nbest), f"utt {b}"
        for i, (tokens, score, times) in enumerate(nbest):
            assert int(result.hyp_lengths[b, i]) == len(tokens), f"utt {b} hyp {i}"
            _assert_padded(result.hyps[b, i], np.array(tokens, dtype=np.int64))
            _assert_padded(result.times[b, i], np.array(times, dtype=np.int64))
            got = float(result.scores[b, i])
            assert _same_score(got, score), f"utt {b} hyp {i}: {got} != {score}"
        assert bool((result.hyp_lengths[b, len(nbest) :] == -1).all())
        assert bool((result.hyps[b, len(nbest) :] == -1).all())
        assert bool((result.times[b, len(nbest) :] == -1).all())
        assert bool((result.scores[b, len(nbest) :] == NEG_INF).all())


def _assert_greedy_matches_oracle(log_probs, lengths, blank: int) -> None:
    result = ctc_greedy_search(log_probs, lengths, blank)
    assert result.tokens.shape == log_probs.shape[:2]
    for b in range(log_probs.shape[0]):
        valid = int(lengths[b])
        expected = ctc_greedy_search_ref(log_probs[b], valid, blank)
        assert int(result.token_lengths[b]) == len(expected)
        _assert_padded(result.tokens[b], np.array(expected, dtype=np.int64))
        path = sum(float(log_probs[b, t].max()) for t in range(valid))
        assert math.isclose(float(result.scores[b]), path, rel_tol=1e-5, abs_tol=1e-4)


def _random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Peaky CTC log-probs with a mix of the situations prefix search must get right.

    Kinds: plain peaky posteriors, heavy blank, coarse logits (many exact ties), duplicated
    columns (tokens that always tie), runs of repeated tokens (repeat/merge arcs), masked
    tokens (-inf log-probs). Returns (log_probs (B, T, V), lengths (B,), beam, blank).
    """
    g = torch.Generator().manual_seed(1000 + seed)

    def rand_int(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    batch, frames, vocab, beam = rand_int(1, 5), rand_int(0, 40), rand_int(3, 12), rand_int(1, 8)
    blank = rand_int(1, vocab - 1) if seed % 3 == 2 else 0
    logits = torch.randn(batch, frames, vocab, generator=g) * (0.5 + 4 * torch.rand(1, generator=g))
    kind = seed % 6
    if kind == 1:
        logits[..., blank] += 2 + 3 * torch.rand(1, generator=g)
    elif kind == 2:
        logits = logits.round()
    elif kind == 3:
        logits[..., (blank + 1) % vocab] = logits[..., (blank + 2) % vocab]
    elif kind == 4 and frames > 0:
        runs = torch.randint(0, vocab, (batch, (frames + 2) // 3), generator=g)
        peaks = runs.repeat_interleave(3, dim=1)[:, :frames]  # (B, T) each token 3 frames long
        logits.scatter_add_(2, peaks[..., None], torch.full((batch, frames, 1), 4.0))
    elif kind == 5:
        logits = logits.masked_fill(torch.rand(logits.shape, generator=g) < 0.3, NEG_INF)
        logits[..., blank] = 0.0
    lengths = torch.randint(0, frames + 1, (batch,), generator=g)
    lengths[rand_int(0, batch - 1)] = frames
    return logits.log_softmax(-1), lengths, beam, blank


# ---------------------------------------------------------------------------------------------
# WeNet fixture parity
# ---------------------------------------------------------------------------------------------


def test_greedy_oracle_matches_wenet(wenet):
    log_probs, lengths = _inputs(wenet)
    for b in range(log_probs.shape[0]):
        expected = wenet["ctc_greedy_hyps"][b, : wenet["ctc_greedy_lens"][b]].tolist()
        assert ctc_greedy_search_ref(log_probs[b], int(lengths[b])) == expected


def test_greedy_batched_matches_wenet(wenet):
    log_probs, lengths = _inputs(wenet)
    result = ctc_greedy_search(log_probs, lengths)
    _assert_padded(result.tokens, wenet["ctc_greedy_hyps"])
    np.testing.assert_array_equal(result.token_lengths.numpy(), wenet["ctc_greedy_lens"])
    valid = np.arange(log_probs.shape[1])[None] < wenet["encoder_out_lens"][:, None]
    path = np.where(valid, wenet["ctc_log_probs"].astype(np.float64).max(-1), 0.0).sum(-1)
    assert result.scores.dtype == torch.float32
    np.testing.assert_allclose(result.scores.numpy(), path, rtol=1e-6, atol=1e-4)


def test_prefix_oracle_matches_wenet(wenet):
    log_probs, lengths = _inputs(wenet)
    tol = wenet["score_tol"]
    for b in range(log_probs.shape[0]):
        nbest = ctc_prefix_beam_search_ref(log_probs[b], int(lengths[b]), wenet["beam_size"])
        assert len(nbest) == wenet["prefix_nbest_count"][b]
        for i, (tokens, score, times) in enumerate(nbest):
            n = wenet["prefix_nbest_lens"][b, i]
            assert tokens == wenet["prefix_nbest"][b, i, :n].tolist()
            assert times == wenet["prefix_nbest_times"][b, i, :n].tolist()
            expected = wenet["prefix_nbest_scores"][b, i]
            assert math.isclose(score, expected, rel_tol=tol["rtol"], abs_tol=tol["atol"])


@pytest.mark.parametrize("score_dtype", [torch.float64, torch.float32])
def test_prefix_batched_matches_wenet(wenet, score_dtype):
    log_probs, lengths = _inputs(wenet)
    result = ctc_prefix_beam_search(log_probs, lengths, wenet["beam_size"], score_dtype=score_dtype)
    _assert_padded(result.hyps, wenet["prefix_nbest"])
    _assert_padded(result.times, wenet["prefix_nbest_times"])
    np.testing.assert_array_equal(result.hyp_lengths.numpy(), wenet["prefix_nbest_lens"])
    np.testing.assert_array_equal(result.count.numpy(), wenet["prefix_nbest_count"])
    assert result.scores.dtype == score_dtype
    np.testing.assert_allclose(
        result.scores.double().numpy(), wenet["prefix_nbest_scores"], **wenet["score_tol"]
    )


# ---------------------------------------------------------------------------------------------
# Batched decoders against the oracles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(60))
def test_prefix_batched_matches_oracle_random(seed):
    log_probs, lengths, beam, blank = _random_case(seed)
    result = ctc_prefix_beam_search(log_probs, lengths, beam, blank)
    _assert_matches_oracle(result, log_probs, lengths, beam, blank)
    _assert_greedy_matches_oracle(log_probs, lengths, blank)


@pytest.mark.parametrize(
    ("vocab", "beam", "blank"),
    [(1, 3, 0), (2, 5, 1), (3, 3, 0), (4, 9, 2)],
)
def test_beam_wider_than_vocab(vocab, beam, blank):
    """K = min(beam, V) tokens are expanded per frame; the beam still holds up to W prefixes."""
    g = torch.Generator().manual_seed(vocab * 100 + beam)
    log_probs = (2 * torch.randn(2, 9, vocab, generator=g)).log_softmax(-1)
    lengths = torch.tensor([9, 6])
    result = ctc_prefix_beam_search(log_probs, lengths, beam, blank)
    _assert_matches_oracle(result, log_probs, lengths, beam, blank)


def test_impossible_prefixes_are_kept_in_insertion_order():
    """WeNet keeps dictionary entries with score -inf (e.g. "aa" after one frame, whose "a"
    has no blank-ending path) when fewer than W prefixes exist; they tie at -inf."""
    g = torch.Generator().manual_seed(5)
    log_probs = torch.randn(2, 3, 4, generator=g).log_softmax(-1)
    lengths = torch.tensor([2, 3])
    result = ctc_prefix_beam_search(log_probs, lengths, 16, blank=1)
    assert int((result.scores[0] == NEG_INF).sum()) >= 2 + (16 - int(result.count[0]))
    _assert_matches_oracle(result, log_probs, lengths, 16, 1)


def test_all_blank_input():
    log_probs = torch.full((2, 12, 5), -30.0)
    log_probs[..., 3] = 0.0
    log_probs = log_probs.log_softmax(-1)
    lengths = torch.tensor([12, 7])
    greedy = ctc_greedy_search(log_probs, lengths, blank=3)
    assert greedy.token_lengths.tolist() == [0, 0]
    assert bool((greedy.tokens == -1).all())
    result = ctc_prefix_beam_search(log_probs, lengths, 4, blank=3)
    assert result.hyp_lengths[:, 0].tolist() == [0, 0]  # the empty prefix is the best
    _assert_matches_oracle(result, log_probs, lengths, 4, 3)


@pytest.mark.parametrize("frames", [0, 5])
def test_zero_length_gives_one_empty_hypothesis(frames):
    log_probs = torch.randn(3, frames, 6).log_softmax(-1)
    lengths = torch.zeros(3, dtype=torch.long)
    result = ctc_prefix_beam_search(log_probs, lengths, 4)
    assert result.hyps.shape == (3, 4, frames)
    assert result.count.tolist() == [1, 1, 1]
    assert result.hyp_lengths.tolist() == [[0, -1, -1, -1]] * 3
    assert result.scores[:, 0].tolist() == [0.0] * 3
    assert bool((result.scores[:, 1:] == NEG_INF).all())
    assert nbest_lists(result) == [[([], 0.0)]] * 3
    _assert_matches_oracle(result, log_probs, lengths, 4, 0)
    greedy = ctc_greedy_search(log_probs, lengths)
    assert greedy.tokens.shape == (3, frames)
    assert greedy.token_lengths.tolist() == [0, 0, 0]
    assert greedy.scores.tolist() == [0.0, 0.0, 0.0]


def test_nbest_lists_matches_oracle():
    log_probs, lengths, beam, blank = _random_case(4)
    lists = nbest_lists(ctc_prefix_beam_search(log_probs, lengths, beam, blank))
    assert len(lists) == log_probs.shape[0]
    for b, got in enumerate(lists):
        nbest = ctc_prefix_beam_search_ref(log_probs[b], int(lengths[b]), beam, blank)
        assert [tokens for tokens, _ in got] == [tokens for tokens, _, _ in nbest]
        assert all(_same_score(a, e) for (_, a), (_, e, _) in zip(got, nbest))


# ---------------------------------------------------------------------------------------------
# Padding invariance
# ---------------------------------------------------------------------------------------------


def _pad_with_garbage(log_probs: torch.Tensor, lengths: torch.Tensor, extra: int) -> torch.Tensor:
    """Append `extra` frames and overwrite every frame beyond the lengths with NaN/inf/noise."""
    batch, frames, vocab = log_probs.shape
    noise = torch.randn(batch, frames + extra, vocab, generator=torch.Generator().manual_seed(7))
    noise[..., 0] = float("nan")
    noise[..., 1] = float("inf")
    padded = torch.cat([log_probs, noise[:, frames:]], dim=1)  # (B, T + extra, V)
    pad = torch.arange(frames + extra)[None, :] >= lengths[:, None]  # (B, T + extra)
    return torch.where(pad[..., None], noise, padded)


@pytest.mark.parametrize("seed", [0, 10, 22, 29])
def test_padding_does_not_change_results(seed):
    log_probs, lengths, beam, blank = _random_case(seed)
    padded = _pad_with_garbage(log_probs, lengths, extra=3)
    batched = ctc_prefix_beam_search(padded, lengths, beam, blank)
    greedy = ctc_greedy_search(padded, lengths, blank)
    for b in range(log_probs.shape[0]):
        n = int(lengths[b])
        alone = ctc_prefix_beam_search(log_probs[b : b + 1, :n], lengths[b : b + 1], beam, blank)
        for name in ("hyp_lengths", "scores", "count"):
            torch.testing.assert_close(getattr(batched, name)[b], getattr(alone, name)[0])
        for name in ("hyps", "times"):
            _assert_padded(getattr(batched, name)[b], getattr(alone, name)[0].numpy())
        greedy_alone = ctc_greedy_search(log_probs[b : b + 1, :n], lengths[b : b + 1], blank)
        _assert_padded(greedy.tokens[b], greedy_alone.tokens[0].numpy())
        torch.testing.assert_close(greedy.scores[b], greedy_alone.scores[0])


# ---------------------------------------------------------------------------------------------
# Errors and devices
# ---------------------------------------------------------------------------------------------


def test_invalid_options_raise():
    log_probs = torch.randn(2, 4, 5).log_softmax(-1)
    lengths = torch.tensor([4, 2])
    with pytest.raises(UnsupportedOptionError, match="beam_size"):
        ctc_prefix_beam_search(log_probs, lengths, 0)
    with pytest.raises(UnsupportedOptionError, match="blank"):
        ctc_prefix_beam_search(log_probs, lengths, 2, blank=5)
    with pytest.raises(UnsupportedOptionError, match="blank"):
        ctc_greedy_search(log_probs, lengths, blank=-1)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        ctc_greedy_search(log_probs[0], lengths)
    with pytest.raises(ValueError, match="lengths"):
        ctc_prefix_beam_search(log_probs, lengths[:1], 2)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 4, 6, 7, 10, 12, 13])  # kinds 0, 1, 4: no exact ties
def test_cuda_matches_oracle(seed):
    log_probs, lengths, beam, blank = _random_case(seed)
    cuda = torch.device("cuda")
    result = ctc_prefix_beam_search(log_probs.to(cuda), lengths.to(cuda), beam, blank)
    assert result.hyps.device.type == "cuda"
    cpu = CTCPrefixBeamResult(**{k: v.cpu() for k, v in vars(result).items()})
    _assert_matches_oracle(cpu, log_probs, lengths, beam, blank)
    greedy = ctc_greedy_search(log_probs.to(cuda), lengths.to(cuda), blank)
    for b in range(log_probs.shape[0]):
        expected = ctc_greedy_search_ref(log_probs[b], int(lengths[b]), blank)
        assert greedy.tokens[b, : len(expected)].cpu().tolist() == expected
