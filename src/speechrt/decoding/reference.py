"""Slow, obviously-correct decoding oracles (one utterance at a time, plain Python).

These functions mirror WeNet's reference algorithms (``wenet/transformer/search.py``) step by step
so that tests can hold the batched, tensor-only decoders of this package to them exactly. They are
never used for serving: every loop here runs in Python and syncs with the device on each value.

Sections:

1. Shared helpers (``log_add``)
2. CTC oracles: greedy search and prefix beam search (with WeNet's viterbi token times)
3. Attention-decoder oracles: attention rescoring and attention beam search
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")

# ---------------------------------------------------------------------------------------------
# 1. Shared helpers
# ---------------------------------------------------------------------------------------------


def log_add(*args: float) -> float:
    """``log(sum(exp(a)))`` of Python floats, evaluated exactly as WeNet's ``log_add`` does."""
    if all(a == NEG_INF for a in args):
        return NEG_INF
    a_max = max(args)
    return a_max + math.log(sum(math.exp(a - a_max) for a in args))


# ---------------------------------------------------------------------------------------------
# 2. CTC oracles
# ---------------------------------------------------------------------------------------------


def ctc_greedy_search_ref(log_probs: torch.Tensor, length: int, blank: int = 0) -> list[int]:
    """Best path of one utterance: argmax per frame, collapse repeats, drop blanks.

    Args:
        log_probs: (T, V) CTC log-posteriors.
        length: number of valid frames; frames ``>= length`` count as blank.
        blank: blank token id.
    Returns:
        the token ids.
    """
    best = log_probs.topk(1, dim=-1).indices[:, 0].tolist()  # (T,) same tie order as WeNet
    path = [tok if t < length else blank for t, tok in enumerate(best)]
    tokens: list[int] = []
    prev = None
    for tok in path:
        if tok != blank and tok != prev:
            tokens.append(tok)
        prev = tok
    return tokens


@dataclass
class _PrefixScore:
    """Scores of one prefix at one frame (WeNet's ``PrefixScore`` without context biasing).

    ``s``/``ns``: log-probability of all paths ending in blank / non-blank. ``v_s``/``v_ns``: the
    best single (viterbi) path of each kind, ``times_s``/``times_ns`` its token peak frames.
    ``cur_token_prob`` records that the non-blank viterbi fields were written in this frame.
    """

    s: float = NEG_INF
    ns: float = NEG_INF
    v_s: float = NEG_INF
    v_ns: float = NEG_INF
    cur_token_prob: float = NEG_INF
    times_s: list[int] = field(default_factory=list)
    times_ns: list[int] = field(default_factory=list)

    def score(self) -> float:
        return log_add(self.s, self.ns)

    def viterbi_score(self) -> float:
        return self.v_s if self.v_s > self.v_ns else self.v_ns

    def times(self) -> list[int]:
        return self.times_s if self.v_s > self.v_ns else self.times_ns


def _extend_blank(nxt: _PrefixScore, cur: _PrefixScore, p: float) -> None:
    """prefix + blank -> prefix (ends in blank)."""
    nxt.s = log_add(nxt.s, cur.score() + p)
    nxt.v_s = cur.viterbi_score() + p
    nxt.times_s = cur.times().copy()


def _extend_repeat(nxt: _PrefixScore, cur: _PrefixScore, p: float, t: int) -> None:
    """*u + u -> *u: the last token is repeated without a blank in between."""
    nxt.ns = log_add(nxt.ns, cur.ns + p)
    if nxt.v_ns < cur.v_ns + p:
        nxt.v_ns = cur.v_ns + p
        if nxt.cur_token_prob < p:
            nxt.cur_token_prob = p
            nxt.times_ns = cur.times_ns.copy()
            nxt.times_ns[-1] = t


def _extend_token(
    nxt: _PrefixScore, cur: _PrefixScore, p: float, t: int, after_blank_only: bool
) -> None:
    """prefix + u -> prefix u. When u equals the prefix's last token only blank-ending paths
    (``*u-`` + u) can emit a second u (``after_blank_only``)."""
    if after_blank_only:
        base, vit, times = cur.s, cur.v_s, cur.times_s
    else:
        base, vit, times = cur.score(), cur.viterbi_score(), cur.times()
    nxt.ns = log_add(nxt.ns, base + p)
    if nxt.v_ns < vit + p:
        nxt.v_ns = vit + p
        nxt.cur_token_prob = p
        nxt.times_ns = times.copy()
        nxt.times_ns.append(t)


def ctc_prefix_beam_search_ref(
    log_probs: torch.Tensor, length: int, beam_size: int, blank: int = 0
) -> list[tuple[list[int], float, list[int]]]:
    """CTC prefix beam search of one utterance, WeNet's algorithm in plain Python floats.

    Per frame only the ``min(beam_size, V)`` most likely tokens are expanded (WeNet's
    ``logp.topk(beam_size)``, which raises when beam_size > V), prefixes are ranked by
    ``log_add(s, ns)`` with Python's stable sort (ties keep first-insertion order) and cut to
    ``beam_size``.

    Args:
        log_probs: (T, V) CTC log-posteriors (float32 is read into Python floats).
        length: number of valid frames.
        beam_size: beam width.
        blank: blank token id.
    Returns:
        the n-best list, best first: ``(tokens, score, times)`` with ``times[i]`` the frame of
        the viterbi peak of ``tokens[i]``.
    """
    k = min(beam_size, log_probs.shape[-1])
    beam: list[tuple[tuple[int, ...], _PrefixScore]] = [
        ((), _PrefixScore(s=0.0, ns=NEG_INF, v_s=0.0, v_ns=0.0))
    ]
    for t in range(length):
        logp = log_probs[t]  # (V,)
        next_beam: dict[tuple[int, ...], _PrefixScore] = {}
        for u in logp.topk(k).indices.tolist():
            p = logp[u].item()
            for prefix, cur in beam:
                last = prefix[-1] if prefix else None
                if u == blank:
                    _extend_blank(next_beam.setdefault(prefix, _PrefixScore()), cur, p)
                elif u == last:
                    _extend_repeat(next_beam.setdefault(prefix, _PrefixScore()), cur, p, t)
                    nxt = next_beam.setdefault(prefix + (u,), _PrefixScore())
                    _extend_token(nxt, cur, p, t, after_blank_only=True)
                else:
                    nxt = next_beam.setdefault(prefix + (u,), _PrefixScore())
                    _extend_token(nxt, cur, p, t, after_blank_only=False)
        ranked = sorted(next_beam.items(), key=lambda item: item[1].score(), reverse=True)
        beam = ranked[:beam_size]
    return [(list(prefix), ps.score(), ps.times().copy()) for prefix, ps in beam]


# ---------------------------------------------------------------------------------------------
# 3. Attention-decoder oracles
# ---------------------------------------------------------------------------------------------


def attention_rescoring_ref(
    nbest: list[tuple[list[int], float]],
    l2r_log_probs: list[torch.Tensor],
    r2l_log_probs: list[torch.Tensor] | None,
    eos: int,
    ctc_weight: float,
    reverse_weight: float,
) -> tuple[int, float, list[float]]:
    """WeNet's ``attention_rescoring`` loop for one utterance.

    nbest: CTC n-best (tokens, prefix score); l2r_log_probs[i]: (len_i + 1, V) decoder log-probs
    of hypothesis i fed as [sos, y1..yn] (row j predicts token j, row n predicts eos);
    r2l_log_probs[i]: the same for the reversed hypothesis. Returns (best index, best score,
    every hypothesis's score); the first maximum wins.
    """
    best, best_score, scores = 0, NEG_INF, []
    for i, (hyp, ctc_score) in enumerate(nbest):
        lp = l2r_log_probs[i]
        score = sum(float(lp[j, w]) for j, w in enumerate(hyp)) + float(lp[len(hyp), eos])
        if r2l_log_probs is not None and reverse_weight > 0:
            rp = r2l_log_probs[i]
            r_score = sum(float(rp[len(hyp) - j - 1, w]) for j, w in enumerate(hyp))
            r_score += float(rp[len(hyp), eos])
            score = score * (1 - reverse_weight) + r_score * reverse_weight
        score += ctc_score * ctc_weight
        scores.append(score)
        if score > best_score:
            best, best_score = i, score
    return best, best_score, scores


def attention_beam_search_ref(
    next_log_probs, beam_size: int, sos: int, eos: int, max_len: int, length_penalty: float = 0.0
) -> tuple[list[int], float]:
    """WeNet's ``attention_beam_search`` for one utterance, recomputing every prefix.

    next_log_probs(prefix: list[int]) -> (V,) log-probs of the next token after ``prefix``
    (which starts with sos). Beams start as [sos] with scores [0, -inf, ...]; each step expands
    every beam by its top ``beam_size`` tokens (a finished beam only by eos with log-prob 0),
    keeps the best ``beam_size`` of the ``beam_size**2`` candidates (ties: lower flat index),
    and stops after ``max_len`` steps or when every beam ended with eos; the final beams are
    ranked by ``score / num_tokens ** length_penalty`` (first beam wins ties).
    Returns (tokens without sos/eos, ranked score of the best beam).
    """
    beams = [([sos], 0.0 if i == 0 else NEG_INF) for i in range(beam_size)]
    for _ in range(max_len):
        if all(seq[-1] == eos and len(seq) > 1 for seq, _ in beams):
            break
        cands = []
        for seq, score in beams:
            if len(seq) > 1 and seq[-1] == eos:
                tops = [(0.0, eos)] + [(NEG_INF, eos)] * (beam_size - 1)
            else:
                logp = next_log_probs(seq).double()
                vals, idx = torch.topk(logp, beam_size)
                tops = list(zip(vals.tolist(), idx.tolist()))
            cands += [(score + v, seq + [tok]) for v, tok in tops]
        order = sorted(range(len(cands)), key=lambda k: (-cands[k][0], k))[:beam_size]
        beams = [(cands[k][1], cands[k][0]) for k in order]
    ranked = []
    for seq, score in beams:
        n = sum(t != eos for t in seq[1:])
        if length_penalty:  # an empty hypothesis divides by zero: -inf, as in WeNet
            score = score / n**length_penalty if n else NEG_INF
        ranked.append((seq, score))
    seq, score = max(ranked, key=lambda b: b[1])
    return [t for t in seq[1:] if t != eos], score

