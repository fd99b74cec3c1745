"""Slow, obviously-correct decoding oracles (one utterance at a time, plain Python).

These functions mirror WeNet's reference algorithms (``wenet/transformer/search.py``) step by step
so that tests can hold the batched, tensor-only decoders of this package to them exactly. They are
never used for serving: every loop here runs in Python and syncs with the device on each value.

Sections:

1. Shared helpers (``log_add``)
2. CTC oracles: greedy search and prefix beam search (with WeNet's viterbi token times)
3. Attention-decoder oracles (rescoring, attention beam search): added later
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
